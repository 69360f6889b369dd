"""Method base class, config base classes and the registry.

A method declares the augmented views it needs (`config.views`, names of `augment` recipes),
owns its heads, momentum networks and queues, and turns one batch into `(loss, metrics)` in
`training_step`. The training loop treats every method the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kith.data.loader import Batch
from kith.memory import Queue
from kith.methods.context import EpochContext, StepInfo, TrainInfo
from kith.nn.ema import cosine_tau  # noqa: F401  (re-exported: methods and tests import it from here)
from kith.utils.errors import UserError
from kith.utils.keys import fraction

METHODS: dict[str, type[Method]] = {}
# a push `Method.enqueue` recorded: (queue, keys, labels, dataset indices)
PendingPush = tuple[Queue, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass
class MethodConfig:
    """A method's `method` config section. Each field declares its range and policy with
    `kith.utils.keys` (undeclared: >= 0, fixed for a run); rules across fields go in `check`."""

    name: str = ""  # the method: its registered name (`method=byol` is short for `method.name=byol`)
    # the two augment recipes the views are drawn from
    views: list[str] = field(default_factory=lambda: ["strong", "strong_solarize"])
    # multi-crop: recipe names of extra student-only crops, repeated as needed (e.g. 6 x small)
    extra_views: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise a one-line UserError naming `method.<key>` when fields that are each in range do not
        fit together; called by config validation after the range checks."""


@dataclass
class MomentumConfig(MethodConfig):
    tau_base: float = fraction(0.99)  # EMA coefficient at step 0, cosine-increased to tau_final
    tau_final: float = fraction(1.0)  # EMA coefficient at the last step


def register(cls: type[Method]) -> type[Method]:
    """Add a method to the registry under its config's `name` default (written once, in the Config)."""
    cls.name = cls.Config.name
    if not cls.name:
        raise ValueError(f"{cls.__name__}.Config needs a non-empty `name` default")
    METHODS[cls.name] = cls
    return cls


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
    # multi-crop: why the method refuses `method.extra_views` (one clause); "" = it takes them
    extra_views_refusal: ClassVar[str] = "its training step defines no loss for extra crops"

    def __init__(self, config: Any, backbone: nn.Module, feature_dim: int, info: TrainInfo):
        super().__init__()
        if len(config.views) != 2:  # every method contrasts or matches two views of an image
            raise UserError(f"{self.name} needs 2 views, got method.views={list(config.views)}")
        if list(config.extra_views) and self.extra_views_refusal:
            raise UserError(f"{self.name} does not take method.extra_views: {self.extra_views_refusal}; "
                            "remove method.extra_views")
        self.config = config
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.info = info
        self._momentum_pairs: list[tuple[str, str]] = []
        self._pending_pushes: list[PendingPush] = []  # recorded by `enqueue`, applied by `after_step`

    @property
    def views(self) -> list[str]:
        return list(self.config.views)

    @property
    def extra_views(self) -> list[str]:
        """`method.extra_views`: the recipes of the extra (student-only) crops, in order."""
        return list(self.config.extra_views)

    @staticmethod
    def crops(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """The crops of one extra-view tensor ``(n * B, ...)`` (crop-major), each ``(B, ...)``."""
        return list(x.split(batch_size))

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
        return cosine_tau(step, self.info.total_steps, self.config.tau_base, self.config.tau_final)

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
        if tau is not None:
            self.lerp_momentum(1 - tau)
        return tau

    @torch.no_grad()
    def lerp_momentum(self, weight: float | torch.Tensor) -> None:
        """θ_t ← θ_t + w (θ_o - θ_t) over every momentum pair, w = 1 - τ: a float, or a 0-dim device
        tensor (`train.cuda_graph`: filled before each replay; passed once per parameter, the list
        form, which reads nothing back, where a single tensor weight would be read to the host)."""
        targets, onlines = [], []
        for online, target in self.momentum_pairs():
            targets.extend(target.parameters())
            onlines.extend(p.detach() for p in online.parameters())
        if targets:
            weights = [weight] * len(targets) if torch.is_tensor(weight) else weight
            torch._foreach_lerp_(targets, onlines, weights)

    def graph_key(self) -> tuple:
        """Host state a step branches on (`train.cuda_graph` captures one graph per value): SPCL's
        whether-clustered. A method whose step reads a host value that changes must return it here."""
        return ()

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

    # ---- queue pushes: one rule ---------------------------------------------------------
    def enqueue(self, queue: Queue, keys: torch.Tensor, labels: torch.Tensor | None = None,
                indices: torch.Tensor | None = None) -> None:
        """Record a push of ``keys (B, D)`` (+ labels, dataset indices) into ``queue``; `after_step`
        applies every recorded push, in recording order.

        The rule for every queue: a step reads the queue as the previous step left it and changes
        nothing in it. Backward still needs the queue the loss read (no copy of it is kept), and an
        in-step push would move the queue's host-side pointer inside a compiled step."""
        self._pending_pushes.append((queue, keys, labels, indices))

    def push_before_lookup(self, queue: Queue, keys: torch.Tensor, labels: torch.Tensor | None = None,
                           indices: torch.Tensor | None = None) -> None:
        """Push ``keys`` into ``queue`` now, inside the step: the one exception to `enqueue`.

        For a method whose reference looks its neighbours up in a memory that already holds the current
        batch, so that each key is among its own neighbours (MSF, Koohpayegani et al. 2021: the official
        code enqueues the target before the kNN lookup; with k=1 the loss is BYOL's). The lookup of this
        same step must see the push, so it cannot wait for `after_step`; the price is a queue changed
        inside the step. It stays compile-safe: the queue's pointer is a device tensor, so the push
        changes no Python value a compiled step would guard on (the step compiles once)."""
        queue.push(keys, labels, indices)

    @torch.no_grad()
    def after_step(self) -> None:
        """Called by the train step after each optimizer step: applies the pushes this step's
        `training_step` recorded with `enqueue`, in order."""
        pending, self._pending_pushes = self._pending_pushes, []
        for queue, keys, labels, indices in pending:
            queue.push(keys, labels, indices)

    def step_inputs(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        """Tensors `training_step` reads from `step.inputs`, made before the step, outside a compiled one:
        what a compiled graph must not make itself (draws from a CPU generator seeded by the step, a
        pinned copy to the device), and a step number it must not see (a changing Python int recompiles
        it). The train step calls it eagerly before each forward; none by default."""
        return {}

    def training_step(self, views: list[torch.Tensor], batch: Batch, step: StepInfo
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics (floats or 0-dim tensors; None, or a NaN tensor, when unknown) for one batch.

        views: one normalised float tensor (B, 3, S, S) per name in `self.views`, then, with
        `method.extra_views`, one tensor (n * B, 3, s, s) per distinct extra crop size s (its n crops
        crop-major: `crops`), in order of first appearance in `extra_views`. Nothing here
        reads a device value back to the host (`.item()`, `bool(tensor)`, data-dependent shapes):
        that would stall every step on the GPU. A queue push goes through `enqueue`.
        """
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        # forward() is training_step so DistributedDataParallel can wrap a method as it is
        if self._pending_pushes:
            raise RuntimeError(
                f"{self.name}: {len(self._pending_pushes)} queue push(es) of the previous step are still "
                "pending; call after_step() after each step's optimizer step (TrainStep.optimize does) "
                "before the next forward")
        return self.training_step(views, batch, step)
