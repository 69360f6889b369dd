"""Mid-epoch checkpoints: `train.checkpoint_every_minutes` writes one at a step boundary (a metrics
row) once that much wall time has passed (under torchrun: when rank 0's clock says so), and a run
resumed from a checkpoint inside an epoch ends bitwise equal to the run done in one go, also when it
was killed after its last checkpoint, under torchrun and with streamed data. (Every method's
mid-epoch resume: tests/test_resume.py.)"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

import kith.utils.rng
from kith.runs.checkpoint import CHECKPOINT
from kith.train.checkpointer import Checkpointer
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import (
    PHASES,
    assert_same_run,
    gloo_group,
    image_folder,
    logged_rows,
    small_heads,
    stream_config,
    tiny_config,
)

# 64 images / batch 16 = 4 steps per epoch; metrics rows every 3 steps and at epoch ends: after
# steps 3, 4, 6, 8, 9 and 12, the only steps where a timed checkpoint can be written
STEPS_PER_EPOCH, EPOCHS = 4, 3
RUN = ["train.batch_size=16", "train.log_every=3", f"train.epochs={EPOCHS}", "train.knn_every=0",
       "train.checkpoint_every_minutes=0"]


def _config(method: str, tmp_path, *extra: str):
    return tiny_config(method, *small_heads(method), *PHASES.get(method, []), *RUN, *extra, out_dir=tmp_path)


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)


def _interrupted(cfg, run_dir, stops: tuple[int, ...], clock=time.monotonic) -> None:
    """Run `cfg` stopping after each global step in `stops` (resuming after each), then to the end;
    every part reads `clock`."""
    run_dir = Path(run_dir)
    for i, stop in enumerate(stops):
        run_training(cfg, run_dir=run_dir, resume=i > 0, stop_after_step=stop, final_eval=False,
                     checkpointer=Checkpointer(clock))
        ckpt = _checkpoint(run_dir)
        assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (stop, *divmod(stop, STEPS_PER_EPOCH))
    run_training(cfg, run_dir=run_dir, resume=True, final_eval=False, checkpointer=Checkpointer(clock))


def _fake_clock(minutes_per_reading: float):
    """A monotonic clock that moves `minutes_per_reading` each time it is read."""
    readings = itertools.count()
    return lambda: next(readings) * minutes_per_reading * 60


class _RecordingCheckpointer(Checkpointer):
    """Records (step, epoch, epoch_step) of every checkpoint written; `fail_at_step`: the process dies
    just before writing that one (a kill between two checkpoints). `decisions`: every timed decision."""

    def __init__(self, clock=time.monotonic, fail_at_step: int | None = None):
        super().__init__(clock)
        self.fail_at_step = fail_at_step
        self.saves: list[tuple[int, int, int]] = []
        self.decisions: list[bool] = []

    def time_due(self) -> bool:
        self.decisions.append(super().time_due())
        return self.decisions[-1]

    def save(self, state, run_dir):
        if state["step"] == self.fail_at_step:
            raise KeyboardInterrupt
        self.saves.append((state["step"], state["epoch"], state["epoch_step"]))
        super().save(state, run_dir)


@pytest.mark.parametrize(("minutes", "per_reading", "expected"), [
    # due at every metrics row: mid-epoch ones after steps 3 and 9 (the row steps 3, 4, 6, 8, 9, 12),
    # epoch ends (train.checkpoint_every is 100 epochs here) written because the time has passed
    (1.0, 1.0, [(3, 0, 3), (4, 1, 0), (6, 1, 2), (8, 2, 0), (9, 2, 1), (12, 3, 0)]),
    (30.0, 0.0, [(12, 3, 0)]),  # a clock that does not move: the last epoch only
    (0.0, 1.0, [(12, 3, 0)]),  # off
])
def test_time_trigger_writes_at_metrics_rows(tmp_path, minutes, per_reading, expected):
    checkpointer = _RecordingCheckpointer(_fake_clock(per_reading))
    cfg = _config("simclr", tmp_path, "train.checkpoint_every=100",
                  f"train.checkpoint_every_minutes={minutes}")
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False, checkpointer=checkpointer)
    assert checkpointer.saves == expected


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # each rank's global generators differ (as each GPU's CUDA generator does), so All4One's dropout
    # draws differ per rank and a resume must restore every rank's own
    seed_everything = kith.utils.rng.seed_everything
    kith.utils.rng.seed_everything = lambda seed: seed_everything(seed + rank)
    # the ranks' clocks disagree: rank 0's finds a checkpoint due at every row, rank 1's never does
    clock = _fake_clock(1.0 if rank == 0 else 0.0)
    checkpointer = _RecordingCheckpointer(clock)
    with gloo_group(rank, 2, init_method=None):  # run_training creates the group from the environment
        cfg = _config("all4one", out_dir, "train.checkpoint_every=100", "train.checkpoint_every_minutes=1")
        run_training(cfg, run_dir=os.path.join(out_dir, "full"), final_eval=False, checkpointer=checkpointer)
        torch.save(checkpointer.decisions, os.path.join(out_dir, f"rank{rank}.pt"))
        _interrupted(cfg, os.path.join(out_dir, "split"), stops=(5,), clock=clock)


def test_torchrun_time_trigger_and_mid_epoch_resume(tmp_path):
    """2 gloo processes: every rank takes rank 0's checkpoint decision, and a run resumed mid-epoch
    equals the uninterrupted one."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    # one decision per metrics row (steps 3, 4, 6, 8, 9, 12), all of them rank 0's
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [True] * 6
    assert_same_run(tmp_path / "split", tmp_path / "full")


def test_killed_run_resumes_exactly_from_its_last_timed_checkpoint(tmp_path):
    """SPCL killed at step 6: the last checkpoint is the end of epoch 1 (step 4), and the killed run had
    already logged epoch 2's clustering row at step 4 and a train row at step 6; the resumed run drops
    both and writes them again, so the log matches an uninterrupted run's (no duplicate rows)."""
    cfg = _config("spcl", tmp_path, "train.checkpoint_every=100", "train.checkpoint_every_minutes=1")
    run_training(cfg, run_dir=tmp_path / "full", final_eval=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, run_dir=tmp_path / "killed", final_eval=False,
                     checkpointer=_RecordingCheckpointer(_fake_clock(1.0), fail_at_step=6))
    assert _checkpoint(tmp_path / "killed")["step"] == 4
    logged = [(r["kind"], r["step"]) for r in logged_rows(tmp_path / "killed")]
    assert logged[-2:] == [("epoch_start", 4), ("train", 6)]
    run_training(cfg, run_dir=tmp_path / "killed", resume=True, final_eval=False)
    assert_same_run(tmp_path / "killed", tmp_path / "full")


@pytest.mark.parametrize("method", ["simclr", "all4one"])  # All4One: dropout draws from torch's global RNG
def test_streamed_run_resumes_mid_epoch_exactly(tmp_path, method):

    # 18 training files / batch 8 = 2 steps per epoch: stop one step into epoch 2
    cfg = stream_config(image_folder(tmp_path / "data"), f"method.name={method}", *small_heads(method),
                      "data.num_workers=1", "train.epochs=2", "train.log_every=2", "train.knn_every=0",
                      "train.checkpoint_every_minutes=0")
    run_training(cfg, run_dir=tmp_path / "full", final_eval=False)
    run_training(cfg, run_dir=tmp_path / "split", stop_after_step=3, final_eval=False)
    assert _checkpoint(tmp_path / "split")["epoch_step"] == 1
    run_training(cfg, run_dir=tmp_path / "split", resume=True, final_eval=False)
    assert_same_run(tmp_path / "split", tmp_path / "full")


def test_mid_epoch_resume_needs_the_same_steps_per_epoch(tmp_path):

    # data.path may change on resume; here the new folder has more images: 3 steps per epoch, not 2
    extra = ("train.knn_every=0", "method.proj_hidden_dim=32", "data.num_workers=0")
    cfg = stream_config(image_folder(tmp_path / "a"), *extra)
    run_training(cfg, run_dir=tmp_path / "run", stop_after_step=3, final_eval=False)
    with pytest.raises(UserError, match="inside an epoch of 2 steps, which now has 3"):
        run_training(stream_config(image_folder(tmp_path / "b", n=40), *extra), run_dir=tmp_path / "run",
                     resume=True, final_eval=False)


def test_mid_epoch_checkpoint_after_a_resume_onto_more_data_counts_the_epochs_own_steps(tmp_path):
    """data.path may change at an epoch end: the epochs after it have 3 steps, not 2, so a checkpoint
    written 2 steps into epoch 2 (global step 4) says 2 steps of that epoch are done, and the run
    resumed from it trains the epoch's last step, then epoch 3."""
    extra = ("train.knn_every=0", "method.proj_hidden_dim=32", "data.num_workers=0", "train.epochs=3")
    run_training(stream_config(image_folder(tmp_path / "a"), *extra), run_dir=tmp_path / "run",
                 stop_after_epoch=1, final_eval=False)
    more = stream_config(image_folder(tmp_path / "b", n=40), *extra)
    run_training(more, run_dir=tmp_path / "run", resume=True, stop_after_step=4, final_eval=False)
    ckpt = _checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"], ckpt["steps_per_epoch"]) == (1, 4, 2, 3)
    assert run_training(more, run_dir=tmp_path / "run", resume=True, final_eval=False).epochs == 3
    assert _checkpoint(tmp_path / "run")["step"] == 2 + 3 + 3


def test_checkpoint_every_minutes_may_change_on_resume(tmp_path):
    run_training(_config("simclr", tmp_path), run_dir=tmp_path / "run", stop_after_step=5, final_eval=False)
    cfg = _config("simclr", tmp_path, "train.checkpoint_every_minutes=5")
    assert run_training(cfg, run_dir=tmp_path / "run", resume=True, final_eval=False).epochs == EPOCHS


def test_negative_minutes_is_a_user_error():
    with pytest.raises(UserError, match="checkpoint_every_minutes"):
        tiny_config("simclr", "train.checkpoint_every_minutes=-1")
