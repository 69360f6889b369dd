"""Views with sizes: a recipe's own output size and scale range, user-named recipes under `augment.*`,
`method.extra_views`, and the step's views: the global ones as before, then one tensor per extra crop
size, cut by one batched augmentation call per run of same-recipe crops."""

from __future__ import annotations

import pytest
import torch

from kith.config import build_config
from kith.data.augment import BatchAugment, ViewConfig
from kith.data.loader import Batch
from kith.data.spec import ImageSpec
from kith.data.views import ViewPlan
from kith.methods.context import TrainInfo
from kith.train.setup import build_method
from kith.train.step import TrainStep
from kith.utils.errors import UserError
from tests.helpers import small_heads, tiny_config

SPEC = ImageSpec.of(32, [0.5] * 3, [0.25] * 3)
SMALL = "augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}"
MID = "augment.mid={size: 12, min_scale: 0.1, max_scale: 0.5}"


def _images(n=5, size=32):
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def test_copies_cut_independent_crops_of_each_image_as_a_repeated_batch_would():
    """copies=n gives exactly what the n-times repeated batch gives (crop-major), without copying images."""
    view = ViewConfig(size=12, min_scale=0.05, max_scale=0.3, blur_prob=0.5, solarize_prob=0.3)
    aug = BatchAugment(view, SPEC)
    images = _images()
    many = aug(images, torch.Generator().manual_seed(1), copies=3)
    assert many.shape == (15, 3, 12, 12)
    assert torch.equal(many, aug(images.repeat(3, 1, 1, 1), torch.Generator().manual_seed(1)))
    assert not torch.equal(many[:5], many[5:10])  # each copy is its own draw


def test_a_recipe_has_its_own_size_and_falls_back_to_the_data_size():
    assert BatchAugment(ViewConfig(size=96), SPEC).size == 96
    assert BatchAugment(ViewConfig(), SPEC).size == 32
    assert BatchAugment(ViewConfig(size=96), SPEC)(_images(2), torch.Generator()).shape == (2, 3, 96, 96)


def test_users_name_new_recipes_and_extra_views_on_the_command_line():
    cfg = build_config(["augment.small={size: 96, min_scale: 0.05, max_scale: 0.14}",
                        "method.extra_views=[small,small,small,small,small,small]"])
    small = cfg.augment.small
    assert (small.size, small.min_scale, small.max_scale) == (96, 0.05, 0.14)
    assert cfg.augment.small.flip_prob == ViewConfig().flip_prob  # unset fields: ViewConfig's defaults
    assert list(cfg.method.extra_views) == ["small"] * 6
    assert "small" not in build_config([]).augment  # nothing leaks into other configs


@pytest.mark.parametrize("overrides, message", [
    (["method.extra_views=[smal]"], "method.extra_views names augment recipe 'smal', which does not exist"),
    (["augment.small.bogus=1"], "unknown config key 'augment.small.bogus'"),
    (["augment.small={size: 4}"], "augment.small.size=4 is out of range"),
    (["augment.small={min_scale: 0.5, max_scale: 0.2}"], "augment.small.min_scale=0.5 is larger than"),
])
def test_bad_recipes_and_extra_views_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        build_config(overrides)
    assert "\n" not in str(err.value)


def test_the_plan_groups_extra_crops_by_size_in_order_of_first_appearance():
    augment = {"strong": ViewConfig(), "weak": ViewConfig(), "small": ViewConfig(size=8),
               "mid": ViewConfig(size=12), "tiny": ViewConfig(size=8, min_scale=0.01)}
    plan = ViewPlan.of(augment, ["strong", "weak"], ["small", "mid", "small", "tiny", "small"], 32)
    assert [(g.size, g.names, g.positions) for g in plan.groups] == [
        (8, ("small", "small", "tiny", "small"), (0, 2, 3, 4)), (12, ("mid",), (1,))]
    assert plan.groups[0].runs() == [("small", 2), ("tiny", 1), ("small", 1)]
    assert sorted(plan.names) == ["mid", "small", "strong", "tiny", "weak"]  # each recipe once
    assert ViewPlan.of(augment, ["strong", "weak"], [], 32).groups == ()


def _step(method="ressl", *extra):
    cfg = tiny_config(method, *small_heads(method), SMALL, MID, *extra)
    info = TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2)
    return TrainStep(cfg, build_method(cfg, info), torch.device("cpu"), 2)


def test_a_step_makes_the_global_views_then_one_tensor_per_extra_size():
    batch = Batch(_images(4, 16), torch.zeros(4, dtype=torch.long), torch.arange(4))
    plain = _step().views(batch, 7)
    multi = _step("ressl", "method.extra_views=[small,mid,small,small]").views(batch, 7)
    assert [tuple(v.shape) for v in multi] == [(4, 3, 16, 16), (4, 3, 16, 16), (12, 3, 8, 8), (4, 3, 12, 12)]
    # the global views are drawn first: adding extra crops leaves them bitwise as they were
    assert len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(plain, multi[:2]))
