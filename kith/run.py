"""The run folder: `config.yaml` (resolved config), `metrics.jsonl` (one writer, one tolerant
reader), `checkpoints/last.pt` (written atomically, read in one place) and `summary.json`
(written by `finish_run`, together with the final kNN evaluation)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kith import distributed as dist
from kith.config import build_config
from kith.errors import UserError

CHECKPOINT = "checkpoints/last.pt"  # relative to the run folder


# ---- files ----------------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with compiled code), which `torch.jit.load` runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _refusal(path: Path, exc: Exception) -> UserError | None:
    """The one-line error for a file that `torch.load(weights_only=True)` refused, or None for other
    errors."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"GLOBAL (\S+)", text)
    name = match.group(1) if match else "a Python object"
    if name.startswith("numpy"):
        return UserError(f"refusing to load '{path}': it pickles numpy objects, as checkpoints of an older "
                         f"kith do (numpy's RNG state), and kith unpickles only tensors and plain types; if "
                         f"you trust the file, convert it once with `kith upgrade-checkpoint {path}`")
    return UserError(f"refusing to load '{path}': it contains {name}, which is neither a tensor nor a plain "
                     "type, and unpickling it could run code; kith loads only weights-only files")


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """The one torch.load of kith: run checkpoints (resume) and files handed to the API (eval, export).

    `weights_only=True`: only tensors and plain types are unpickled, so a crafted file cannot run
    code; anything else is a one-line UserError (see `upgrade_checkpoint` for older kith files).
    """
    if is_torchscript(path):
        raise UserError(f"'{path}' is a TorchScript archive, not a checkpoint; kith runs TorchScript "
                        "code only from a file named explicitly to `kith eval --checkpoint` or "
                        "`kith.load_backbone`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = _refusal(Path(path), exc)
        if refusal is None:
            raise
        raise refusal from None


def upgrade_checkpoint(path: str | Path) -> Path:
    """Rewrite a checkpoint of an older kith (numpy's RNG state pickled) in the weights-only form.

    This unpickles the file in full, which runs any code a crafted file holds: only for files you trust.
    """
    from kith.rng import plain_rng_state

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("rng"), dict):
        obj["rng"] = plain_rng_state(obj["rng"])
    atomic_save(obj, path)
    load_file(path)  # what remains is weights-only, or the one-line refusal says what is not
    return path


def save_checkpoint(state: dict, run_dir: Path) -> None:
    atomic_save(state, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path, map_location: Any) -> dict:
    """The checkpoint a run resumes from (see `kith.train` for its keys)."""
    return load_file(run_dir / CHECKPOINT, map_location)


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

# keys a resume may change: they take effect and are logged as a `resume` row of metrics.jsonl. Every other
# key (method, backbone, data, batch size, seed, augmentations...) fixes what the checkpoint holds or
# what its data order and random streams replay, so changing it on resume is refused.
RESUMABLE_KEYS = ("train.epochs", "train.lr", "train.warmup_epochs", "train.weight_decay", "train.momentum",
                  "train.lars_eta", "train.lars_clip", "train.grad_clip", "train.precision", "train.device",
                  "train.checkpoint_every", "train.checkpoint_every_minutes", "train.knn_every",
                  "train.log_every", "train.progress", "train.logger", "train.sync_bn", "eval", "data.path",
                  "data.download", "data.num_workers", "data.resident", "data.resident_max_gb", "data.decode",
                  "out_dir", "run_name", "reference")


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


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: DictConfig, new: DictConfig) -> dict[str, dict]:
    """`{key: {"from": old value, "to": new value}}` for every leaf that differs."""
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    return {k: {"from": a.get(k), "to": b.get(k)}
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def resume_changes(saved_config: str, cfg: DictConfig) -> dict[str, dict]:
    """The keys `cfg` changes against the config the checkpoint was trained with (its YAML text);
    a one-line UserError naming them when any of them may not change on resume."""
    old = build_config([], base=OmegaConf.create(saved_config))
    changed = config_changes(old, cfg)
    refused = [k for k in changed if not (k in RESUMABLE_KEYS or k.split(".")[0] in RESUMABLE_KEYS)]
    if refused:
        what = ", ".join(f"{k} ({changed[k]['from']} -> {changed[k]['to']})" for k in refused)
        raise UserError(f"cannot change {what} on resume: the checkpoint was trained with the old value "
                        "(model shapes, method, data, batch and random streams are fixed for a run); start a "
                        "new run with --run-dir, or resume without it (resume may change train.epochs, "
                        "train.lr, logging, eval and device keys)")
    return changed


# ---- metrics --------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file ([] when it does not exist). A line that does not parse (the half-written
    last line of a killed run) is dropped instead of failing the whole read."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl (see `read_jsonl`)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _end_cleanly(path: Path) -> None:
    """Make `path` end with a newline before rows are appended: a last line without one is the torn row of
    a killed writer, cut away (or, when it parses, completed) so the next row is not glued to it."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    tail = data[data.rfind(b"\n") + 1:]
    try:
        json.loads(tail)
    except ValueError:
        with open(path, "r+b") as fh:
            fh.truncate(len(data) - len(tail))
        return
    with open(path, "ab") as fh:
        fh.write(b"\n")


class MetricsLog:
    """metrics.jsonl writer (rank 0 only); on resume drops rows logged after the checkpoint (at an epoch
    end or inside an epoch) and the final row.

    With `logger` tensorboard or wandb, numeric values are also sent there (tag `<kind>/<key>`).
    """

    def __init__(self, path: Path, keep_until_step: int | None = None, logger: str = "none",
                 config: DictConfig | None = None):
        self.path = path
        self.enabled = dist.is_main_process()
        self.sink = None
        if self.enabled and keep_until_step is not None and path.exists():
            def written_before(r: dict) -> bool:
                # an epoch_start row at the checkpoint's step opens the epoch after that checkpoint (a
                # mid-epoch one is never at an epoch's first step), so the resumed run writes it again
                if r.get("kind") == "epoch_start":
                    return r.get("step", 0) < keep_until_step
                return r.get("step", 0) <= keep_until_step and r.get("kind") != "final"

            kept = [r for r in read_jsonl(path) if written_before(r)]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.enabled and path.exists():
            _end_cleanly(path)
        if self.enabled and logger != "none":
            self.sink = _external_logger(logger, path.parent, config)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.sink is not None:
            kind, step = row.get("kind", "train"), row.get("step", 0)
            values = {f"{kind}/{k}": v for k, v in row.items()
                      if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            self.sink(values, step)


def _external_logger(name: str, run_dir: Path, config: DictConfig | None):
    """A `log(values, step)` callable for tensorboard or wandb (the `log` extra)."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))

            def log(values: dict, step: int) -> None:
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
                writer.flush()

            return log
        import wandb

        wandb.init(project="kith", name=run_dir.name, dir=str(run_dir),
                   config=OmegaConf.to_container(config) if config is not None else None)
        return lambda values, step: wandb.log(values, step=step)
    except ImportError:
        raise UserError(f"train.logger={name} needs {name}: pip install 'kith-ssl[log]'") from None


# ---- end of a run ---------------------------------------------------------------------------
def finish_run(run_dir: Path, cfg: DictConfig, backbone: torch.nn.Module, train_data, test_data,
               device: torch.device, log: MetricsLog, step: int, epochs_done: int, elapsed: float,
               images_per_s: float, final_eval: bool = True) -> tuple[dict[int, float], dict[int, float]]:
    """The end of a run on rank 0: the final kNN of the trained and of the random-init backbone
    (logged as the `final` metrics row), then summary.json. Returns `(knn, knn_random_init)`,
    empty when not evaluated: without `final_eval`, before `train.epochs` or without test labels.
    """
    from kith.data.sources import normalisation_stats
    from kith.nn.backbones import build_backbone
    from kith.probe import backbone_knn

    knn: dict[int, float] = {}
    knn_random: dict[int, float] = {}
    if not dist.is_main_process():
        return knn, knn_random
    if final_eval and epochs_done == cfg.train.epochs and test_data.has_labels:
        mean, std = normalisation_stats(cfg.data)
        e, progress = cfg.eval, cfg.train.progress

        def knn_of(net: torch.nn.Module) -> dict[int, float]:
            return backbone_knn(net, train_data, test_data, cfg.data.size, mean, std, device, list(e.knn_k),
                                e.knn_temperature, e.batch_size, progress)

        knn = knn_of(backbone)
        torch.manual_seed(cfg.seed)  # the same initial weights the trained backbone started from
        random_backbone, _ = build_backbone(cfg.backbone.name, cfg.backbone.cifar_stem, cfg.backbone.width)
        knn_random = knn_of(random_backbone.to(device))
        log.write({"kind": "final", "step": step, "epoch": epochs_done,
                   **{f"knn_top1@{k}": v for k, v in knn.items()},
                   **{f"random_init_knn_top1@{k}": v for k, v in knn_random.items()}})
    summary = {"method": cfg.method.name, "preset": cfg.preset, "data": cfg.data.name,
               "backbone": cfg.backbone.name,
               "epochs": epochs_done, "num_train": len(train_data), "num_test": len(test_data),
               "wall_time_s": elapsed, "images_per_s": images_per_s, "device": str(device),
               "world_size": dist.world_size(), "knn": knn, "knn_random_init": knn_random}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return knn, knn_random
