"""Method base class, config base classes and the registry.

A method declares the augmented views it needs (`cfg.views`, names of `augment` recipes),
owns its heads, momentum networks and queues, and turns one batch into `(loss, metrics)` in
`training_step`. The training loop treats every method the same way.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kith.data.loader import Batch
from kith.methods.context import EpochContext, StepInfo, TrainInfo
from kith.utils.errors import UserError
from kith.utils.keys import fraction

METHODS: dict[str, type[Method]] = {}


@dataclass
class MethodConfig:
    """A method's `method` config section. Each field declares its range and policy with
    `kith.utils.keys` (undeclared: >= 0, fixed for a run); rules across fields go in `check`."""

    name: str = ""
    views: list[str] = field(default_factory=lambda: ["strong", "strong_solarize"])

    def check(self) -> None:
        """Raise a one-line UserError naming `method.<key>` when fields that are each in range do not
        fit together; called by config validation after the range checks."""


@dataclass
class MomentumConfig(MethodConfig):
    tau_base: float = fraction(0.99)  # EMA coefficient at step 0, cosine-increased to tau_final
    tau_final: float = fraction(1.0)


def register(cls: type[Method]) -> type[Method]:
    """Add a method to the registry under its config's `name` default (written once, in the Config)."""
    cls.name = cls.Config.name
    if not cls.name:
        raise ValueError(f"{cls.__name__}.Config needs a non-empty `name` default")
    METHODS[cls.name] = cls
    return cls


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float) -> float:
    """`τ = τ_final - (τ_final - τ_base) * (cos(π k / K) + 1) / 2` (SPEC, momentum networks)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings (≈ 1/sqrt(D) when healthy)."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


def label_agreement(labels: torch.Tensor, neighbour_labels: torch.Tensor) -> torch.Tensor:
    """Fraction of neighbour labels equal to the sample's label, over samples with a known label.

    labels: (B,), neighbour_labels: (B,) or (B, k). A 0-dim float tensor, NaN when no sample has
    a label (the loop's metric mean skips NaN steps); computed without reading anything back to
    the host, so it costs the step no device sync.
    """
    if neighbour_labels.dim() == 1:
        neighbour_labels = neighbour_labels[:, None]
    known = (labels >= 0)[:, None].expand_as(neighbour_labels)
    hits = ((neighbour_labels == labels[:, None]) & known).sum()
    count = known.sum()
    return torch.where(count > 0, hits / count.clamp_min(1), torch.nan)


class Method(nn.Module):
    """Base class: subclasses set `summary` and `Config` (whose `name` default names the method; `register`
    copies it to `name`) and implement `training_step`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig

    def __init__(self, cfg: Any, backbone: nn.Module, feature_dim: int, info: TrainInfo):
        super().__init__()
        if len(cfg.views) != 2:  # every method contrasts or matches two views of an image
            raise UserError(f"{self.name} needs 2 views, got method.views={list(cfg.views)}")
        self.cfg = cfg
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.info = info
        self._momentum_pairs: list[tuple[str, str]] = []
        self._deferred: list[Callable[[], None]] = []

    @property
    def views(self) -> list[str]:
        return list(self.cfg.views)

    # ---- momentum networks -------------------------------------------------------------
    def add_momentum_copy(self, online_name: str, momentum_name: str) -> nn.Module:
        """Register `self.<momentum_name>` as a frozen copy of `self.<online_name>`, EMA-updated each step."""
        online = getattr(self, online_name)
        target = copy.deepcopy(online)
        for p in target.parameters():
            p.requires_grad_(False)
        setattr(self, momentum_name, target)
        self._momentum_pairs.append((online_name, momentum_name))
        return target

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, a), getattr(self, b)) for a, b in self._momentum_pairs]

    def momentum_tau(self, step: int) -> float | None:
        if not self._momentum_pairs:
            return None
        return cosine_tau(step, self.info.total_steps, self.cfg.tau_base, self.cfg.tau_final)

    @torch.no_grad()
    def momentum_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(momentum_projector(momentum_backbone(x))), (B, D), no grad: the key / target /
        teacher of every method with a momentum backbone and projector."""
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=-1)

    @torch.no_grad()
    def update_momentum(self, step: int) -> float | None:
        """θ_t ← τ θ_t + (1-τ) θ_o for every momentum pair; returns τ (None without momentum networks).

        One multi-tensor lerp over all pairs' parameters (θ_t + (1-τ)(θ_o - θ_t), the same update),
        with τ a Python float: no per-tensor kernels, nothing read back from the device."""
        tau = self.momentum_tau(step)
        if tau is None:
            return None
        targets, onlines = [], []
        for online, target in self.momentum_pairs():
            targets.extend(target.parameters())
            onlines.extend(p.detach() for p in online.parameters())
        torch._foreach_lerp_(targets, onlines, 1 - tau)
        return tau

    # ---- hooks -------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer; a group may set its own base `lr`."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> dict[str, float]:
        """Called before each epoch (SPCL re-clusters here). Returns metrics to log."""
        return {}

    def on_resume_mid_epoch(self, epoch: int, ctx: EpochContext) -> None:
        """Called instead of `on_epoch_start` when a run resumes inside `epoch`: what that epoch's
        `on_epoch_start` computed is in the restored state_dict (re-running it on the later state would
        differ), so only state outside the state_dict is to be rebuilt here."""

    def defer(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` at `after_step`, once backward and the optimizer step are done: for
        in-place state updates (queue pushes) that must follow the loss but would otherwise
        overwrite a tensor autograd saved for backward, or force a copy of it."""
        self._deferred.append(functools.partial(fn, *args))

    @torch.no_grad()
    def after_step(self) -> None:
        """Called by the loop after each optimizer step: runs what this step's `training_step`
        deferred, in order."""
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()

    def training_step(self, views: list[torch.Tensor], batch: Batch, step: StepInfo
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics (floats or 0-dim tensors; None, or a NaN tensor, when unknown) for one batch.

        views: one normalised float tensor (B, 3, S, S) per name in `self.views`. Nothing here
        reads a device value back to the host (`.item()`, `bool(tensor)`, data-dependent shapes):
        that would stall every step on the GPU. An in-place update of state the loss has read (a
        queue push) goes through `defer`.
        """
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo):
        # forward() is training_step so DistributedDataParallel can wrap a method as it is.
        # A caller that never calls after_step (a benchmark timing bare steps) still gets the
        # deferred updates, before this step reads the state they update.
        self.after_step()
        return self.training_step(views, batch, step)
