"""Resume on a GPU, without one: a checkpoint is loaded on the CPU whatever the run's device (the RNG
states must be CPU ByteTensors; `load_state_dict` places the weights), and only this process's own
CUDA generator is saved and restored, so a checkpoint of a machine with more GPUs resumes on one with
fewer. The `meta` device stands in for `cuda` where a device is needed; torch.cuda's generator
functions are monkeypatched where CUDA itself is."""

from __future__ import annotations

import pytest
import torch

from kith.train.checkpointer import Checkpointer
from kith.train.loop import run_training
from kith.train.setup import build_trainer
from kith.train.state import LoopState
from kith.utils import rng
from tests.helpers import small_heads, tiny_config


def test_restore_loads_the_checkpoint_on_the_cpu_whatever_the_run_device(tmp_path):
    cfg = tiny_config("byol", *small_heads("byol"), "train.epochs=1", "train.knn_every=0", out_dir=tmp_path)
    done = run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    trainer = build_trainer(cfg, torch.device("cpu"), num_samples=64, steps_per_epoch=2)
    trainer.device = torch.device("meta")  # a GPU run: map_location=device put the RNG states there
    checkpointer = Checkpointer()
    checkpointer.begin(cfg, tmp_path / "run", trainer)
    state = LoopState(steps_per_epoch=2)
    torch.manual_seed(123)  # restore must replace this
    checkpointer.restore(state)
    assert state.epoch == 1 and state.step == 2
    for name, value in done.method.state_dict().items():
        assert torch.equal(trainer.method.state_dict()[name], value), name
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])


class _FakeCuda:
    """torch.cuda's generator functions on a machine with `count` devices, this process on `current`."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
        self.current = current
        self.restored: list[torch.Tensor] = []

        def every_device(*args):
            raise AssertionError("every device's generator: an 8-GPU checkpoint fails on a smaller machine")

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)

    def _set(self, state, device="cuda"):
        assert state.device.type == "cpu" and state.dtype == torch.uint8  # what torch.cuda accepts
        self.restored.append(state)


def test_only_the_processes_own_cuda_generator_is_saved_and_restored(monkeypatch):
    cuda = _FakeCuda(monkeypatch, count=8, current=5)  # rank 5 of an 8-GPU machine
    state = rng.rng_state()
    assert state["cuda"] is cuda.states[5]
    cuda.current = 0  # resumed on a machine with one GPU
    rng.set_rng_state(state)
    assert len(cuda.restored) == 1 and torch.equal(cuda.restored[0], cuda.states[5])


@pytest.mark.parametrize("count,current,restored", [(2, 1, 1), (8, 0, 0), (1, 3, None)])
def test_an_older_checkpoints_list_of_every_device_restores_this_devices_entry(monkeypatch, count, current,
                                                                               restored):
    cuda = _FakeCuda(monkeypatch, count=8, current=current)
    old = {**rng.rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]}
    rng.set_rng_state(old)
    if restored is None:  # the saving machine had no device of that number: nothing to restore
        assert cuda.restored == []
    else:
        assert len(cuda.restored) == 1 and int(cuda.restored[0][0]) == restored
