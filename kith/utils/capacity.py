"""What this machine can hold: its memory (RAM from os.sysconf, a CUDA device's from torch) and
byte counts worded for a message. Sizes a user sets are checked against these before anything is
allocated (`kith.train.capacity` for config keys, `kith.runs.files` for checkpoints)."""

from __future__ import annotations

import os

import torch


def host_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (os.sysconf, no psutil); None where it cannot be read."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page if pages > 0 and page > 0 else None


def device_memory_bytes(device: torch.device) -> int | None:
    """The total memory of `device` in bytes: the GPU's for CUDA, the machine's otherwise."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def format_bytes(n: float) -> str:
    """`5.1 TB`, `24 GB`, `512 MB` (decimal units, two significant digits at least)."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n)} bytes"
