"""Optimisation: the LARS optimizer, weight-decay parameter groups, the optimizer a config asks for,
and the warmup-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from kith.methods.base import Method


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Per parameter: `local_lr = η ||w|| / (||g|| + wd ||w||)`; with `clip`, the adapted rate is
    `min(local_lr / lr, 1)` (never above the scheduled lr). Groups with `lars_exclude=True`
    (biases, norms) skip both adaptation and weight decay. `adapt=False` is plain momentum SGD
    (`torch.optim.SGD`'s arithmetic: weight decay added to the gradient, no rate adaptation).

    A group's `lr` may be a 0-dim tensor on the parameters' device (`train.cuda_graph`: the schedule
    fills it between graph replays); a float is the usual form. The two give the same update up to
    one rounding (`p - lr*u` as a product, not a fused `alpha`).

    `foreach=True` (the default) updates each group with multi-tensor `torch._foreach_*` ops: the
    norms, the weight decay, the momentum and the parameter update each take one call over the
    group instead of a handful of tiny kernels per parameter, and nothing is read back to the host.
    `foreach=False` is the plain per-parameter loop, kept as the reference (same arithmetic, same
    order; the tests hold the two equal).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip: bool = True, eps: float = 1e-8, foreach: bool = True,
                 adapt: bool = True):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "clip": clip,
                    "eps": eps, "lars_exclude": False, "foreach": foreach, "adapt": adapt}
        super().__init__(params, defaults)

    @staticmethod
    def _scale(group: dict, p_norm: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        """The LARS factor of each parameter from its weight and gradient norms (elementwise, so one
        call serves a single parameter's 0-dim norms or a whole group's stacked (n,) norms)."""
        local_lr = group["eta"] * p_norm / (g_norm + group["weight_decay"] * p_norm + group["eps"])
        if group["clip"]:
            lr = group["lr"]
            lr = lr.clamp_min(1e-12) if torch.is_tensor(lr) else max(lr, 1e-12)
            local_lr = torch.clamp(local_lr / lr, max=1.0)
        return torch.where((p_norm > 0) & (g_norm > 0), local_lr, torch.ones_like(local_lr))

    @staticmethod
    def _adapted(group: dict) -> bool:
        return group["adapt"] and not group["lars_exclude"]

    @staticmethod
    def _decays(group: dict) -> bool:
        return not group["lars_exclude"] and group["weight_decay"] != 0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._foreach_group if group["foreach"] else self._loop_group)(group, params)

    def _loop_group(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            d_p = p.grad
            if self._adapted(group):
                scale = self._scale(group, torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p))
                d_p = torch.add(d_p, p, alpha=group["weight_decay"]) * scale
            elif self._decays(group):
                d_p = torch.add(d_p, p, alpha=group["weight_decay"])
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d_p.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
            _apply_lr([p], [state["momentum_buffer"]], group["lr"])

    def _foreach_group(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if self._adapted(group):
            scale = self._scale(group, torch.stack(torch._foreach_norm(params)),
                                torch.stack(torch._foreach_norm(grads)))
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            # per-tensor 0-dim factors that stay on the device (a list of Python floats would sync)
            torch._foreach_mul_(updates, list(scale.unbind(0)))
        elif self._decays(group):
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            updates = grads
        fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
        for i in fresh:  # the first step only
            self.state[params[i]]["momentum_buffer"] = updates[i].clone()
        if len(fresh) < len(params):
            seen = set(fresh)
            old = [i for i in range(len(params)) if i not in seen]
            bufs = [self.state[params[i]]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [updates[i] for i in old])
        _apply_lr(params, [self.state[p]["momentum_buffer"] for p in params], group["lr"])


def _apply_lr(params: list[torch.Tensor], updates: list[torch.Tensor], lr: float | torch.Tensor) -> None:
    """`p ← p - lr·u` over the lists; a tensor `lr` stays on the device (an `alpha` would be read back)."""
    if torch.is_tensor(lr):
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


def split_decay_groups(groups: list[dict], weight_decay: float, exclude_bias_norm: bool = True) -> list[dict]:
    """Each method group split in two: weights (decay, LARS-adapted) and biases/norms (neither).

    `exclude_bias_norm=False` keeps biases/norms with the weights (decayed and adapted), as
    solo-learn's and MSF's SGD recipes do.
    """
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1 or not exclude_bias_norm]
        no_decay = [p for p in params if p.ndim <= 1 and exclude_bias_norm]
        extra = {k: v for k, v in group.items() if k != "params"}
        if decay:
            out.append({**extra, "params": decay, "weight_decay": weight_decay, "lars_exclude": False})
        if no_decay:
            out.append({**extra, "params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return out


def build_optimizer(method: Method, cfg: DictConfig, lr_device: torch.device | None = None
                    ) -> torch.optim.Optimizer:
    """Optimizer over the method's param groups; each group's `base_lr` is its scaled peak lr.

    `lr_device` (`train.cuda_graph`): each group's `lr` is a 0-dim tensor there, which `set_lr` fills
    between graph replays, and `sgd` is LARS without adaptation (torch.optim.SGD's arithmetic; its own
    update would read a tensor lr back to the host)."""
    t = cfg.train
    scaled_lr = t.lr * t.batch_size / 256
    groups = split_decay_groups(method.param_groups(), t.weight_decay, t.exclude_bias_norm_wd)
    for g in groups:
        g["base_lr"] = g.pop("lr", scaled_lr)  # a method's own lr (All4One's transformer) is not batch-scaled
        g["lr"] = g["base_lr"] if lr_device is None else torch.tensor(g["base_lr"], device=lr_device)
    if t.optimizer == "lars" or (t.optimizer == "sgd" and lr_device is not None):
        return LARS(groups, lr=scaled_lr, momentum=t.momentum, eta=t.lars_eta, clip=t.lars_clip,
                    adapt=t.optimizer == "lars")
    for g in groups:
        g.pop("lars_exclude")
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=scaled_lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=scaled_lr)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Each group's lr to `base_lr * factor`: a Python float, or filled into its device tensor (a kernel
    launch, no read back), so a captured step reads the new value."""
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(g["base_lr"] * factor)
        else:
            g["lr"] = g["base_lr"] * factor


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a checkpoint's optimizer state (momentum buffers, step counts) but keep the hyperparameters
    `build_optimizer` set from the config (base_lr, weight decay, momentum, LARS eta), so a resume override
    such as train.lr takes effect; unchanged, they are the saved values."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


