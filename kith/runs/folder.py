"""The run folder's lifecycle: its default name, config, the check before a run starts, the lock
that keeps a second writer out, clearing it on --overwrite, and the list of skipped images."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.files import atomic_write_text
from kith.runs.manifest import LOCK, check_overwrite, clear_run, write_manifest
from kith.utils import distributed as dist
from kith.utils.boundary import as_user_error
from kith.utils.errors import UserError, first_line


# ---- config ---------------------------------------------------------------------------------
def default_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / name


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a kith run folder (no config.yaml)")
    try:
        base = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001  (YAML syntax, python tags, bytes that are not text)
        raise UserError(f"'{path}' is damaged ({first_line(exc, 160)}): restore it from a backup, "
                        "or start a new run") from None
    if not isinstance(base, DictConfig):
        raise UserError(f"'{path}' is not a kith config (it holds no mapping of keys): restore it or start "
                        "a new run")
    return build_config(overrides or [], base=base)


# ---- the run folder's lifecycle ------------------------------------------------------------
def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a kith run (its config, metrics or checkpoints)."""
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is created: the run folder is a folder; a resume needs a checkpoint; a new run
    needs a folder without a run (unless `overwrite`, which needs the old run's manifest)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is a file, not a folder: give --run-dir a folder (new or a run's)")
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"cannot resume: no checkpoint at '{run_dir / CHECKPOINT}'")
    if not resume and not overwrite and holds_run(run_dir):
        raise UserError(f"'{run_dir}' already holds a run; continue it with --resume {run_dir} "
                        "(resume=True), or start over with --overwrite (overwrite=True), which deletes its "
                        "files")
    if overwrite and not resume:
        check_overwrite(run_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_lock(path: Path) -> tuple[int, str] | str | None:
    """(pid, host) of a lock file; "invalid" for JSON that names no usable pid (out of range: os.kill of
    a negative pid would signal a process group, a huge one overflows); None while it does not parse."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        pid, host = int(holder["pid"]), str(holder["host"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return "invalid"
    return (pid, host) if 0 < pid < 2**31 else "invalid"


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock file (created with O_EXCL) while the body runs; released on any exit,
    exceptions, Ctrl-C and SIGTERM included (`run_training` makes SIGTERM stop the run as Ctrl-C does,
    before the lock exists: SLURM's time limit and preemption send it, and the resumed job may start
    on another host, where a left lock could not be judged). A lock left by a dead process on this
    host is taken over with a message; one held by a live process, or by another host, is a one-line
    UserError; one that names no valid pid is garbled and judged by its age."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder == "invalid":  # complete, but names no process kith could ask about
                print(f"kith: taking over the invalid lock file '{path}'", file=sys.stderr)
            elif holder is None:  # being written this instant, or garbled by a crash: judge by its age
                try:
                    if time.time() - path.stat().st_mtime < 10:
                        time.sleep(0.5)
                        continue
                except FileNotFoundError:
                    continue
                print(f"kith: taking over the unreadable lock file '{path}'", file=sys.stderr)
            elif holder[1] != me["host"] or _pid_alive(holder[0]):
                pid, host = holder
                raise UserError(f"run folder '{run_dir}' is in use by pid {pid} on host {host} (lock file "
                                f"'{path}'); wait for that run to end, or delete the lock file if it is gone")
            else:
                print(f"kith: taking over the stale lock of pid {holder[0]} (no longer running) in "
                      f"'{run_dir}'", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        try:  # from here on the lock exists: any failure or signal removes it again
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        break
    else:
        raise UserError(f"cannot lock run folder '{run_dir}' (lock file '{path}' keeps changing); try again")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


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
            if not resume:
                write_manifest(run_dir)
        except Exception as exc:  # a read-only folder too: every rank must hear of it
            error = as_user_error(exc)
            if error is None:
                raise
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
        atomic_write_text(run_dir / "bad_images.txt", "".join(f"{p}\n" for p in skipped), inside=run_dir)
    return skipped_counts(train_data, test_data)
