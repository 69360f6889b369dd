"""The run folder: `config.yaml` (resolved config), `metrics.jsonl` (one writer, one tolerant
reader), `checkpoints/last.pt` (written atomically, read in one place) and `summary.json`
(written by `finish_run`, together with the final kNN evaluation)."""

from __future__ import annotations

import json
import os
import time
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


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """The one torch.load of kith: run checkpoints (resume) and files handed to the API (eval, export)."""
    return torch.load(path, map_location=map_location, weights_only=False)


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
