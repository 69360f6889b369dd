"""The setup sequence shared by the training loop, `kith bench` and the GPU benchmark: device,
seed, data, method, optimiser and step, built once from the root config, in one order (the seed
before anything draws from the global generators, so every caller gets the same initial weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.data.loader import ResidentLoader, StreamingLoader, is_resident, make_train_loader
from kith.data.sources import ImageData, load_splits
from kith.methods import get_method_class
from kith.methods.base import Method
from kith.methods.context import TrainInfo
from kith.nn.backbones import build_backbone
from kith.train.capacity import check_training_memory
from kith.train.online_linear import build_online_linear
from kith.train.step import TrainStep
from kith.utils import distributed as dist
from kith.utils import rng
from kith.utils.device import resolve_device
from kith.utils.errors import UserError


@dataclass
class Setup:
    """What a run trains with: this rank's device, both splits (the training split as its loader
    serves it), the loader and the step (method, optimizer, scaler, augmentations)."""

    rank: int
    world: int
    device: torch.device
    train_data: ImageData
    test_data: ImageData
    loader: ResidentLoader | StreamingLoader  # `len()`: steps per epoch
    trainer: TrainStep

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


def run_device(cfg: DictConfig) -> torch.device:
    """This process's device: its GPU under torchrun (joining the process group), else `train.device`."""
    return dist.setup_from_env() or resolve_device(cfg.train.device)


def setup(cfg: DictConfig, device: torch.device | None = None, list_dir: str | Path | None = None) -> Setup:
    """Seed, load the data (`list_dir`: where a list of bad images goes), build the loader and the
    step for this rank. Refuses a batch size that leaves no full batch, and sizes the device cannot hold
    (`kith.train.capacity`)."""
    device = device or run_device(cfg)
    rank, world = dist.rank(), dist.world_size()
    rng.seed_everything(cfg.seed)
    train_data, test_data = load_splits(cfg.data, cfg.seed, list_dir=list_dir)
    check_training_memory(cfg, device, len(train_data), is_resident(train_data, cfg.data), world)
    loader, train_data = make_train_loader(train_data, cfg, device, cfg.seed, rank, world)
    if len(loader) == 0:
        raise UserError(f"train.batch_size={cfg.train.batch_size} leaves no full batch of the "
                        f"{len(train_data)} images")
    trainer = build_trainer(cfg, device, len(train_data), len(loader), rank, world)
    if cfg.train.online_linear:
        trainer.online = build_online_linear(trainer.method.backbone, trainer.method.feature_dim, train_data,
                                             device)
    return Setup(rank, world, device, train_data, test_data, loader, trainer)


def build_trainer(cfg: DictConfig, device: torch.device, num_samples: int, steps_per_epoch: int,
                  rank: int = 0, world: int = 1) -> TrainStep:
    """The method (initialised from the global generators as they stand) inside its `TrainStep`."""
    info = TrainInfo(num_samples=num_samples, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
                     seed=cfg.seed)
    return TrainStep(cfg, build_method(cfg, info), device, steps_per_epoch, rank, world)


def build_method(cfg: DictConfig, info: TrainInfo) -> Method:
    backbone, feature_dim = build_backbone(cfg.backbone)
    # the method's own Config dataclass, not the DictConfig: plain attributes are constants to torch.compile
    # (tracing OmegaConf's __getattr__ breaks the graph) and cheaper to read every step
    method_cfg = OmegaConf.to_object(cfg.method)
    return get_method_class(cfg.method.name)(method_cfg, backbone, feature_dim, info)
