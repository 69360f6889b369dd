"""Memory for neighbour- and relation-based methods: a FIFO queue of normalised embeddings
(saved in checkpoints, all-gathered on push under DDP) and an exact, memory-bounded top-k search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kith.utils import distributed
from kith.utils.device import no_autocast
from kith.utils.errors import UserError

__all__ = ["Queue", "candidates", "chunked_topk"]


@torch.no_grad()
def chunked_topk(queries: Tensor, keys: Tensor, k: int, chunk_size: int = 65536,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Top-k of ``queries @ keys.T`` along the keys, without materialising the full (B, N) matrix.

    ``queries: (B, D)``, ``keys: (N, D)`` (used as given: normalise them for cosine similarity).
    Returns ``(sims, idx)``, both (B, k), sorted descending (nearest first), sims in float32.
    Loops over key chunks, keeping a running top-k that is merged with each chunk's top-k, so the
    extra memory is O(B x chunk_size) instead of the O(B x N) of ``torch.topk(queries @ keys.T, k)``.
    Autocast is ignored: ``dtype`` alone sets the precision.

    ``dtype=float32`` (the default) is exact: the same indices as the unchunked top-k.
    ``dtype=bfloat16`` / ``float16`` computes the chunk similarities in that dtype (tensor cores)
    and keeps ``candidates(k)`` of them, which are then re-scored in float32 and cut to k: the
    returned sims are exact float32 similarities of the returned rows and the order among them is
    the float32 order, but a true neighbour can be missed where more than the candidates tie
    within bf16's resolution (about 0.004 near a cosine of 1).
    """
    n = keys.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"cannot take the {k} nearest neighbours among {n} entries; use 1 <= k <= {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    exact = dtype == torch.float32
    keep = k if exact else min(candidates(k), n)
    best_sims: Tensor | None = None
    best_idx: Tensor | None = None
    with no_autocast(queries.device.type):
        q = queries.to(dtype)
        for start in range(0, n, chunk_size):
            chunk = keys[start : start + chunk_size].to(dtype)  # no copy when keys already have dtype
            c_sims, c_idx = (q @ chunk.T).topk(min(keep, chunk.shape[0]), dim=1)  # (B, c) -> (B, keep)
            c_idx = c_idx + start
            if best_sims is None:
                best_sims, best_idx = c_sims, c_idx
                continue
            merged_sims = torch.cat([best_sims, c_sims], dim=1)
            merged_idx = torch.cat([best_idx, c_idx], dim=1)
            best_sims, pos = merged_sims.topk(min(keep, merged_sims.shape[1]), dim=1)
            best_idx = merged_idx.gather(1, pos)
        assert best_sims is not None and best_idx is not None
        if exact:
            return best_sims, best_idx
        # re-score the candidates in float32: exact values, float32 order
        rescored = torch.einsum("bd,bkd->bk", queries.float(), keys[best_idx].float())
        sims, pos = rescored.topk(k, dim=1)
        return sims, best_idx.gather(1, pos)


def candidates(k: int) -> int:
    """How many low-precision candidates `chunked_topk` re-scores in float32 to return k."""
    return 2 * k + 16


class Queue(torch.nn.Module):
    """FIFO ring buffer of L2-normalised embeddings; contents and pointer are buffers (so in
    state_dict / checkpoints).

    Buffers: ``data (size, dim)`` float32, initialised with normalised random vectors from a
    generator seeded with ``seed``; ``labels (size,)`` and ``indices (size,)`` long, -1 when unknown;
    ``ptr ()`` long, the next row to overwrite.
    """

    data: Tensor
    labels: Tensor
    indices: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise UserError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("data", F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        # the pointer lives on the device only: a push computes its rows from it there, so it reads
        # nothing back to the host and a push inside a compiled step (MSF's) changes no Python value
        # dynamo would guard on (a host int would recompile the step at every push)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    @torch.no_grad()
    def push(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        indices: Tensor | None = None,
        gather: bool = True,
    ) -> None:
        """Write ``x (B, dim)`` (normalised here, stored as float32) at the pointer, wrapping around.

        With ``gather`` the batch (and labels / dataset indices) is first all-gathered over ranks, so
        every rank holds the same queue. Rows without labels / indices store -1. A batch larger than
        the queue keeps its last ``size`` rows (as if pushed row by row).
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Queue.push expects (B, {self.dim}) embeddings, got {tuple(x.shape)}")
        if gather:
            x = distributed.gather(x.contiguous())
            labels = distributed.gather(labels.contiguous()) if labels is not None else None
            indices = distributed.gather(indices.contiguous()) if indices is not None else None
        device = self.data.device
        n = x.shape[0]
        x = F.normalize(x.detach().to(device=device, dtype=torch.float32), dim=1)
        labels = (
            labels.to(device=device, dtype=torch.long)
            if labels is not None
            else torch.full((n,), -1, dtype=torch.long, device=device)
        )
        indices = (
            indices.to(device=device, dtype=torch.long)
            if indices is not None
            else torch.full((n,), -1, dtype=torch.long, device=device)
        )
        if labels.shape != (n,) or indices.shape != (n,):
            raise ValueError(f"labels and indices must have shape ({n},)")

        skip = max(0, n - self.size)  # rows that would be overwritten within this same push
        # the rows written, wrapping around: distinct (at most `size` of them), so the copy is exact
        rows = (self.ptr + skip + torch.arange(n - skip, device=device)) % self.size
        self.data.index_copy_(0, rows, x[skip:])
        self.labels.index_copy_(0, rows, labels[skip:])
        self.indices.index_copy_(0, rows, indices[skip:])
        self.ptr.copy_((self.ptr + n) % self.size)

    @torch.no_grad()
    def neighbours(self, queries: Tensor, k: int, chunk_size: int = 65536,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Cosine top-k of ``queries (B, dim)`` (normalised inside) in the queue: ``(sims (B, k),
        idx (B, k))``, nearest first. Index ``self.data[idx]``, ``self.labels[idx]``, ...
        ``dtype``: the similarity precision, see :func:`chunked_topk` (float32: exact)."""
        q = F.normalize(queries.detach().to(device=self.data.device, dtype=torch.float32), dim=-1)
        return chunked_topk(q, self.data, k, chunk_size, dtype)
