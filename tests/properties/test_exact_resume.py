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
from tests.helpers import PHASES, assert_same_run, small_heads, tiny_config

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
