"""Per-sample image ops on float batches ``(B, 3, H, W)`` with explicit per-sample parameters.

The per-op functions take explicit per-sample parameters and match
``torchvision.transforms.v2.functional`` applied image by image on float images in
[0, 1] to within 1e-6 (hue, blur: 1e-6 to 1e-5; the tests pin this). Known differences:

- ``resized_crop`` is bilinear without antialiasing. For upscaling (every crop of a
  CIFAR image resized to 32) it equals torchvision's ``resized_crop(..., antialias=False)``
  and its antialiased default alike (antialias is a no-op when upscaling). When a crop is
  downscaled (large images to 224) the antialias filter is not reproduced: on white
  noise, the worst case, 64→32 crops differ by 0.08 on average.
- Against torchvision's PIL path (the usual per-image pipeline), which rounds to uint8
  after every op: crop, brightness, contrast and saturation differ by about 1/255;
  PIL's hue works on 8-bit HSV and differs by up to ~0.06 (mean 0.004); grayscale uses
  the tensor weights (0.2989, 0.587, 0.114) rather than PIL's integer 299/587/114.
- ``solarize`` thresholds floats at 0.5, which for multiples of 1/255 is PIL's
  threshold 128; PIL solarizes the re-quantised uint8 image, kith the float one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kith.utils.device import to_device

# torchvision's tensor kernels use 0.2989 (not PIL's 0.299); we match the tensor kernels.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def to_float(images: Tensor) -> Tensor:
    """uint8 ``(..., 3, H, W)`` in [0, 255] → float32 in [0, 1]; float input is returned as is."""
    if images.is_floating_point():
        return images
    return images.to(torch.float32).div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel. x: ``(B, 3, H, W)`` float → same shape."""
    # made on the host and sent without a sync (a tensor made from Python values on a GPU syncs)
    m = to_device(torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1), x.device)
    s = to_device(torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1), x.device)
    return (x - m) / s


def blur_kernel_size(size: int) -> int:
    """Blur kernel for an output of ``size`` pixels: the odd number at or just above 10%
    of the size, at least 3 (224 → 23 as BYOL/solo-learn, 96 → 9, 32 → 3)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(B,) parameters → (B, 1, 1, 1) on x's device/dtype, to broadcast over an image batch."""
    return to_device(v, x.device).to(x.dtype).view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) → (B, 1, H, W) luminance with torchvision's tensor weights and op order."""
    r, g, b = x.unbind(dim=-3)
    return (
        r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(-3)
    )


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    """``ratio * a + (1 - ratio) * b`` clamped to [0, 1]; ratio (B, 1, 1, 1). Same op
    order as torchvision's ``_blend`` so results agree to the last bit or two."""
    return (a * ratio).add_(b * (1.0 - ratio)).clamp_(0.0, 1.0)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None, copies: int = 1) -> Tensor:
    """Crop each image to its own box and resize it to ``size x size``, bilinear.

    x: ``(B, C, H, W)`` float; boxes: ``(copies * B, 4)`` ``top, left, h, w`` in pixels →
    ``(copies * B, C, size, size)``, crop-major: row ``k * B + b`` is crop k of image b (multi-crop
    cuts several crops of each image in this one call, without copying the images: the k crops of
    image b are stacked along the grid's height, so ``grid_sample`` reads each image once).

    One ``grid_sample`` for the whole batch (align_corners=False). The (affine) grid puts
    output pixel ``u`` at crop coordinate ``(u + 0.5) * w / size - 0.5`` as
    ``F.interpolate`` does; the grid is then clamped to the crop's own first/last pixel
    centres, because interpolate replicates the crop's edge while an unclamped grid
    would blend in the pixels just outside the crop. No antialiasing (see module doc).

    ``flip``: ``(B,)`` bool, mirrors those outputs (the crop then ``hflip``, bitwise) by
    reversing their grid columns, which costs nothing on the images.
    """
    B, C, H, W = x.shape
    n = boxes.shape[0]  # copies * B
    top, left, h, w = (v.view(n, 1) for v in to_device(boxes, x.device).float().unbind(dim=1))
    # normalised output coordinates of the pixel centres, as affine_grid(align_corners=False)
    base = (torch.arange(size, device=x.device, dtype=torch.float32) * 2 + 1) / size - 1
    # the affine map, built per axis (an x/y-separable affine grid without affine_grid's
    # bmm): normalised input = scale * normalised output + shift
    gx = base * (w / W) + ((2 * left + w) / W - 1)  # (B, size)
    gy = base * (h / H) + ((2 * top + h) / H - 1)
    # pixel centre p sits at (2p + 1) / W - 1 in normalised coordinates
    gx = torch.maximum(torch.minimum(gx, (2 * (left + w) - 1) / W - 1), (2 * left + 1) / W - 1)
    gy = torch.maximum(torch.minimum(gy, (2 * (top + h) - 1) / H - 1), (2 * top + 1) / H - 1)
    if flip is not None:
        gx = torch.where(to_device(flip, x.device).view(n, 1), gx.flip(-1), gx)
    if copies == 1:
        grid = torch.stack(
            [gx.view(B, 1, size).expand(B, size, size), gy.view(B, size, 1).expand(B, size, size)], dim=-1
        )
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    # (copies * B, size) -> (B, copies, size): image b's crops side by side in its own grid
    gx, gy = (g.view(copies, B, size).transpose(0, 1) for g in (gx, gy))
    shape = (B, copies, size, size)
    grid = torch.stack([gx.unsqueeze(2).expand(shape), gy.unsqueeze(3).expand(shape)], dim=-1)
    out = F.grid_sample(x, grid.reshape(B, copies * size, size, 2).to(x.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (B, C, copies * size, size)
    return out.view(B, C, copies, size, size).permute(2, 0, 1, 3, 4).reshape(n, C, size, size)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images where ``mask`` is True. x: ``(B, C, H, W)``; mask: ``(B,)`` bool."""
    return torch.where(to_device(mask, x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(x * factor)``. x: ``(B, 3, H, W)`` float in [0, 1]; factor: ``(B,)`` ≥ 0."""
    return x.mul(_per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its own grayscale. x: ``(B, 3, H, W)``;
    factor: ``(B,)`` ≥ 0."""
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale. x: ``(B, 3, H, W)``; factor: ``(B,)`` ≥ 0."""
    return _blend(x, _gray(x), _per_sample(factor, x))


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate each image's hue by its own ``factor`` (fraction of a turn, in [-0.5, 0.5])
    through RGB→HSV→RGB. x: ``(B, 3, H, W)`` float in [0, 1]; factor: ``(B,)``.

    HSV as torchvision's tensor kernel (itself Pillow's), in a closed form with few
    whole-plane kernels (hue dominated the CPU cost of colour jitter): a rotation keeps
    each pixel's max ``v`` and range ``c = max - min`` and moves only the hue, so channel
    n is ``v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6``, n = 5, 3, 1
    for R, G, B. That ramp is continuous around the circle, so where the mod wraps does
    not matter; gray pixels (c = 0) stay as they are.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    crange = maxc - torch.minimum(torch.minimum(r, g), b)
    # 6 h * c from the channel that holds the max (torchvision's priority: r, then g, then b)
    num = torch.where(
        maxc == r,
        g - b,
        torch.where(maxc == g, torch.add(b - r, crange, alpha=2.0), (r - g).add_(crange, alpha=4.0)),
    )
    # c = 0 gives num = 0, hence h = 0; the floor only avoids 0/0 (for 0 < c < 1e-30 its
    # error is multiplied back by c below)
    h6 = num.div_(crange.clamp_min(1e-30)).add_(_per_sample(factor, x).view(-1, 1, 1), alpha=6.0)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h6.unsqueeze(-3) + n
    k = k.sub_(k.div(6.0).floor_().mul_(6.0))  # mod 6; torch.remainder is ~5x slower on CPU
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.sub(maxc.unsqueeze(-3), ramp.mul_(crange.unsqueeze(-3)))


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Grayscale with the 3 channels kept, as ``RandomGrayscale``. x: ``(B, 3, H, W)`` →
    same shape. Weights 0.2989, 0.587, 0.114 (torchvision's tensor kernel)."""
    return _gray(x).expand_as(x).contiguous()


def solarize(x: Tensor, threshold: float | Tensor = 0.5) -> Tensor:
    """Invert the pixels at or above ``threshold`` (a float, or a tensor that broadcasts
    against x, e.g. ``(B, 1, 1, 1)`` per sample). x: float in [0, 1], any shape."""
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur with a per-sample ``sigma`` (same in x and y, as ``GaussianBlur``).

    x: ``(B, C, H, W)`` float; sigma: ``(B,)`` > 0; kernel_size odd → same shape.
    Kernel taps and reflect padding as torchvision's ``gaussian_blur``; applied as two
    1-D passes (one grouped conv over all B*C planes per pass), which equals
    torchvision's 2-D outer-product kernel up to float rounding.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    B, C, H, W = x.shape
    half = kernel_size // 2
    taps = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    sig = to_device(sigma, x.device).to(x.dtype).view(B, 1)
    kernel = torch.softmax(-((taps / sig) ** 2) / 2.0, dim=1)  # (B, k), exp(-t²/2σ²) normalised
    kernel = kernel.repeat_interleave(C, dim=0)  # one kernel per (sample, channel) plane
    planes = x.reshape(1, B * C, H, W)
    planes = F.pad(planes, (half, half, half, half), mode="reflect")
    planes = F.conv2d(planes, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    planes = F.conv2d(planes, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return planes.view(B, C, H, W)
