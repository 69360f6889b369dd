"""The checkpoint's format (kith.train.state): the loop part round-trips, a run writes exactly the keys
kith checkpoints have always had, and a checkpoint of an older kith (written at an epoch end, before
the keys of mid-epoch resume existed) still resumes, to the same weights as a run done in one go."""

from __future__ import annotations

import torch

from kith.runs.checkpoint import CHECKPOINT
from kith.train.loop import run_training
from kith.train.state import LoopState, own_rng
from tests.helpers import small_heads, tiny_config

LOOP_KEYS = {"epoch", "step", "epoch_step", "steps_per_epoch", "pending", "elapsed", "images_seen"}
CHECKPOINT_KEYS = LOOP_KEYS | {"method", "optimizer", "scaler", "rng", "rank_rng", "config"}
# what a checkpoint of kith before mid-epoch resume and per-rank generators held
OLD_KEYS = {"method", "optimizer", "scaler", "epoch", "step", "rng"}


def test_loop_state_round_trips_through_its_checkpoint_keys():
    state = LoopState(steps_per_epoch=4, epoch=2, step=9, epoch_step=1, pending=[{"loss": 1.5}], elapsed=3.25,
                      images_seen=144)
    saved = state.state_dict()
    assert set(saved) == LOOP_KEYS
    back = LoopState(steps_per_epoch=4)
    back.load_state_dict(saved)
    assert back == state
    assert state.state_dict(elapsed=7.5)["elapsed"] == 7.5  # mid-epoch: the time into the epoch counts


def test_an_old_checkpoint_dict_loads_with_the_defaults_of_an_epoch_end():
    rng = {"torch": torch.get_rng_state()}
    old = {"method": {}, "optimizer": {}, "scaler": {}, "epoch": 3, "step": 12, "rng": rng}
    state = LoopState(steps_per_epoch=5)  # this run's, which the old checkpoint does not know
    state.load_state_dict(old)
    assert state == LoopState(steps_per_epoch=5, epoch=3, step=12, epoch_step=0, pending=[], elapsed=0.0,
                              images_seen=0)
    assert not state.mid_epoch
    assert own_rng(old, rank=0, world=1) is rng
    assert own_rng({**old, "rank_rng": None}, rank=1, world=2) is rng  # no per-rank states: rank 0's
    ranks = [{"r": 0}, {"r": 1}]
    assert own_rng({**old, "rank_rng": ranks}, rank=1, world=2) is ranks[1]


def _config(out_dir):
    return tiny_config("mocov2plus", *small_heads("mocov2plus"), "train.epochs=3", "train.knn_every=0",
                       out_dir=out_dir)


def test_a_run_writes_the_checkpoint_keys_of_every_kith_and_resumes_an_old_checkpoint(tmp_path):
    full = run_training(_config(tmp_path), run_dir=tmp_path / "full", final_eval=False)
    run_training(_config(tmp_path), run_dir=tmp_path / "old", stop_after_epoch=1, final_eval=False)
    path = tmp_path / "old" / CHECKPOINT
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt) == CHECKPOINT_KEYS
    torch.save({k: v for k, v in ckpt.items() if k in OLD_KEYS}, path)  # as an older kith wrote it
    resumed = run_training(_config(tmp_path), run_dir=tmp_path / "old", resume=True, final_eval=False)
    assert resumed.epochs == 3
    want, got = full.method.state_dict(), resumed.method.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # weights, BatchNorm statistics and the queue
