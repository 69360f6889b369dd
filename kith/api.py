"""The Python API: pretrain, evaluate, load_backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.errors import UserError
from kith.nn.backbones import build_backbone


def pretrain(preset: str | None = None, run_dir: str | Path | None = None, resume: bool = False,
             **overrides):
    """Train a method and return a `RunResult` (run folder, kNN of trained and random-init backbone).

    `kith.pretrain("cifar10/byol", **{"train.epochs": 5, "data.path": "data"})` is the same as
    `kith pretrain preset=cifar10/byol train.epochs=5 data.path=data`.
    """
    from kith.train import load_run_config, pretrain as run

    items = [f"{k}={v}" for k, v in overrides.items()]
    if preset:
        items.insert(0, f"preset={preset}")
    if resume:
        if run_dir is None:
            raise UserError("resume=True needs run_dir")
        cfg = load_run_config(run_dir, items)
    else:
        cfg = build_config(items)
    return run(cfg, run_dir=run_dir, resume=resume)


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """Checkpoint dict and its resolved config, from a run folder or a checkpoint file."""
    path = Path(path)
    file = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no checkpoint at '{file}'; pass a run folder or a .pt file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint '{file}': {exc}") from None
    if "config" not in ckpt:
        raise UserError(f"'{file}' is not a kith checkpoint (no config inside)")
    return ckpt, build_config([], base=OmegaConf.create(ckpt["config"]))


def backbone_state(method_state: dict) -> dict:
    """The online backbone's weights out of a method state_dict."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}


def load_backbone(path: str | Path) -> torch.nn.Module:
    """The trained online backbone of a run folder or checkpoint, in eval mode, on the CPU."""
    ckpt, cfg = load_checkpoint(path)
    backbone, _ = build_backbone(cfg.backbone.name, cfg.backbone.cifar_stem, cfg.backbone.width)
    backbone.load_state_dict(backbone_state(ckpt["method"]))
    return backbone.eval()


def evaluate(path: str | Path, ks: list[int] | None = None, device: str = "auto") -> dict[int, float]:
    """Weighted kNN top-1 (percent) of a run's backbone on its data's test split."""
    from kith.data.sources import load_splits, normalisation_stats
    from kith.evaluate import evaluate_knn
    from kith.train import resolve_device

    ckpt, cfg = load_checkpoint(path)
    backbone = load_backbone(path)
    dev = resolve_device(device)
    train, test = load_splits(cfg.data, cfg.seed)
    mean, std = normalisation_stats(cfg.data)
    return evaluate_knn(backbone.to(dev), train, test, cfg.data.size, mean, std, dev,
                        ks or list(cfg.eval.knn_k), cfg.eval.knn_temperature, cfg.eval.batch_size)
