"""`BatchAugment.compile` (`train.compile_augment`): the rendering of a view through torch.compile in one
graph gives the eager views, whatever the recipe (blur, solarize, multi-crop, pre-cut crops), compiles
once per recipe and shape with no graph break, and a run with it logs the eager run's losses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from kith.data.augment import BatchAugment, default_views
from kith.data.spec import ImageSpec
from kith.train.loop import run_training
from tests.helpers import logged_rows, small_heads, tiny_config

SPEC = ImageSpec.of(16, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


def _images(n: int = 6, size: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe, call, layout", [
    ("strong", {}, None),
    ("blur_solarize", {}, None),
    ("strong", {"copies": 3}, None),
    ("strong_solarize", {"crop": False}, None),
    ("strong_solarize", {}, (torch.bfloat16, torch.channels_last)),  # views as a conv net reads them
])
def test_the_compiled_rendering_gives_the_eager_views(recipe, call, layout, fresh_dynamo):
    views = {**default_views(), "blur_solarize": replace(default_views()["strong_solarize"], blur_prob=0.5)}
    eager = BatchAugment(views[recipe], SPEC)
    eager.whole_batch = True  # as compiled: the same values as the subset path, the same op order
    compiled = BatchAugment(views[recipe], SPEC).compile("aot_eager")
    if layout:
        eager.write_views_as(*layout), compiled.write_views_as(*layout)
    images = _images(size=16) if call.get("crop") is False else _images()
    for step in range(3):
        want = eager(images, torch.Generator().manual_seed(step), **call)
        got = compiled(images, torch.Generator().manual_seed(step), **call)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if layout is None else 1e-2)
        assert got.dtype == want.dtype and got.stride() == want.stride()
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, reused by the later steps
    assert sum(counters["graph_break"].values()) == 0


def test_the_whole_batch_path_equals_the_subset_path():
    view = replace(default_views()["strong_solarize"], blur_prob=0.5)
    subset, whole = BatchAugment(view, SPEC), BatchAugment(view, SPEC)
    whole.whole_batch = True
    images = _images(n=12)
    torch.testing.assert_close(whole(images, torch.Generator().manual_seed(4)),
                               subset(images, torch.Generator().manual_seed(4)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["byol", "ressl"])
def test_a_run_with_a_compiled_augmentation_logs_the_eager_runs_losses(name, tmp_path, fresh_dynamo):
    common = [*small_heads(name), "train.epochs=2", "train.knn_every=0", "train.log_every=1"]
    run_training(tiny_config(name, *common, out_dir=tmp_path), run_dir=tmp_path / "eager", final_eval=False)
    run_training(tiny_config(name, *common, "train.compile_augment=true", "train.compile_backend=aot_eager",
                             out_dir=tmp_path), run_dir=tmp_path / "compiled", final_eval=False)
    want, got = ([r["loss"] for r in logged_rows(tmp_path / run) if r["kind"] == "train"]
                 for run in ("eager", "compiled"))
    assert len(want) == len(got) > 0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sum(counters["graph_break"].values()) == 0
