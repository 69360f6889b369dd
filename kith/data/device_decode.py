"""`data.decode=gpu`'s device half: a batch of JPEGs decoded in one call, every view's crops cut in a few
batched matrix products.

Decoding goes through TorchCodec's `decode_jpeg` where it is installed (the `gpu` extra), else
torchvision's (deprecated in favour of TorchCodec). Both give the same pixels on the CPU (tested).
torchvision's CUDA decoder writes its output on a private stream without waiting for the caller's
(pytorch/vision#9606), so it runs here on a side stream of its own whose freed blocks only the decoder
reuses, and the caller's stream waits for it.

Cropping: a random-resized crop is separable, so an image's crop resized to S x S is `Wy @ X @ Wxᵀ`
with `Wy` (S, H) and `Wx` (S, W) the antialiased bilinear weights of its box (zero outside it;
`resize_matrix`), a flip being `Wx` with its rows reversed. With the images zero-padded to one
(H, W), every crop of a batch is one batched product: no per-image kernel launches. The weights are
those of `torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)`,
so the result equals the per-image interpolation up to float rounding (at most 1 in uint8, tested).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from kith.utils.device import to_device

PADDED_FLOATS = 64 * 1024 * 1024  # floats in one padded chunk of images: 256 MB


@functools.cache
def jpeg_backend() -> str:
    """`torchcodec` when TorchCodec's image decoders import, else `torchvision` (asked once: a failed
    import is not cached by Python and would search the path again for every batch)."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except ImportError:
        return "torchvision"
    return "torchcodec"


def decode_jpegs(payload: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """(3, H, W) uint8 RGB images on `device` of the 1-D uint8 JPEG byte tensors `payload`, one batched
    decode call."""
    if jpeg_backend() == "torchcodec":
        from torchcodec.decoders import decode_jpeg
        return list(decode_jpeg(list(payload), mode="RGB", device=device))
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg
    if device.type != "cuda":
        return list(tv_decode_jpeg(list(payload), mode=ImageReadMode.RGB, device=device))
    caller, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        images = list(tv_decode_jpeg(list(payload), mode=ImageReadMode.RGB, device=device))
    caller.wait_stream(side)
    for image in images:  # freed blocks go back to the side stream only once the caller is done
        image.record_stream(caller)
    return images


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The decoder's own stream on `device`, one per device for the process."""
    return torch.cuda.Stream(device)


def resize_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """(N, out_size, in_size) float64 weights of an antialiased bilinear resize of each interval
    `[start_n, start_n + length_n)` to `out_size` samples, zero outside it: PyTorch's (and Pillow's)
    triangle filter widened by the downscale factor, each row normalised to sum 1.

    For output sample i of an interval of length L (scale s = L / out_size, support r = max(s, 1)):
    center c = s (i + 0.5), taps j in [lo, hi) with lo = max(trunc(c - r + 0.5), 0) and
    hi = min(trunc(c + r + 0.5), L), weight of tap j = max(0, 1 - |(j - c + 0.5) / r|)."""
    start, length = start.to(torch.float64), length.to(torch.float64)
    scale = (length / out_size)[:, None]  # (N, 1)
    support = scale.clamp_min(1.0)
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # (N, S)
    lo = (center - support + 0.5).trunc().clamp_min(0)
    hi = torch.minimum((center + support + 0.5).trunc(), length[:, None])
    taps = int((hi - lo).max().item()) if len(start) else 0
    j = lo[..., None] + torch.arange(taps, dtype=torch.float64)  # (N, S, T) input positions in the box
    weights = (1.0 - ((j - center[..., None] + 0.5) / support[..., None]).abs()).clamp_min(0.0)
    weights = torch.where(j < hi[..., None], weights, 0.0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    columns = (j + start[:, None, None]).long().clamp(0, in_size - 1)
    out = torch.zeros(len(start), out_size, in_size, dtype=torch.float64)
    return out.scatter_add_(2, columns, weights)


def pad_batch(images: Sequence[Tensor]) -> Tensor:
    """(B, 3, H, W) float32: the (3, H_b, W_b) uint8 images zero-padded at the bottom and right to the
    batch's largest height and width (one copy per image: the decoder returns them one by one)."""
    height = max(int(x.shape[-2]) for x in images)
    width = max(int(x.shape[-1]) for x in images)
    padded = torch.zeros(len(images), 3, height, width, device=images[0].device, dtype=torch.float32)
    for b, x in enumerate(images):
        padded[b, :, : x.shape[-2], : x.shape[-1]] = x
    return padded


def size_chunks(shapes: Sequence[tuple[int, int]], max_floats: int = PADDED_FLOATS) -> list[list[int]]:
    """Image positions grouped, in order of pixel count, so that no group's padded float batch
    (len x 3 x its largest height x its largest width) exceeds `max_floats` (a group holds one image
    at least): a few large photos do not pad the whole batch to their size."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
    chunks: list[list[int]] = []
    height = width = 0
    for i in order:
        h, w = max(height, shapes[i][0]), max(width, shapes[i][1])
        if chunks and (len(chunks[-1]) + 1) * 3 * h * w <= max_floats:
            chunks[-1].append(i)
            height, width = h, w
        else:
            chunks.append([i])
            height, width = shapes[i]
    return chunks


def crop_views(images: Sequence[Tensor], boxes: Sequence[Sequence[Sequence[int]]],
               flips: Sequence[Sequence[bool]], sizes: Sequence[int]) -> list[Tensor]:
    """Per view v, (B, 3, sizes[v], sizes[v]) uint8: image b's crop `boxes[b][v]` resized and mirrored
    by `flips[b][v]` (`crop_resize_batch`), the batch padded in chunks of similar sizes (`size_chunks`)."""
    device = images[0].device
    out = [torch.empty(len(images), 3, s, s, dtype=torch.uint8, device=device) for s in sizes]
    for chunk in size_chunks([tuple(x.shape[-2:]) for x in images]):
        padded = pad_batch([images[b] for b in chunk])
        where = torch.tensor(chunk, dtype=torch.long, device=device)
        for v, s in enumerate(sizes):
            out[v].index_copy_(0, where, crop_resize_batch(padded, [boxes[b][v] for b in chunk],
                                                           [flips[b][v] for b in chunk], s))
    return out


def crop_resize_batch(padded: Tensor, boxes: Sequence[Sequence[int]], flips: Sequence[bool], size: int
                      ) -> Tensor:
    """(B, 3, size, size) uint8: image b's crop `boxes[b]` (top, left, h, w) of the padded batch
    (`pad_batch`) resized to size x size (antialiased bilinear), mirrored when `flips[b]`: two batched
    products, the weights made on the host and copied once."""
    box = torch.tensor([list(b) for b in boxes], dtype=torch.long)
    wy = resize_matrix(box[:, 0], box[:, 2], padded.shape[-2], size)
    wx = resize_matrix(box[:, 1], box[:, 3], padded.shape[-1], size)
    flip = torch.tensor(list(flips), dtype=torch.bool)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    wy, wx = (to_device(w.to(torch.float32), padded.device) for w in (wy, wx))
    rows = torch.matmul(wy[:, None], padded)  # (B, 3, S, W)
    out = torch.matmul(rows, wx[:, None].transpose(-1, -2))  # (B, 3, S, S)
    return out.round_().clamp_(0, 255).to(torch.uint8)
