"""Colour jitter on a batch, every sample with its own four factors and its own order of the four ops
(torchvision's ``ColorJitter`` draws a new permutation per image): the draws (`jitter_bounds`,
`_draw_jitter`) and their batched application (`_jitter_slots`), used by `kith.data.augment.BatchAugment`.
``_apply_masked`` is the one way an op with an apply-probability runs on its drawn samples only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kith.data.ops import _gray, adjust_hue
from kith.utils.device import to_device

__all__ = ["color_jitter", "jitter_bounds"]


def _jitter_range(strength: float, center: float, floor: float | None) -> tuple[float, float] | None:
    """ColorJitter's ``_check_input``: ``[center - s, center + s]`` (clipped at ``floor``),
    None when the op is disabled."""
    if strength == 0:
        return None
    lo = center - strength
    if floor is not None:
        lo = max(lo, floor)
    return lo, center + strength


def jitter_bounds(strengths: tuple[float, float, float, float]) -> tuple[Tensor, Tensor]:
    """The ``(4,)`` float CPU tensors ``lo, hi`` of the four jitter factors' ranges (0, 0 for a disabled
    op), from the strengths of brightness, contrast, saturation, hue."""
    b, c, s, h = strengths
    ranges = (
        _jitter_range(b, 1.0, 0.0),
        _jitter_range(c, 1.0, 0.0),
        _jitter_range(s, 1.0, 0.0),
        _jitter_range(h, 0.0, None),
    )
    lo = torch.tensor([r[0] if r else 0.0 for r in ranges])
    hi = torch.tensor([r[1] if r else 0.0 for r in ranges])
    return lo, hi


def _draw_jitter(
    batch: int, strengths: tuple[float, float, float, float], generator: torch.Generator,
    bounds: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample colour-jitter draws on the generator's device, in this order: the keys of
    a uniform random permutation of the 4 ops, then the 4 factors. Returns ``order``
    ``(B, 4)`` long (op ids 0-3 = brightness, contrast, saturation, hue, by position) and
    ``factors`` ``(B, 4)`` float (0 for a disabled op). ``bounds``: ``jitter_bounds(strengths)``
    already on the generator's device (made here when None: a host-to-device copy)."""
    dev = generator.device
    order = torch.argsort(torch.rand(batch, 4, generator=generator, device=dev), dim=1)
    u = torch.rand(batch, 4, generator=generator, device=dev)
    lo, hi = bounds or (t.to(dev) for t in jitter_bounds(strengths))
    return order, lo + (hi - lo) * u


def _apply_masked(x: Tensor, sel: Tensor, fn: Callable[..., Tensor], param: Tensor | None = None,
                  whole_batch: bool = False) -> Tensor:
    """Replace the samples of x picked by the (B,) bool ``sel`` with ``fn(x[sel], param[sel])``
    (``fn(x[sel])`` without param). May modify x in place; returns the result.

    On CPU the op runs on the selected subset only (index_select/index_copy_, much
    cheaper than advanced indexing), so its cost follows its apply-probability. On GPU
    (and with ``whole_batch``: inside a captured graph, whose shapes may not follow the draws)
    it runs on the whole batch and ``torch.where`` keeps the selected samples: no host
    sync to count the subset, and the spare arithmetic is cheap there. Every op here is
    per-sample, so both give the same values."""
    if whole_batch or x.device.type != "cpu":
        out = fn(x) if param is None else fn(x, param)
        return torch.where(sel.view(-1, 1, 1, 1), out, x)
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    sub = x.index_select(0, idx)
    out = fn(sub) if param is None else fn(sub, param.index_select(0, idx))
    return x.index_copy_(0, idx, out)


def _jitter_slots(
    x: Tensor, order: Tensor, factors: Tensor, apply_mask: Tensor, enabled: Sequence[bool],
    whole_batch: bool = False,
) -> Tensor:
    """Colour jitter from drawn parameters (see ``_draw_jitter``), all on x's device, in
    place on x (which is returned).

    The per-sample order is realised as 4 slots; in slot k every sample applies the op its
    permutation puts at position k. Brightness, contrast and saturation are one formula,
    ``clamp(a x + b gray + c mean(gray))`` with per-sample ``(a, b, c)`` (``(f, 0, 0)``,
    ``(f, 0, 1 - f)``, ``(f, 1 - f, 0)``, and ``(1, 0, 0)`` for no op, which leaves x exactly
    as it is), so each slot is a handful of whole-batch kernels whatever the mix of ops;
    hue, which is no blend, runs on its own samples (``_apply_masked``, with ``whole_batch``)."""
    B = x.shape[0]
    live = apply_mask.view(B, 1)
    fb, fc, fs, fh = factors.unbind(dim=1)
    is_op = [(order == i) & live if on else None for i, on in enumerate(enabled)]
    a = torch.ones_like(factors)
    b = torch.zeros_like(factors)
    c = torch.zeros_like(factors)
    for sel, f in zip(is_op[:3], (fb, fc, fs)):
        if sel is not None:
            a = torch.where(sel, f.view(B, 1), a)
    if is_op[1] is not None:
        c = torch.where(is_op[1], 1.0 - fc.view(B, 1), c)
    if is_op[2] is not None:
        b = torch.where(is_op[2], 1.0 - fs.view(B, 1), b)
    a, b, c = (v.to(x.dtype).T.reshape(4, B, 1, 1, 1) for v in (a, b, c))
    uses_gray = is_op[1] is not None or is_op[2] is not None
    for k in range(4):
        # in place: a new image-sized tensor per op costs more than the op (the CPU
        # allocator does not cache, so each one is fresh pages); no addcmul, which is
        # several times slower with per-sample broadcast factors
        if uses_gray:
            gray = _gray(x)
            mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
            offset = gray.mul_(b[k]).add_(mean.mul_(c[k]))
            x.mul_(a[k]).add_(offset).clamp_(0.0, 1.0)
        elif any(enabled[:3]):
            x.mul_(a[k]).clamp_(0.0, 1.0)
        if is_op[3] is not None:
            x = _apply_masked(x, is_op[3][:, k], adjust_hue, fh, whole_batch)
    return x


def color_jitter(
    x: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
    apply_mask: Tensor | None = None,
) -> Tensor:
    """``ColorJitter(brightness, contrast, saturation, hue)`` with, per sample, its own
    four factors and its own random order of the four ops (torchvision draws a new
    permutation on every call, i.e. for every image).

    x: ``(B, 3, H, W)`` float in [0, 1]; apply_mask: ``(B,)`` bool (None = all) → same
    shape; samples outside the mask are returned unchanged. A strength of 0 disables
    its op (torchvision's ``None``). Draws: permutation keys ``rand(B, 4)``, then factors
    ``rand(B, 4)`` from ``generator``.
    """
    B = x.shape[0]
    strengths = (brightness, contrast, saturation, hue)
    order, factors = _draw_jitter(B, strengths, generator)
    if apply_mask is None:
        apply_mask = torch.ones(B, dtype=torch.bool)
    order, factors, apply_mask = (to_device(t, x.device) for t in (order, factors, apply_mask))
    return _jitter_slots(x.clone(), order, factors.to(x.dtype), apply_mask, [s != 0 for s in strengths])
