"""The run folder's lifecycle: its default name, config, the check before a run starts, the lock
that keeps a second writer out, clearing it on --overwrite, and the list of skipped images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.files import atomic_write_text
from kith.utils import distributed as dist
from kith.utils.errors import UserError


# ---- config ---------------------------------------------------------------------------------
def default_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / name


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a kith run folder (no config.yaml)")
    return build_config(overrides or [], base=OmegaConf.load(path))


# ---- the run folder's lifecycle ------------------------------------------------------------
LOCK = ".lock"  # relative to the run folder: {"pid", "host"} of the process writing it


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "plots", "tensorboard", "wandb")


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a kith run (its config, metrics or checkpoints)."""
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is created: a resume needs a checkpoint; a new run needs a folder without a run
    (unless `overwrite`)."""
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"cannot resume: no checkpoint at '{run_dir / CHECKPOINT}'")
    if not resume and not overwrite and holds_run(run_dir):
        raise UserError(f"'{run_dir}' already holds a run; continue it with --resume {run_dir} "
                        "(resume=True), or start over with --overwrite (overwrite=True), which deletes its "
                        "files")


def clear_run(run_dir: Path) -> None:
    """Delete the files of the run in `run_dir` (kith's own files only; anything else stays)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock file (created with O_EXCL) while the body runs; released on any exit,
    exceptions, Ctrl-C and SIGTERM included (SIGTERM stops the run as Ctrl-C does: SLURM's time limit
    and preemption send it, and the resumed job may start on another host, where a left lock could not
    be judged). A lock left by a dead process on this host is taken over with a message; one held by
    a live process, or by another host, is a one-line UserError."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder = None
            if holder is None:  # being written this instant, or garbled by a crash: judge by its age
                try:
                    if time.time() - path.stat().st_mtime < 10:
                        time.sleep(0.5)
                        continue
                except FileNotFoundError:
                    continue
                print(f"kith: taking over the unreadable lock file '{path}'", file=sys.stderr)
            elif host != me["host"] or _pid_alive(pid):
                raise UserError(f"run folder '{run_dir}' is in use by pid {pid} on host {host} (lock file "
                                f"'{path}'); wait for that run to end, or delete the lock file if it is gone")
            else:
                print(f"kith: taking over the stale lock of pid {pid} (no longer running) in '{run_dir}'",
                      file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        break
    else:
        raise UserError(f"cannot lock run folder '{run_dir}' (lock file '{path}' keeps changing); try again")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def open_run_dir(stack: ExitStack, run_dir: Path, resume: bool, overwrite: bool,
                 device: torch.device) -> None:
    """Create and lock the run folder on rank 0 (the lock is released when `stack` closes), re-check it
    under the lock and, with `overwrite`, clear the old run. Every rank learns whether rank 0 succeeded,
    so no rank waits for one that stopped."""
    error = None
    if dist.is_main_process():
        try:
            stack.enter_context(locked(run_dir))
            check_run_dir(run_dir, resume, overwrite)  # again, now that no other run can change it
            if overwrite and not resume:
                clear_run(run_dir)
        except UserError as exc:
            error = exc
    if dist.world_size() > 1:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        torch.distributed.broadcast(failed, 0)
        if failed.item() and error is None:
            raise UserError(f"rank 0 could not open the run folder '{run_dir}' (its error says why)")
    if error is not None:
        raise error


def skipped_counts(train_data, test_data) -> dict[str, int]:
    return {"train": len(train_data.skipped), "test": len(test_data.skipped)}


def write_skipped_images(run_dir: Path, train_data, test_data) -> dict[str, int]:
    """The files data.skip_bad_images=true left out, listed in the run folder's bad_images.txt (rank 0);
    returns their count per split for the metrics start row."""
    skipped = train_data.skipped + test_data.skipped
    if skipped and dist.is_main_process():
        atomic_write_text(run_dir / "bad_images.txt", "".join(f"{p}\n" for p in skipped))
    return skipped_counts(train_data, test_data)
