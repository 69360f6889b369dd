"""kith.data.augment: each op against torchvision image by image, per-sample independence,
determinism, recipe outputs and apply-probabilities."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from kith.data import augment as A
from kith.data import ops
from kith.data.augment import BatchAugment, ViewConfig, default_views
from kith.data.spec import ImageSpec

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _spec(size: int, plain: bool = False) -> ImageSpec:
    """CIFAR-10's normalisation, or with `plain` none at all (mean 0, std 1)."""
    return ImageSpec.of(size, (0, 0, 0), (1, 1, 1)) if plain else ImageSpec.of(size, MEAN, STD)

# Float32 element-wise ops in a different (but equivalent) order than torchvision's:
# a few ulps of [0, 1] values.
ATOL_POINTWISE = 1e-6
# Hue goes through RGB->HSV->RGB with divisions; blur sums 2 separable passes instead of
# one 2-D kernel; both accumulate rounding over several ops.
ATOL_CHAINED = 1e-5
# resized_crop reaches each source position through normalised grid coordinates (a float32
# round trip through [-1, 1]), so positions differ from interpolate's by ~1e-6 pixel,
# and values by that times the local gradient (at most 1 per pixel for [0, 1] images).
ATOL_CROP = 2e-5


def _images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _factors(n: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _plain(**kw) -> ViewConfig:
    """A recipe with every random op off (full-image crop), then `kw` switched on."""
    base = ViewConfig(
        min_scale=1.0,
        max_scale=1.0,
        min_ratio=1.0,
        max_ratio=1.0,
        jitter_prob=0.0,
        gray_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
        flip_prob=0.0,
    )
    return replace(base, **kw)


# --------------------------------------------------------------------------- ops vs torchvision


@pytest.mark.parametrize(
    "ours, theirs, lo, hi",
    [
        (ops.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (ops.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (ops.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    ],
    ids=["brightness", "contrast", "saturation"],
)
def test_blend_ops_match_torchvision(ours, theirs, lo, hi):
    x = _images()
    f = _factors(len(x), lo, hi)
    out = ours(x, f)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], theirs(x[i], float(f[i])), atol=ATOL_POINTWISE, rtol=0)


def test_hue_matches_torchvision():
    x = _images()
    # include gray pixels (max == min) and the extreme shifts
    x[0, :, :4, :4] = 0.5
    f = _factors(len(x), -0.5, 0.5)
    f[1], f[2] = -0.5, 0.5
    out = ops.adjust_hue(x, f)
    assert torch.isfinite(out).all()
    for i in range(len(x)):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], float(f[i])), atol=ATOL_CHAINED, rtol=0)


def test_grayscale_solarize_hflip_match_torchvision():
    x = _images()
    gray = ops.rgb_to_grayscale(x)
    sol = ops.solarize(x, 0.5)
    mask = torch.tensor([True, False] * 4)
    flipped = ops.hflip(x, mask)
    for i in range(len(x)):
        torch.testing.assert_close(
            gray[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=ATOL_POINTWISE, rtol=0
        )
        torch.testing.assert_close(sol[i], TF.solarize(x[i], 0.5), atol=0, rtol=0)
        want = TF.horizontal_flip(x[i]) if mask[i] else x[i]
        torch.testing.assert_close(flipped[i], want, atol=0, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = _images(size=20)
    sigma = _factors(len(x), 0.1, 2.0)
    out = ops.gaussian_blur(x, sigma, kernel_size)
    for i in range(len(x)):
        s = float(sigma[i])
        want = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [s, s])
        torch.testing.assert_close(out[i], want, atol=ATOL_CHAINED, rtol=0)


def test_blur_kernel_size():
    assert ops.blur_kernel_size(224) == 23  # BYOL / solo-learn's ImageNet kernel
    assert ops.blur_kernel_size(96) == 9
    assert ops.blur_kernel_size(32) == 3
    assert ops.blur_kernel_size(8) == 3
    assert all(ops.blur_kernel_size(s) % 2 == 1 for s in range(1, 600))


def test_resized_crop_matches_torchvision_upscaling():
    # Upscaling only (crops of a 32x32 image back to 32): here torchvision's antialias
    # does nothing, and antialias=False is its exact bilinear path.
    x = _images(n=16, size=32)
    g = torch.Generator().manual_seed(3)
    boxes = A.sample_crop_boxes(len(x), 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
    boxes[0] = torch.tensor([0.0, 0.0, 32.0, 32.0])  # the identity box
    boxes[1] = torch.tensor([5.0, 30.0, 7.0, 2.0])  # thin box on the right edge
    out = ops.resized_crop(x, boxes, 32)
    torch.testing.assert_close(out[0], x[0], atol=ATOL_CROP, rtol=0)
    for i in range(len(x)):
        top, left, h, w = (int(v) for v in boxes[i])
        want = TF.resized_crop(x[i], top, left, h, w, [32, 32], antialias=False)
        torch.testing.assert_close(out[i], want, atol=ATOL_CROP, rtol=0)


def test_color_jitter_matches_torchvision_in_each_samples_order():
    x = _images(n=32)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    mask = torch.rand(len(x), generator=torch.Generator().manual_seed(6)) < 0.8
    out = A.color_jitter(x, 0.4, 0.4, 0.2, 0.1, g, mask)

    # replay the draws documented in color_jitter: permutation keys, then 4 factors
    g.set_state(state)
    order = torch.argsort(torch.rand(len(x), 4, generator=g), dim=1)
    u = torch.rand(len(x), 4, generator=g)
    lo = torch.tensor([0.6, 0.6, 0.8, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.2, 0.1])
    factors = lo + (hi - lo) * u
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert len({tuple(o.tolist()) for o in order}) > 12  # many different orders in one batch
    for i in range(len(x)):
        want = x[i]
        if mask[i]:
            for op in order[i].tolist():
                want = fns[op](want, float(factors[i, op]))
        torch.testing.assert_close(out[i], want, atol=ATOL_CHAINED, rtol=0)


# --------------------------------------------------------------------------- crop boxes


def test_crop_boxes_inside_image_and_in_scale_range():
    H, W, scale, ratio = 224, 160, (0.08, 1.0), (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(0)
    top, left, h, w = A.sample_crop_boxes(4096, H, W, scale, ratio, g).unbind(1)
    for v in (top, left, h, w):
        assert torch.equal(v, v.round())
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # the unrounded sides lay within 0.5 of the rounded ones; the fallback of a 224x160
    # image (ratio 0.71 < 3/4) is the centre crop 160 x 213
    fallback = (w == W) & (h == round(W / ratio[0]))
    area_hi = (h + 0.5) * (w + 0.5) / (H * W)
    area_lo = (h - 0.5) * (w - 0.5) / (H * W)
    ok = fallback | ((area_hi >= scale[0]) & (area_lo <= scale[1]))
    assert ok.all()
    assert fallback.float().mean() < 0.01
    r_hi, r_lo = (w + 0.5) / (h - 0.5), (w - 0.5) / (h + 0.5)
    assert (fallback | ((r_hi >= ratio[0]) & (r_lo <= ratio[1]))).all()
    # positions spread over the whole valid range
    assert (top == 0).any() and (left == 0).any() and (top + h == H).any()


def test_crop_boxes_fallback_is_centre_crop():
    # a square image cannot hold a full-area box of ratio 2..3 -> every sample falls back
    g = torch.Generator().manual_seed(0)
    boxes = A.sample_crop_boxes(16, 32, 32, (1.0, 1.0), (2.0, 3.0), g)
    want = torch.tensor([(32 - 16) // 2, 0, 16, 32], dtype=torch.float32)
    assert torch.equal(boxes, want.expand(16, 4))


def test_crop_box_distribution_matches_torchvision():
    n, scale, ratio = 3000, (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]).float()
    ours = A.sample_crop_boxes(n, 32, 32, scale, ratio, torch.Generator().manual_seed(0))
    for b in (tv, ours):
        b[:, 0] += b[:, 2] / 2  # centre instead of corner
        b[:, 1] += b[:, 3] / 2
    # mean area fraction, side lengths, centres: standard errors are ~0.5-1% here
    def area(b):
        return (b[:, 2] * b[:, 3] / 1024).mean()

    assert abs(area(tv) - area(ours)) < 0.03
    torch.testing.assert_close(ours.mean(0), tv.mean(0), atol=0.6, rtol=0)
    torch.testing.assert_close(ours.std(0), tv.std(0), atol=0.6, rtol=0)


def test_crop_boxes_differ_across_batch():
    boxes = A.sample_crop_boxes(256, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert len({tuple(b.tolist()) for b in boxes}) > 200


# --------------------------------------------------------------------------- pipeline


def test_repeated_image_gives_independent_views():
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    batch = img.expand(64, -1, -1, -1)
    for name in ("strong", "strong_solarize", "weak"):
        out = BatchAugment(default_views()[name], _spec(32))(batch, torch.Generator().manual_seed(0))
        distinct = {tuple(o.flatten()[::37].tolist()) for o in out}
        assert len(distinct) >= 60, name


def test_flip_and_gray_masks_differ_across_batch():
    # asymmetric, coloured image, no crop: each output is the image or its mirror/gray
    x = _images(n=1, size=16).expand(64, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    flipped = BatchAugment(_plain(flip_prob=0.5), _spec(16, plain=True))(x, g)
    is_flip = (flipped - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    is_same = (flipped - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (is_flip ^ is_same).all() and 0 < is_flip.sum() < 64

    gray = BatchAugment(_plain(gray_prob=0.5), _spec(16, plain=True))(x, g)
    is_gray = (gray[:, 0] == gray[:, 1]).all(dim=(1, 2)) & (gray[:, 1] == gray[:, 2]).all(dim=(1, 2))
    assert 0 < is_gray.sum() < 64
    torch.testing.assert_close(gray[~is_gray], x[~is_gray], atol=1e-5, rtol=0)


def test_same_seed_same_output_different_seed_different_output():
    x = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    aug = BatchAugment(replace(default_views()["strong_solarize"], blur_prob=0.5), _spec(32))
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # and a generator advances: two calls in a row differ
    g = torch.Generator().manual_seed(7)
    assert not torch.allclose(aug(x, g), aug(x, g))


def test_uint8_input_shape_dtype_and_normalisation():
    x = torch.randint(0, 256, (10, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for cfg in default_views().values():
        out = BatchAugment(replace(cfg, blur_prob=0.5), _spec(32))(x, torch.Generator().manual_seed(0))
        assert out.shape == (10, 3, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    # a constant image, no colour ops: output is exactly the normalised constant
    const = torch.full((4, 3, 40, 40), 200, dtype=torch.uint8)
    out = BatchAugment(_plain(min_scale=0.2, flip_prob=0.5), _spec(32))(const, torch.Generator())
    want = (200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_float_input_equals_uint8_input():
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    aug = BatchAugment(default_views()["strong"], _spec(32))
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x.float() / 255, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_random_stream_does_not_depend_on_probabilities():
    # switching jitter/gray off must not change the crop and flip of each sample
    x = _images(n=16, size=32)
    on = BatchAugment(default_views()["strong"], _spec(32, plain=True))
    off = BatchAugment(
        replace(
            default_views()["strong"], brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, gray_prob=0.0
        ),
        _spec(32, plain=True),
    )
    weak = BatchAugment(
        replace(default_views()["strong"], jitter_prob=0.0, gray_prob=0.0), _spec(32, plain=True)
    )
    torch.testing.assert_close(
        off(x, torch.Generator().manual_seed(3)), weak(x, torch.Generator().manual_seed(3))
    )
    assert not torch.allclose(
        on(x, torch.Generator().manual_seed(3)), weak(x, torch.Generator().manual_seed(3))
    )


@pytest.mark.parametrize(
    "field, detect",
    [
        ("gray_prob", "gray"),
        ("flip_prob", "flip"),
        ("solarize_prob", "sol"),
        ("jitter_prob", "changed"),
        ("blur_prob", "changed"),
    ],
)
def test_apply_probabilities_are_honoured(field, detect):
    n, p = 2000, 0.2
    x = _images(n=1, size=8).expand(n, -1, -1, -1).contiguous()
    out = BatchAugment(_plain(**{field: p}), _spec(8, plain=True))(x, torch.Generator().manual_seed(0))
    def diff(a, b):
        return (a - b).abs().amax(dim=(1, 2, 3)) < 1e-5

    if detect == "gray":
        hit = diff(out, ops.rgb_to_grayscale(x))
    elif detect == "flip":
        hit = diff(out, x.flip(-1))
    elif detect == "sol":
        hit = diff(out, ops.solarize(x))
    else:
        hit = ~diff(out, x)
    # binomial sd = sqrt(0.2 * 0.8 / 2000) ~ 0.009: a 0.04 bound is > 4 sd
    assert abs(hit.float().mean().item() - p) < 0.04, hit.float().mean()


def test_pipeline_equals_torchvision_image_by_image_with_the_same_draws():
    # BatchAugment runs fused whole-batch ops (flip inside the crop grid, the jitter's blend
    # ops as one formula per slot, masks as arithmetic); replaying its documented draws
    # through torchvision's functional ops one image at a time must give the same views
    B, size = 48, 32
    x = torch.randint(0, 256, (B, 3, 36, 36), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cfg = replace(default_views()["strong"], gray_prob=0.3, blur_prob=0.5, solarize_prob=0.5)
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    out = BatchAugment(cfg, _spec(size))(x, g)

    g.set_state(state)
    boxes = A.sample_crop_boxes(B, 36, 36, (cfg.min_scale, cfg.max_scale), (cfg.min_ratio, cfg.max_ratio), g)
    u = torch.rand(B, 5, generator=g)
    sigma = cfg.blur_sigma_min + (cfg.blur_sigma_max - cfg.blur_sigma_min) * torch.rand(B, generator=g)
    order = torch.argsort(torch.rand(B, 4, generator=g), dim=1)
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    factors = lo + (hi - lo) * torch.rand(B, 4, generator=g)
    jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    k = ops.blur_kernel_size(size)
    for i in range(B):
        top, left, h, w = (int(v) for v in boxes[i])
        img = TF.resized_crop(x[i].float() / 255, top, left, h, w, [size, size], antialias=False)
        if u[i, 0] < cfg.jitter_prob:
            for op in order[i].tolist():
                img = jitter[op](img, float(factors[i, op]))
        if u[i, 1] < cfg.gray_prob:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u[i, 2] < cfg.blur_prob:
            img = TF.gaussian_blur(img, [k, k], [float(sigma[i])] * 2)
        # solarize is a step at 0.5: pixels within float noise of it may go either way
        near_step = (
            (img - 0.5).abs() < 1e-4 if u[i, 3] < cfg.solarize_prob else torch.zeros_like(img, dtype=bool)
        )
        if u[i, 3] < cfg.solarize_prob:
            img = TF.solarize(img, 0.5)
        if u[i, 4] < cfg.flip_prob:
            img, near_step = TF.horizontal_flip(img), near_step.flip(-1)
        want = TF.normalize(img, MEAN, STD)
        torch.testing.assert_close(out[i][~near_step], want[~near_step], atol=1e-4, rtol=0)
    # every branch taken by some samples and skipped by others
    taken = u < torch.tensor(
        [cfg.jitter_prob, cfg.gray_prob, cfg.blur_prob, cfg.solarize_prob, cfg.flip_prob]
    )
    assert (taken.any(0) & ~taken.all(0)).all()


def test_clean_view():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = A.clean_view(x, _spec(32))
    torch.testing.assert_close(out, ops.normalize(x.float() / 255, MEAN, STD))
    big = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    out = A.clean_view(big, _spec(32))
    want = F.interpolate(big.float() / 255, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    torch.testing.assert_close(out, ops.normalize(want, MEAN, STD))
    assert torch.equal(out, A.clean_view(big, _spec(32)))


def test_default_views():
    v = default_views()
    assert set(v) >= {"strong", "strong_solarize", "weak"}
    s = v["strong"]
    assert (s.min_scale, s.brightness, s.contrast, s.saturation, s.hue) == (0.08, 0.4, 0.4, 0.2, 0.1)
    assert (s.jitter_prob, s.gray_prob, s.flip_prob, s.solarize_prob, s.blur_prob) == (
        0.8,
        0.2,
        0.5,
        0.0,
        0.0,
    )
    assert v["strong_solarize"] == replace(s, solarize_prob=0.2)
    w = v["weak"]
    assert (w.min_scale, w.jitter_prob, w.gray_prob, w.flip_prob) == (0.2, 0.0, 0.0, 0.5)
    assert math.isclose(w.min_ratio, 3 / 4) and math.isclose(w.max_ratio, 4 / 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_a_seed():
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    aug = BatchAugment(replace(default_views()["strong_solarize"], blur_prob=0.5), _spec(32))
    cpu = aug(x, torch.Generator().manual_seed(0))
    aug(x.cuda(), torch.Generator().manual_seed(1))  # first call makes the per-device constants
    # no host-device sync in a step: it would stall the GPU's queue every batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = aug(x.cuda(), torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_a_config_node_is_read_once_at_construction_not_every_step(monkeypatch):
    """The recipe from a config (an OmegaConf node, ~10 us a key) is converted when the augment is built:
    a step reads no config key, and the views are the same as from the plain dataclass."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.structured(ViewConfig(min_scale=0.3, blur_prob=0.5, solarize_prob=0.2))
    spec = ImageSpec.of(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    from_node = BatchAugment(node, spec)
    reads = []
    real = DictConfig.__getattr__
    monkeypatch.setattr(DictConfig, "__getattr__", lambda self, key: reads.append(key) or real(self, key))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=gen)
    got = from_node(images, torch.Generator().manual_seed(1))
    assert reads == []
    expected = BatchAugment(ViewConfig(min_scale=0.3, blur_prob=0.5, solarize_prob=0.2), spec)(
        images, torch.Generator().manual_seed(1))
    assert torch.equal(got, expected)
