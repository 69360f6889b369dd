"""data.decode=gpu's device half on the CPU: the batched crop weights equal PyTorch's antialiased
bilinear interpolation, the batched crops equal the per-image ones (to 1 in uint8), large images are
padded in bounded chunks, and TorchCodec decodes the same pixels as torchvision."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kith.data import device_decode
from kith.data.device_decode import crop_views, resize_matrix, size_chunks
from kith.data.loader import crop_resize


def test_resize_weights_are_pytorchs_antialiased_bilinear_interpolation():
    rng = random.Random(0)
    for _ in range(60):
        height, width = rng.randint(8, 120), rng.randint(8, 120)
        h, w = rng.randint(1, height), rng.randint(1, width)
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        size = rng.choice([4, 8, 16, 40, 150])  # downscales and upscales
        x = torch.rand(3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        expected = F.interpolate(x[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                                 antialias=True, align_corners=False)[0]
        wy = resize_matrix(torch.tensor([top]), torch.tensor([h]), height, size)[0]
        wx = resize_matrix(torch.tensor([left]), torch.tensor([w]), width, size)[0]
        torch.testing.assert_close(wy @ x @ wx.T, expected, rtol=0, atol=1e-10)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(12, 70, (n, 2), generator=gen).tolist()
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]


def test_batched_crops_equal_the_per_image_crops_to_one_level(monkeypatch):
    images = _images(12)
    rng = random.Random(3)
    boxes, flips = [], []
    for x in images:
        height, width = x.shape[-2:]
        per_view = []
        for _ in range(2):
            h, w = rng.randint(1, height), rng.randint(1, width)
            per_view.append([rng.randint(0, height - h), rng.randint(0, width - w), h, w])
        boxes.append(per_view)
        flips.append([rng.random() < 0.5, rng.random() < 0.5])
    monkeypatch.setattr(device_decode, "PADDED_FLOATS", 3 * 70 * 70 * 4)  # several chunks
    got = crop_views(images, boxes, flips, [16, 8])
    for v, size in enumerate([16, 8]):
        for b, x in enumerate(images):
            top, left, h, w = boxes[b][v]
            expected = F.interpolate(x[None, :, top:top + h, left:left + w].double(), size=(size, size),
                                     mode="bilinear", antialias=True, align_corners=False)[0]
            expected = expected.flip(-1) if flips[b][v] else expected
            diff = (got[v][b].double() - expected).abs()
            assert diff.max() <= 0.5 + 1e-3, (b, v)  # the float product rounds as the exact value does
        # against the CPU workers' own uint8 kernel (fixed-point): within one level
        per_image = torch.stack([crop_resize(x, boxes[b][v], flips[b][v], size)
                                 for b, x in enumerate(images)])
        assert (got[v].int() - per_image.int()).abs().max() <= 1


def test_chunks_hold_every_image_once_and_stay_under_the_float_budget():
    shapes = [(500, 400), (32, 32), (30, 40), (480, 640), (2000, 1500), (64, 48)]
    chunks = size_chunks(shapes, max_floats=3 * 2 * 640 * 500)
    assert sorted(i for c in chunks for i in c) == list(range(len(shapes)))
    for chunk in chunks:
        if len(chunk) > 1:
            height = max(shapes[i][0] for i in chunk)
            width = max(shapes[i][1] for i in chunk)
            assert len(chunk) * 3 * height * width <= 3 * 2 * 640 * 500
    assert [4] in chunks  # the 2000 x 1500 photo pads nothing but itself


def _jpegs(n: int) -> list[torch.Tensor]:
    out = []
    for i, x in enumerate(_images(n, seed=5)):
        buf = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=80 + i)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def test_torchcodec_and_torchvision_decode_the_same_pixels():
    pytest.importorskip("torchcodec.decoders", reason="TorchCodec (the gpu extra) is not installed")
    from torchvision.io import ImageReadMode, decode_jpeg

    payload = _jpegs(6)
    assert device_decode.jpeg_backend() == "torchcodec"
    decoded = device_decode.decode_jpegs(payload, torch.device("cpu"))
    reference = decode_jpeg(payload, mode=ImageReadMode.RGB)
    pil = [torch.from_numpy(np.array(Image.open(io.BytesIO(p.numpy().tobytes())).convert("RGB")))
           .permute(2, 0, 1) for p in payload]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(decoded, reference, pil))


def test_without_torchcodec_torchvision_decodes(monkeypatch):
    monkeypatch.setattr(device_decode, "jpeg_backend", lambda: "torchvision")
    payload = _jpegs(3)
    decoded = device_decode.decode_jpegs(payload, torch.device("cpu"))
    assert [tuple(x.shape) for x in decoded] == [(3, *Image.open(io.BytesIO(p.numpy().tobytes())).size[::-1])
                                                 for p in payload]
