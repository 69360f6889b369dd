"""What this machine can hold: its memory (RAM from os.sysconf, a CUDA device's from torch), byte counts
worded for a message, and the refusal of sizes a user set that cannot fit. Those sizes are estimated
before anything is allocated (`kith.train.capacity` for config keys, `kith.runs.files` for checkpoints)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kith.utils.errors import UserError


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


@dataclass(frozen=True)
class Need:
    """What one user-set size costs: `key=value` needs `bytes` for `what` (e.g. "the queue (128 x 4 bytes
    each)")."""

    key: str
    value: Any
    bytes: float
    what: str
    fix: str = ""  # how to need less; default "lower <key>"


def refusal(needs: list[Need], capacity: int | None, where: str) -> UserError | None:
    """The one-line error when the `needs` together exceed `capacity` bytes (`where`: "this machine",
    "cuda:0"), naming the largest of them and its estimate; None when they fit or capacity is unknown."""
    total = sum(n.bytes for n in needs)
    if capacity is None or total <= capacity:
        return None
    top = max(needs, key=lambda n: n.bytes)
    others = f" ({format_bytes(total)} with the rest)" if total > top.bytes * 1.05 else ""
    return UserError(f"{top.key}={top.value} needs {format_bytes(top.bytes)} for {top.what}{others}; "
                     f"{where} has {format_bytes(capacity)}: {top.fix or 'lower ' + top.key}")


def check_fits(needs: list[Need], device: torch.device) -> None:
    """Raise `refusal`'s one-line error when `needs` exceed the memory of `device`."""
    where = f"the GPU {device}" if device.type == "cuda" else "this machine"
    error = refusal(needs, device_memory_bytes(device), where)
    if error is not None:
        raise error


def classifier_need(in_dim: int, num_classes: int) -> Need:
    """A linear classifier over `num_classes` (kNN votes and linear probes size theirs by the largest
    label): its weights and bias in float32, with a gradient and SGD momentum each."""
    return Need("num_classes", num_classes, (in_dim + 1) * num_classes * 4 * 3,
                f"a linear classifier ({in_dim} + 1 weights a class x 4 bytes, x 3 with gradient and "
                "momentum)",
                "the largest label sets num_classes: number the classes 0..K-1")
