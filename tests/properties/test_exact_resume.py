"""Exact resume, for every registered method: a run interrupted and resumed from its checkpoint (at
an epoch end or inside an epoch) ends bitwise equal to the same run done in one go (weights, buffers
such as queues, banks and prototypes, optimizer state, and every logged metric row)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kith.methods import METHODS
from kith.runs.checkpoint import CHECKPOINT
from kith.train.loop import run_training
from tests.helpers import PHASES, assert_same_run, image_folder, small_heads, stream_config, tiny_config

EPOCHS = 3  # of 2 steps (64 images, batch 32)


@dataclass(frozen=True)
class Interruption:
    """Where the interrupted run stops before each resume: after `stops` epochs, or (`unit="step"`)
    after those global steps, which inside an epoch writes a mid-epoch checkpoint."""

    stops: tuple[int, ...]
    unit: str = "epoch"


INTERRUPTIONS = {
    # stop after epoch 1, resume and stop after epoch 2, resume to the end: resumes at two epoch
    # ends (for ReSSL and SPCL: into and past their phase change), one from a resumed run
    "epoch_ends": Interruption(stops=(1, 2)),
    # one step into epoch 2 (SPCL's clustered epoch: its prototypes must not be recomputed on resume)
    # and into epoch 3, from a run itself resumed mid-epoch; rows come every 3 steps and at epoch ends,
    # so the stop at step 5 leaves a step whose metrics the row at step 6 averages after the resume
    "mid_epoch": Interruption(stops=(3, 5), unit="step"),
}


def _config(method: str, out_dir):
    return tiny_config(method, *small_heads(method), *PHASES.get(method, []), f"train.epochs={EPOCHS}",
                       "train.knn_every=0", "train.log_every=3", out_dir=out_dir)




@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per method, shared by the interruption cases."""
    cache = {}

    def run(method: str):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"{method}-full")
            torch.manual_seed(0)
            run_training(_config(method, out), run_dir=out / "run", final_eval=False)
            cache[method] = out / "run"
        return cache[method]

    return run


@pytest.mark.parametrize("case", list(INTERRUPTIONS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_exact(method, case, uninterrupted, tmp_path):
    full = uninterrupted(method)
    cfg = _config(method, tmp_path)
    run = tmp_path / "run"
    interruption = INTERRUPTIONS[case]
    for i, stop in enumerate(interruption.stops):
        stop_after = {f"stop_after_{interruption.unit}": stop}
        run_training(cfg, run_dir=run, resume=i > 0, final_eval=False, **stop_after)
        assert torch.load(run / CHECKPOINT, weights_only=False)[interruption.unit] == stop
    run_training(cfg, run_dir=run, resume=True, final_eval=False)

    assert_same_run(run, full)


# multi-crop: extra crops of two sizes, one size twice (one tensor, one forward per size)
EXTRA_VIEWS = ["augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}",
               "augment.mid={size: 12, min_scale: 0.1, max_scale: 0.5}",
               "method.extra_views=[small,mid,small]"]


def _interrupted_and_full(cfg_of, tmp_path, stops=(3, 5)):
    """Runs `cfg_of(out)` in one go and interrupted after the global steps `stops` (mid-epoch), resumed."""
    torch.manual_seed(0)
    run_training(cfg_of(tmp_path / "a"), run_dir=tmp_path / "full", final_eval=False)
    cfg = cfg_of(tmp_path / "b")
    for i, stop in enumerate(stops):
        run_training(cfg, run_dir=tmp_path / "run", resume=i > 0, final_eval=False, stop_after_step=stop)
    run_training(cfg, run_dir=tmp_path / "run", resume=True, final_eval=False)
    return tmp_path / "run", tmp_path / "full"


@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if not cls.extra_views_refusal))
def test_resume_is_exact_mid_epoch_with_extra_views(method, tmp_path):
    run, full = _interrupted_and_full(lambda out: tiny_config(
        method, *small_heads(method), *PHASES.get(method, []), *EXTRA_VIEWS, f"train.epochs={EPOCHS}",
        "train.knn_every=0", "train.log_every=3", out_dir=out), tmp_path)
    assert_same_run(run, full)


def test_streamed_resume_is_exact_mid_epoch_with_extra_views(tmp_path):
    """The workers cut every crop, extra ones included, seeded by (seed, step, rank, position, view)."""
    root = image_folder(tmp_path / "data")
    run, full = _interrupted_and_full(lambda out: stream_config(
        root, "data.num_workers=0", *EXTRA_VIEWS, "train.epochs=2", "train.knn_every=0", "train.log_every=2",
        f"out_dir={out}"), tmp_path, stops=(1, 3))
    assert_same_run(run, full)


LIGHT = ["efficientnet_b0", "mobilenet_v3_large", "mobilenet_v3_small", "vit_s16"]


@pytest.mark.parametrize("backbone", LIGHT)
def test_resume_is_exact_mid_epoch_with_lightweight_backbones(backbone, tmp_path):
    """EfficientNet's stochastic depth and ViT's dropout paths draw from the restored RNG state."""
    if backbone == "vit_s16":
        pytest.importorskip("timm")
    run, full = _interrupted_and_full(lambda out: tiny_config(
        "simclr", *small_heads("simclr"), f"backbone.name={backbone}", "data.train_subset=48",
        "train.batch_size=16", "train.epochs=2", "train.knn_every=0", "train.log_every=2",
        out_dir=out), tmp_path)
    assert_same_run(run, full)
