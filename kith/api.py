"""The Python API: pretrain, evaluate (kNN), load_backbone; probe_run / probe_backbone \
(kNN + linear probe).

Each public function is an error boundary (`kith.utils.boundary.user_errors`): a failure caused by
the caller's input or environment (a missing or unwritable file, a full disk, a config or source that
does not parse, memory a set size cannot have) raises `kith.UserError` with one line; a bug keeps
its own exception."""

from __future__ import annotations

from pathlib import Path

import torch

from kith.config import build_config
from kith.evaluation.probe import probe_backbone
from kith.evaluation.readers import load_eval_target
from kith.runs.folder import load_run_config
from kith.train.loop import run_training
from kith.utils.boundary import user_errors
from kith.utils.errors import UserError


@user_errors
def pretrain(preset: str | None = None, run_dir: str | Path | None = None, resume: bool = False,
             overwrite: bool = False, **overrides):
    """Train a method and return a `RunResult` (run folder, kNN of trained and random-init backbone).

    `kith.pretrain("cifar10/byol", **{"train.epochs": 5, "data.path": "data"})` is the same as
    `kith pretrain preset=cifar10/byol train.epochs=5 data.path=data`. A `run_dir` that already
    holds a run needs `resume=True` (overrides: see `kith.train.loop.run_training`) or `overwrite=True`.
    """
    items = [f"{k}={v}" for k, v in overrides.items()]
    if preset:
        items.insert(0, f"preset={preset}")
    if resume:
        if run_dir is None:
            raise UserError("resume=True needs run_dir")
        cfg = load_run_config(run_dir, items)
    else:
        cfg = build_config(items)
    return run_training(cfg, run_dir=run_dir, resume=resume, overwrite=overwrite)


@user_errors
def load_backbone(path: str | Path, overrides: list[str] | None = None) -> torch.nn.Module:
    """The trained online backbone of a run folder, checkpoint or exported backbone file (state_dict,
    TorchScript or `torch.export` archive from `kith export`), in eval mode, on the CPU.

    `overrides` (`key=value`) name the network of a bare state_dict (`backbone.name=resnet18`); no data is
    needed to load a backbone."""
    return load_eval_target(path, overrides, need_data=False)[0]


@user_errors
def evaluate(path: str | Path, ks: list[int] | None = None, device: str = "auto") -> dict[int, float]:
    """Weighted kNN top-1 (percent) of a run's backbone on its data's test split (k: the run's eval.knn_k).

    `probe_run` adds the linear probe and more k values.
    """
    backbone, cfg, _ = load_eval_target(path)
    return probe_backbone(backbone, cfg, ks or list(cfg.eval.knn_k), linear=False, device=device)["knn"]
