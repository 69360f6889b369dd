"""One rule for queues: a training step reads its queues as the previous step left them and changes
nothing in them; the pushes it records (`Method.enqueue`) land at `Method.after_step`, which the train
step calls after the optimizer step. MSF's push before its neighbour lookup (`push_before_lookup`) is
the one exception. A forward while pushes are still pending is a programming error and raises."""

from __future__ import annotations

import pytest
import torch

from kith.data.loader import Batch
from kith.memory import Queue
from kith.methods.context import StepInfo, TrainInfo
from kith.train.setup import build_method
from kith.train.step import TrainStep
from tests.helpers import small_heads, tiny_config

B = 8
DEFERRED = ["nnclr", "all4one", "mocov2plus", "ressl"]  # every queue method but MSF


def _method(name: str):
    info = TrainInfo(num_samples=64, steps_per_epoch=4, epochs=2)
    return build_method(tiny_config(name, *small_heads(name)), info).train()


def _inputs(seed: int = 0) -> tuple[list[torch.Tensor], Batch]:
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 16, 16, generator=gen) for _ in range(2)]
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8),
                  labels=torch.randint(0, 10, (B,), generator=gen), indices=torch.arange(B) + 100)
    return views, batch


def _queues(m) -> list[Queue]:
    return [q for q in m.modules() if isinstance(q, Queue)]


def _snapshot(m) -> list[dict]:
    return [{"state": {k: v.clone() for k, v in q.state_dict().items()}} for q in _queues(m)]


def _assert_same(m, snapshot: list[dict]) -> None:
    for q, before in zip(_queues(m), snapshot):
        for key, value in q.state_dict().items():
            assert torch.equal(value, before["state"][key]), key


def _assert_holds_batch(m, batch: Batch, initial: list[dict]) -> None:
    """Every queue took this batch once: its first B rows are new, with the batch's labels and indices."""
    for q, before in zip(_queues(m), initial):
        assert int(q.ptr) == B
        assert torch.equal(q.labels[:B], batch.labels) and torch.equal(q.indices[:B], batch.indices)
        assert not torch.equal(q.data[:B], before["state"]["data"][:B])
        assert torch.equal(q.data[B:], before["state"]["data"][B:])


@pytest.mark.parametrize("name", DEFERRED)
def test_a_step_leaves_the_queues_alone_and_after_step_pushes(name):
    m = _method(name)
    views, batch = _inputs()
    initial = _snapshot(m)
    assert initial, f"{name} has no queue"
    loss, _ = m(views, batch, StepInfo(0, 4))
    _assert_same(m, initial)
    loss.backward()  # backward reads the queues as the loss saw them
    _assert_same(m, initial)
    m.after_step()
    _assert_holds_batch(m, batch, initial)
    m.after_step()  # each recorded push is applied once
    _assert_holds_batch(m, batch, initial)


def test_msf_pushes_its_targets_before_the_lookup_and_after_step_adds_nothing():
    m = _method("msf")
    views, batch = _inputs()
    initial = _snapshot(m)
    loss, _ = m(views, batch, StepInfo(0, 4))
    _assert_holds_batch(m, batch, initial)  # the named exception: the bank holds the current targets
    after_forward = _snapshot(m)
    loss.backward()
    m.after_step()
    _assert_same(m, after_forward)


@pytest.mark.parametrize("name", DEFERRED)
def test_a_second_forward_before_after_step_raises(name):
    m = _method(name)
    views, batch = _inputs()
    m(views, batch, StepInfo(0, 4))
    pending = _snapshot(m)
    with pytest.raises(RuntimeError, match="after_step"):
        m(views, batch, StepInfo(1, 4))
    _assert_same(m, pending)  # refused before anything ran
    m.after_step()
    m(views, batch, StepInfo(1, 4))  # the step sequence is whole again


@pytest.mark.parametrize("name", [*DEFERRED, "msf"])
def test_the_train_step_applies_the_pushes_after_the_optimizer_step(name):
    cfg = tiny_config(name, *small_heads(name))
    trainer = TrainStep(cfg, build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=4, epochs=2)),
                        torch.device("cpu"), steps_per_epoch=4)
    views, batch = _inputs()
    initial = _snapshot(trainer.method)
    trainer.optimize(views, batch, 0)
    _assert_holds_batch(trainer.method, batch, initial)
    trainer.optimize(views, batch, 1)  # nothing left pending: the next step runs
    assert all(int(q.ptr) == 2 * B for q in _queues(trainer.method))


def test_after_step_applies_the_recorded_pushes_in_recording_order():
    from torch import nn

    from kith.methods.base import Method, MethodConfig

    class TwoPushes(Method):
        Config = MethodConfig

        def training_step(self, views, batch, step):
            self.enqueue(self.queue, views[0], batch.labels)
            self.enqueue(self.queue, views[1], batch.labels + 10)
            return views[0].sum(), {}

    m = TwoPushes(MethodConfig(name="two_pushes"), nn.Identity(), 4, TrainInfo(10, 5, 2))
    m.queue = Queue(3, 4)
    first, second = torch.randn(2, 4), torch.randn(2, 4)
    batch = Batch(images=torch.zeros(2, 3, 1, 1, dtype=torch.uint8), labels=torch.tensor([1, 2]),
                  indices=torch.arange(2))
    m([first, second], batch, StepInfo(0, 5))
    m.after_step()
    # 4 rows through a ring of 3: the first push's second row was overwritten by the second push's last
    assert torch.equal(m.queue.labels, torch.tensor([12, 2, 11]))
    assert int(m.queue.ptr) == 1
