"""The EMA (momentum network) helpers every momentum method uses, public for a training loop of your own.

    target = momentum_copy(online)                          # frozen copy, no gradients
    for step in range(total_steps):
        ...  # loss.backward(); optimizer.step()
        ema_update(target, online, cosine_tau(step, total_steps, 0.99, 1.0))
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float) -> float:
    """`τ = τ_final - (τ_final - τ_base) * (cos(π k / K) + 1) / 2` at step `k` of `K`: the EMA coefficient
    raised from `tau_base` to `tau_final` along a cosine (BYOL's schedule)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


def momentum_copy(online: nn.Module) -> nn.Module:
    """A deep copy of `online` whose parameters need no gradient: the EMA target to pass to `ema_update`."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """`θ_t ← τ θ_t + (1-τ) θ_o` for every parameter of `target` and its counterpart in `online` (same
    architecture), as one multi-tensor lerp. Buffers (BatchNorm statistics) are left as they are: the
    target keeps its own, as BYOL's does."""
    targets = list(target.parameters())
    onlines = [p.detach() for p in online.parameters()]
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update needs the same architecture: {len(targets)} target parameters, "
                         f"{len(onlines)} online")
    torch._foreach_lerp_(targets, onlines, 1 - tau)
