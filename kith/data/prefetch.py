"""Batches prepared ahead in a background thread, so the main thread can queue the next step's kernels
while the next batch is made.

`data.decode=gpu` makes each batch on the device (a batched JPEG decode, then the crops): a host call
that blocks until the decoder returns. Run on the main thread, it sits between two steps and the GPU
waits for it; `prefetch` runs it for batch k+1 in a thread of its own while the main thread runs step
k (torch releases the GIL inside its ops). On CUDA the thread works on a stream of its own and records
an event after each batch; the consumer's stream waits for that event before it uses the batch (no host
sync) and the batch's tensors are marked as used on the consumer's stream, so the allocator does not
hand their memory back to the thread's stream while a step still reads them.

The order of the batches is the source's. An exception raised while preparing a batch (a file that did
not decode) is raised by the consumer at that batch's position, after the batches before it. Closing
the consumer (a `break`, an exception in the step, the end of a run) stops the thread after the batch
it is making and joins it, so the source iterator is no longer used once `prefetch` has returned: the
next epoch may start a new one.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["prefetch"]

T = TypeVar("T")
U = TypeVar("U")

_END = object()  # the source is exhausted


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(out) -> list[torch.Tensor]:
    """The tensors in `out`: nested lists, tuples and dicts, and the fields of a dataclass (a `Batch`)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)]


def cuda_index(device: torch.device) -> int:
    """The CUDA device the background thread makes current: `device`'s index, or for a plain "cuda" the
    caller's current device (`torch.cuda.set_device` refuses a device without an index, and a new thread
    starts on device 0 whatever the caller's is)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def prefetch(items: Iterable[T], prepare: Callable[[T], U], device: torch.device, depth: int = 1
             ) -> Iterator[U]:
    """`prepare(item)` for each item of `items`, in order, each made in a background thread while the
    consumer works on the one before (at most `depth` made and not yet taken)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    index = cuda_index(device) if cuda else None
    stream = torch.cuda.Stream(index) if cuda else None

    def put(entry) -> bool:
        """Hand `entry` to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            if cuda:
                torch.cuda.set_device(index)
            for item in items:
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(stream):
                        out = prepare(item)
                        done = torch.cuda.Event()
                        done.record(stream)
                else:
                    out, done = prepare(item), None
                if not put((out, done)):
                    return
        except BaseException as error:  # noqa: BLE001 - raised again by the consumer, in order
            put(_Failed(error))
            return
        put(_END)

    thread = threading.Thread(target=work, name="kith-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            entry = ready.get()
            if entry is _END:
                return
            if isinstance(entry, _Failed):
                raise entry.error
            out, done = entry
            if done is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(done)
                for leaf in _tensors(out):
                    if leaf.is_cuda:
                        leaf.record_stream(consumer)
            yield out
    finally:
        stop.set()
        thread.join()
