"""The run's `metrics.jsonl`: one writer (rank 0, torn-line safe, trimmed to the checkpoint on
resume) that can mirror rows to tensorboard or wandb, and one tolerant reader."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kith.runs.files import append_line, atomic_write_text, read_jsonl
from kith.utils import distributed as dist
from kith.utils.errors import UserError
from kith.utils.files import atomic_write_bytes, check_no_symlink


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl (see `read_jsonl`)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _end_cleanly(path: Path) -> None:
    """Make `path` end with a newline before rows are appended: a last line without one is the torn row of
    a killed writer, cut away (or, when it parses, completed) so the next row is not glued to it. The
    file is rewritten whole (atomically), never truncated in place."""
    check_no_symlink(path, path.parent)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    tail = data[data.rfind(b"\n") + 1:]
    try:
        json.loads(tail)
    except ValueError:
        atomic_write_bytes(path, data[:len(data) - len(tail)], inside=path.parent)
        return
    atomic_write_bytes(path, data + b"\n", inside=path.parent)


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
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept), inside=path.parent)
        elif self.enabled and path.exists():
            _end_cleanly(path)
        if self.enabled and logger != "none":
            self.sink = _external_logger(logger, path.parent, config)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(row) + "\n", inside=self.path.parent)
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
        raise UserError(f"train.logger={name} needs {name}: pip install {name} (the log extra)") from None
