"""Distributed helpers: torchrun setup, gathers (with and without gradient), rank-aware printing.

Every function works unchanged in a single process (world size 1), so methods and losses
call them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def setup_from_env() -> torch.device | None:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    Returns the device this rank should use, or None when not launched distributed.
    NCCL on CUDA, gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not is_distributed():
        dist.init_process_group(backend=backend)
    return device


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this
    rank's slice, so a loss computed on the gathered batch gets the same gradients as the
    single-process loss on the concatenated batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks along dim 0, keeping the gradient path."""
    if world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks along dim 0, no gradient (queue pushes)."""
    if world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's output is the same sum, so the gradient of each rank's input is the
    sum of all ranks' output gradients (torch.distributed.nn's deprecated all_reduce, as our own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks with gradient flowing to every rank's input (autograd-aware)."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (one 1-element broadcast on `device`, a CUDA device under NCCL)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def gather_objects(obj: object) -> list:
    """`obj` of every rank, in rank order (`[obj]` in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank_offset(batch_size: int) -> int:
    """Index of this rank's first sample in the gathered batch."""
    return rank() * batch_size
