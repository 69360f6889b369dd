"""When to draw a progress bar: asked for, and stderr is a terminal.

A bar redraws itself with carriage returns; into a log file (stderr redirected, a SLURM job, CI) it
writes every redraw as text (tens of kilobytes for the demo), so a bar is drawn only on a terminal.
"""

from __future__ import annotations

import sys


def show_progress(requested: bool) -> bool:
    """Whether to draw a bar that `requested` (e.g. `train.progress`) asks for."""
    return bool(requested) and sys.stderr.isatty()
