"""Decoding many images at once within a memory budget: threads that decode together hold at most a
budget of pixels (read from each file's header first), so a folder of huge images is decoded a few at a
time instead of eight at a time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# the header pixels of the images decoded at once: ~360 MB as RGB (PIL's intermediates come on top), so
# 8 threads decode 8 ordinary photos together but only 3 at data.max_pixels's default, and one image
# larger than the whole budget (data.max_pixels raised) is decoded alone
DECODE_BUDGET_PIXELS = 120_000_000
DECODE_THREADS = 8


class PixelBudget:
    """A counting semaphore over pixels: `hold(n)` waits until `n` of the budget are free (an `n` above
    the whole budget waits for all of it, so it runs alone) and returns them on exit."""

    def __init__(self, pixels: int):
        self.total, self.free = pixels, pixels
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(max(pixels, 0), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self._cond:
                self.free += pixels
                self._cond.notify_all()


def map_bounded(fn: Callable[[str], Any], files: list[str], pixels_of: Callable[[str], int]
                ) -> Iterator[Any]:
    """`fn(file)` for every file on DECODE_THREADS threads, in order, with the calls in flight holding
    at most DECODE_BUDGET_PIXELS pixels together (`pixels_of(file)`: by its header): memory is bounded
    by image sizes, not only by the thread count (a 20 KB PNG can be 13000 x 13000)."""
    budget = PixelBudget(DECODE_BUDGET_PIXELS)

    def run(path: str) -> Any:
        with budget.hold(pixels_of(path)):
            return fn(path)

    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        yield from pool.map(run, files)
