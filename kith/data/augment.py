"""Batched, per-sample image augmentations on CPU or GPU tensors.

Every image of a batch gets its own random parameters (crop box, jitter factors, jitter
order, blur sigma) and its own apply-probability draw, computed with tensor ops on the
batch's device: no PIL, no Python loop over the images of a batch.

Randomness comes only from an explicit ``torch.Generator``. The small parameter tensors
are drawn on the generator's device (the CPU by default) and then moved to the batch's
device, so one seed gives the same parameters, hence the same views up to float
rounding, on every device (a generator on the batch's device, ``data.augment_rng=device``,
gives that device's random stream instead). Each call draws the same number of random values whatever
the probabilities are, so changing one probability does not shift the other draws.

Speed on CPU comes from few, whole-batch kernels working in place (an image-sized
temporary costs fresh pages: torch's CPU allocator does not cache), one intra-op thread
(``BatchAugment.cpu_threads``), and costs that follow the apply-probabilities only where
that needs no host sync (hue, blur on CPU). On GPU nothing reads a value back to the host:
all parameters go over in one non-blocking copy (or are drawn there, ``data.augment_rng=device``)
and masks are arithmetic or ``where``.

The per-sample tensor ops themselves (crop, flip, jitter factors, grayscale, solarize,
blur) are pure functions in ``kith.data.ops``; this module draws their parameters (the colour
jitter's draws and application are in ``kith.data.jitter``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kith.data.jitter import _apply_masked, _draw_jitter, _jitter_slots, color_jitter, jitter_bounds
from kith.data.ops import _gray, blur_kernel_size, gaussian_blur, normalize, resized_crop, to_float
from kith.data.spec import ImageSpec
from kith.utils.device import cpu_threads, to_device
from kith.utils.keys import Range, fraction, key, positive

__all__ = ["BatchAugment", "ViewConfig", "clean_view", "color_jitter", "default_views", "jitter_bounds",
           "sample_crop_boxes"]


_AREA = Range(0, 1, low_open=True)  # a crop of no area has no pixels


@dataclass
class ViewConfig:
    """One augmentation recipe. ``size``: the output side in pixels (None: ``data.size``; multi-crop
    recipes set their own, e.g. 96). Strengths follow ``torchvision.transforms.ColorJitter``:
    brightness/contrast/saturation ``s`` draw a factor in ``[max(0, 1-s), 1+s]``, hue
    ``h`` draws a shift in ``[-h, h]``; a strength of 0 disables that op."""

    size: Optional[int] = key(None, range=Range(8))  # output side; None = data.size
    min_scale: float = key(0.08, range=_AREA, at_most="max_scale")  # crop area fraction
    max_scale: float = key(1.0, range=_AREA)  # largest crop area fraction
    min_ratio: float = positive(3 / 4, at_most="max_ratio")  # crop aspect ratio
    max_ratio: float = positive(4 / 3)  # largest crop aspect ratio
    brightness: float = 0.4  # jitter strength s: a factor drawn in [max(0, 1-s), 1+s]
    contrast: float = 0.4  # jitter strength, as brightness
    saturation: float = 0.2  # jitter strength, as brightness
    hue: float = key(0.1, range=Range(0, 0.5))  # a shift beyond half the hue circle wraps around
    jitter_prob: float = fraction(0.8)  # probability of the colour jitter
    gray_prob: float = fraction(0.2)  # probability of greyscale
    blur_prob: float = fraction(0.0)  # probability of a Gaussian blur
    blur_sigma_min: float = positive(0.1, at_most="blur_sigma_max")  # blur sigma drawn in [min, max]
    blur_sigma_max: float = positive(2.0)  # largest blur sigma
    solarize_prob: float = fraction(0.0)  # probability of solarize (threshold 0.5)
    flip_prob: float = fraction(0.5)  # probability of a horizontal flip


def default_views() -> dict[str, ViewConfig]:
    """kith's named view recipes, the defaults of `augment.*`.

    - ``strong``: RandomResizedCrop(scale 0.08–1), ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
      Grayscale p=0.2, HorizontalFlip p=0.5 (solo-learn's CIFAR recipe).
    - ``strong_solarize``: ``strong`` + Solarize p=0.2, the second view of asymmetric
      (BYOL-style) recipes.
    - ``weak``: RandomResizedCrop(scale 0.2–1) + HorizontalFlip p=0.5 (ReSSL / MSF teacher).
    """
    strong = ViewConfig()
    return {
        "strong": strong,
        "strong_solarize": replace(strong, solarize_prob=0.2),
        "weak": replace(strong, min_scale=0.2, jitter_prob=0.0, gray_prob=0.0),
    }


# --------------------------------------------------------------------------- helpers


def clean_view(images: Tensor, spec: ImageSpec) -> Tensor:
    """Deterministic evaluation view: images ``(B, 3, H, W)`` uint8 or float →
    float32 ``(B, 3, spec.size, spec.size)``, resized (bilinear, antialiased) only when H or W
    differ from ``spec.size``, then normalised with the spec's mean and std."""
    x = to_float(images).to(torch.float32)
    size = spec.size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)  # bilinear+antialias can overshoot slightly
    return normalize(x, spec.mean, spec.std)


# --------------------------------------------------------------------------- geometry


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> Tensor:
    """Random resized-crop boxes, one per sample, with the semantics of torchvision's
    ``RandomResizedCrop.get_params``: up to 10 tries of (area fraction ~ U(scale),
    log aspect ratio ~ U(log ratio)), rounded to integer sides; the first try that fits
    wins and its position is uniform; if none fits, the centre crop clipped to the
    ratio range. All 10 tries are drawn at once for every sample.

    Returns a float ``(batch, 4)`` tensor of ``top, left, h, w`` (integers stored as
    float) on the generator's device.
    """
    dev = generator.device
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # float64 so the rounding of the sides behaves as torchvision's Python-float math
    u_area = torch.rand(batch, 10, generator=generator, device=dev, dtype=torch.float64)
    u_ratio = torch.rand(batch, 10, generator=generator, device=dev, dtype=torch.float64)
    u_pos = torch.rand(batch, 2, generator=generator, device=dev, dtype=torch.float64)

    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round is round-half-to-even, like Python's round() used by torchvision
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(dim=1)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first True
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # Fallback: the central crop whose aspect ratio is clipped to the allowed range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))

    # randint(0, n) == floor(U * n) with n = number of valid offsets
    top = torch.floor(u_pos[:, 0] * (height - h + 1)).clamp_(max=height - h)
    left = torch.floor(u_pos[:, 1] * (width - w + 1)).clamp_(max=width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.float32)


# --------------------------------------------------------------------------- pipeline


class BatchAugment:
    """One view recipe applied to a whole batch, every sample with its own parameters.

    Order (torchvision's, as solo-learn composes it): random resized crop → colour jitter
    (p) → grayscale (p) → Gaussian blur (p) → solarize (p) → horizontal flip (p) →
    normalise. The blur kernel is ``blur_kernel_size(size)``. The flip is done by the
    crop (mirrored sampling grid): every later op is per pixel, per image or mirror
    symmetric (blur), so this equals flipping last up to float rounding.

    ``__call__(images, generator, copies=1)``: images ``(B, 3, H, W)`` uint8 (or float in [0, 1])
    on any device → float32 ``(copies * B, 3, size, size)`` on the same device, normalised; with
    ``copies`` > 1, each image's crops are independent draws, crop-major (multi-crop). ``size`` is the
    recipe's own (``ViewConfig.size``), else the spec's.

    Draws, all from ``generator`` in this order and whatever the probabilities:
    crop boxes (``sample_crop_boxes``), ``rand(B, 5)`` for the apply-probabilities of
    jitter, gray, blur, solarize, flip, ``rand(B)`` for the blur sigma, then the colour
    jitter's (``color_jitter``). They are drawn on the generator's device: a CPU generator's
    reach the images' device in one non-blocking copy; a generator on the images' device
    (``data.augment_rng=device``) needs no copy, and the call then makes no tensor from host
    values after its first call on that device, so a CUDA graph can capture it. Nothing after the
    draws reads a value back to the host.

    ``whole_batch``: run the probabilistic ops on every sample and keep the drawn ones (as on GPU)
    on CPU too, instead of on the drawn subset, whose size would change the shapes from call to
    call; set for an augmentation inside a captured graph (identical values).

    ``cpu_threads``: torch intra-op threads for the call's CPU work (all of it for CPU
    batches, the parameter draws for GPU ones); None leaves torch's setting alone.
    Default 1. With 2+ threads every kernel above torch's grain size (and some smaller
    ones: the float64 sqrt/round/exp of the crop draws) ends at a barrier where each
    thread waits for the others; when another process holds a core that wait is a
    scheduler time slice, milliseconds per kernel (on a loaded 2-core machine 2 threads
    ran 10-30x slower than 1, see benchmarks/augment_speed.py). On a quiet machine a
    second thread gains well under 2x on these small images. One thread also makes the
    views bitwise independent of torch's thread setting.

    ``crop=False``: the images are already this view's crops (``size x size``, flipped where drawn,
    cut by the streaming loader's workers); only the photometric part runs, consuming the same draws.
    """

    cpu_threads: int | None = 1
    whole_batch: bool = False
    # the views' dtype and layout (`write_views_as`): float32, contiguous unless set
    out_dtype: torch.dtype = torch.float32
    out_memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self, view: ViewConfig, spec: ImageSpec):
        # a config node read per step costs ~10 us per key (about 25 keys a call): read it once here
        self.view = OmegaConf.to_object(view) if isinstance(view, DictConfig) else view
        self.size, self.mean, self.std = self.view.size or spec.size, spec.mean, spec.std
        self.blur_kernel = blur_kernel_size(self.size)
        self._affine: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.strengths = (self.view.brightness, self.view.contrast, self.view.saturation, self.view.hue)
        self._bounds_cpu = jitter_bounds(self.strengths)
        self._bounds: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchAugment(size={self.size}, view={self.view})"

    def _normalization(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(1 / std, -mean / std)`` on `device`, made once per device: creating them from Python
        values on a GPU would sync, and `render` (perhaps compiled, or inside a captured graph) only
        reads them, so `_augment` makes them before it."""
        if device not in self._affine:
            m = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            self._affine[device] = ((1.0 / s).float().to(device), (-m / s).float().to(device))
        return self._affine[device]

    def _normalize(self, x: Tensor) -> Tensor:
        """In place, ``(x - mean) / std`` as ``x * (1 / std) + (-mean / std)``."""
        scale, shift = self._affine[x.device]
        return x.mul_(scale).add_(shift)

    def compile(self, backend: str = "inductor") -> BatchAugment:
        """`render` through `torch.compile` (one graph, `fullgraph`): a view's few hundred elementwise
        kernels fuse into a few, each reading and writing the batch once. The random draws stay eager
        (a generator does not trace). The probabilistic ops then run on the whole batch (`whole_batch`):
        a subset's size would follow the draws. One compiled graph per recipe and input shape."""
        self.whole_batch = True
        self.render = torch.compile(self.render, backend=backend, fullgraph=True, dynamic=False)
        return self

    def write_views_as(self, dtype: torch.dtype, memory_format: torch.memory_format) -> BatchAugment:
        """Write the views in `dtype` and `memory_format`, e.g. bf16 channels_last for a convolutional
        network under bf16 autocast: the first convolution casts its input to bf16 anyway (the same
        rounding), so the values it sees are unchanged, and the float32 view, its channels_last copy
        and its cast are never written (compiled, the conversion fuses into the rendering's last
        kernel)."""
        self.out_dtype, self.out_memory_format = dtype, memory_format
        return self

    def _jitter_bounds(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The jitter ranges on `device`, copied there once."""
        if device not in self._bounds:
            self._bounds[device] = tuple(t.to(device) for t in self._bounds_cpu)
        return self._bounds[device]

    def __call__(self, images: Tensor, generator: torch.Generator, crop: bool = True, copies: int = 1
                 ) -> Tensor:
        # the parameter draws run on the generator's device: the CPU by default, for GPU batches too
        with cpu_threads(self.cpu_threads):
            return self._augment(images, generator, crop, copies)

    def _augment(self, images: Tensor, generator: torch.Generator, crop: bool, copies: int) -> Tensor:
        recipe = self.view
        B, _, H, W = images.shape
        if not crop and ((H, W) != (self.size, self.size) or copies != 1):
            raise ValueError(f"crop=False needs {self.size}x{self.size} crops (copies=1), got {H}x{W}")
        B *= copies  # the output's samples: `copies` crops of each image, crop-major
        gdev = generator.device
        dev = images.device

        boxes = sample_crop_boxes(
            B, H, W, (recipe.min_scale, recipe.max_scale), (recipe.min_ratio, recipe.max_ratio), generator
        )
        u = torch.rand(B, 5, generator=generator, device=gdev)
        sigma = recipe.blur_sigma_min + (recipe.blur_sigma_max - recipe.blur_sigma_min) * torch.rand(
            B, generator=generator, device=gdev
        )
        order, factors = _draw_jitter(B, self.strengths, generator, self._jitter_bounds(gdev))
        params = torch.cat([boxes, u, sigma.view(B, 1), order.float(), factors.float()], dim=1)
        self._normalization(dev)  # made here: render only reads them
        return self.render(images, to_device(params, dev), crop, copies)

    def render(self, images: Tensor, params: Tensor, crop: bool, copies: int) -> Tensor:
        """The view from drawn parameters: images ``(B, 3, H, W)`` and ``params`` ``(copies * B, 18)``
        on one device (crop box 4, apply draws 5, blur sigma 1, jitter order 4 and factors 4) →
        normalised ``(copies * B, 3, size, size)``, float32 contiguous unless `write_views_as` said
        otherwise. Tensor ops only, no random draw."""
        recipe = self.view
        B = params.shape[0]
        boxes, u, sigma, order, factors = params.split([4, 5, 1, 4, 4], dim=1)
        strengths = self.strengths
        probs = (recipe.jitter_prob, recipe.gray_prob, recipe.blur_prob, recipe.solarize_prob,
                 recipe.flip_prob)
        jitter_m, gray_m, blur_m, sol_m, flip_m = (u[:, i] < p for i, p in enumerate(probs))

        x = to_float(images).to(torch.float32)
        if crop:  # else the workers already cut (and flipped) this view
            x = resized_crop(x, boxes, self.size, flip_m if recipe.flip_prob > 0 else None, copies)
        enabled = [s != 0 for s in strengths]
        if recipe.jitter_prob > 0 and any(enabled):
            x = _jitter_slots(x, order.long(), factors, jitter_m, enabled, self.whole_batch)
        # lerp with a 0/1 weight returns one end exactly; torch.where is ~5x slower on CPU
        if recipe.gray_prob > 0:
            x.lerp_(_gray(x).expand_as(x), gray_m.to(x.dtype).view(B, 1, 1, 1))
        if recipe.blur_prob > 0:
            x = _apply_masked(x, blur_m, lambda t, s: gaussian_blur(t, s, self.blur_kernel), sigma.view(B),
                              self.whole_batch)
        if recipe.solarize_prob > 0:
            # solarize at 0.5 is min(x, 1 - x) bitwise (1 - x is exact for x >= 0.5); the
            # samples not drawn get min(x, 3 - x) = x
            torch.minimum(x, torch.sub(torch.where(sol_m, 1.0, 3.0).view(B, 1, 1, 1), x), out=x)
        x = self._normalize(x)
        if self.out_dtype != x.dtype or self.out_memory_format != torch.contiguous_format:
            x = x.to(dtype=self.out_dtype, memory_format=self.out_memory_format)
        return x
