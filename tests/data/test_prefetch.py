"""`kith.data.prefetch`: batches made one ahead in a background thread (decode=gpu's device decode) come in
the source's order, the next one made while the consumer works on the current one; an error is raised at
its batch's position; closing the consumer stops the thread before the source is used again."""

from __future__ import annotations

import threading

import pytest
import torch

from kith.data.loader import StreamingLoader
from kith.data.prefetch import prefetch
from kith.utils.errors import UserError
from tests.data.test_streaming import _loader
from tests.helpers import image_folder

CPU = torch.device("cpu")


def test_items_come_in_order_prepared_in_another_thread():
    threads = set()

    def prepare(i):
        threads.add(threading.current_thread().name)
        return torch.full((2,), i)

    out = list(prefetch(range(7), prepare, CPU))
    assert [int(t[0]) for t in out] == list(range(7))
    assert threads == {"kith-prefetch"}


def test_the_next_item_is_made_while_the_consumer_works_on_this_one():
    started = [threading.Event() for _ in range(3)]

    def prepare(i):
        started[i].set()
        return i

    items = prefetch(range(3), prepare, CPU)
    assert next(items) == 0
    # the consumer holds item 0 and has not asked for item 1: the thread makes it meanwhile
    assert started[1].wait(timeout=10)
    assert list(items) == [1, 2]


def test_an_error_is_raised_at_its_items_position():
    def prepare(i):
        if i == 2:
            raise UserError("image 2 did not decode")
        return i

    items = prefetch(range(5), prepare, CPU)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(UserError, match="image 2"):
        next(items)


def test_closing_the_consumer_stops_the_thread_and_the_source():
    taken = []

    def source():
        for i in range(100):
            taken.append(i)
            yield i

    before = set(threading.enumerate())
    items = prefetch(source(), lambda i: i, CPU, depth=1)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t not in before and t.name == "kith-prefetch"]
    used = len(taken)
    assert used <= 3  # the item taken, one ready, at most one being made
    assert len(taken) == used  # nothing reads the source after close


def test_a_streaming_loader_in_the_background_gives_the_same_batches(tmp_path):
    root = image_folder(tmp_path, n=48)  # 36 training images: 4 steps of 8
    plain, background = _loader(root, 1), _loader(root, 1)
    assert isinstance(background, StreamingLoader) and not plain.background
    background.background = True
    for start in (0, 1):  # a whole epoch, and one resumed after its first step
        want, got = list(plain.epoch(1, start)), list(background.epoch(1, start))
        assert len(want) == len(got) > 0
        for a, b in zip(want, got):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    for batch in background.epoch(2):  # a consumer that stops early leaves the loader usable
        break
    assert len(list(background.epoch(2))) == len(plain)


def test_the_thread_makes_the_callers_cuda_device_current(monkeypatch):
    # train.device=auto gives a plain "cuda", which torch.cuda.set_device refuses (no index): the
    # thread takes the caller's current device instead
    from torch.cuda._utils import _get_device_index

    from kith.data.prefetch import cuda_index

    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_index(torch.device("cuda")) == 3 and cuda_index(torch.device("cuda", 1)) == 1
    assert _get_device_index(cuda_index(torch.device("cuda"))) == 3
