"""Where and in which precision kith computes: the device and autocast dtype a config names, and
float32 islands inside autocast (losses, neighbour search) where bf16/fp16 would lose accuracy."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from kith.utils.errors import UserError

F = TypeVar("F", bound=Callable)


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when visible, else CPU), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host-device sync: a CPU tensor goes to CUDA through pinned memory and a
    non-blocking copy (a plain copy from pageable memory waits for the GPU's queued work, every step)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of `train.precision`, or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run CPU work on ``n`` intra-op threads (None: leave torch's setting alone)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def no_autocast(device_type: str):
    """Context that disables autocast on `device_type` (for code computed in float32)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


def float32_loss(fn: F) -> F:
    """Run `fn` outside autocast with its floating-point tensor arguments cast to float32: a loss's
    similarities, softmaxes and statistics keep float32 accuracy under bf16/fp16 training.
    (In float32 runs it changes nothing: `.float()` of a float32 tensor is the tensor itself.)"""

    def up(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = (a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        device = next((a.device for a in tensors), torch.device("cpu"))
        with no_autocast(device.type):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
