"""Exact resume, for every registered method: a run interrupted and resumed from its checkpoint (at
an epoch end or inside an epoch) ends bitwise equal to the same run done in one go (weights, buffers
such as queues, banks and prototypes, optimizer state, and every logged metric row)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kith.methods import METHODS
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from tests.conftest import small_heads, tiny_config

EPOCHS = 3  # of 2 steps (64 images, batch 32)
# ReSSL switches from InfoNCE to its relation loss at epoch 2; SPCL clusters at the start of
# epoch 2 only (cluster_every=2), so epoch 3 trains on the prototypes restored from the checkpoint.
PHASES = {"ressl": ["method.warmup_epochs=1"],
          "spcl": ["method.proto_warmup_epochs=1", "method.cluster_every=2"]}


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


def _logged(run_dir) -> list[dict]:
    """Train and epoch-start rows without wall-clock values (e.g. SPCL's cluster/time_s)."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s")}
            for r in read_metrics(run_dir) if r["kind"] in ("train", "epoch_start")]


def _assert_bitwise_equal(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_run(run_dir, full_dir) -> None:
    # every logged row (loss, lr, tau, method metrics; SPCL's clustering metrics) matches, and no
    # row is lost or repeated across the interruptions
    assert _logged(run_dir) == _logged(full_dir)
    want = torch.load(full_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    got = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    for key in ("method", "optimizer", "scaler", "epoch", "step", "images_seen"):
        _assert_bitwise_equal(want[key], got[key], key)


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

    _assert_same_run(run, full)
