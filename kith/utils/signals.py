"""SIGINT and SIGTERM stop kith the same way at any moment: as a KeyboardInterrupt in the main thread,
which every `finally` (the run folder's lock, a temp file) sees on its way out.

SIGTERM is what `kill`, SLURM's time limit and preemption send; Python's default for it ends the
process at once, skipping the clean-up. SIGINT is Ctrl-C; Python raises KeyboardInterrupt for it only
when the process did not inherit it as ignored, and a process started in the background by a
non-interactive shell (`cmd &` in a script, a CI runner) does inherit that: it would then train to
the end after a `kill -INT`, exit 0 and say nothing. So both handlers are installed explicitly, and
as the first thing a command or a run does, before any lock or file exists.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_received: list[str] = []  # the stop signals received inside `stop_on_signals`, in order


def _stop(signum: int, frame: Any) -> None:
    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check_stop() -> None:
    """Raise KeyboardInterrupt again when a stop signal came and its first KeyboardInterrupt was lost:
    Python swallows (prints "Exception ignored") an exception raised inside a finaliser, such as a
    DataLoader iterator's `__del__` shutting its workers down. The loop calls this every step."""
    if _received:
        raise KeyboardInterrupt(_received[-1])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while the body runs (main thread only; elsewhere a
    no-op: Python delivers signals to the main thread). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    outermost = not _received and all(h is not _stop for h in previous.values())
    try:
        yield
    finally:
        if outermost:
            _received.clear()
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
