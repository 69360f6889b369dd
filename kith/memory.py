"""Memory for neighbour- and relation-based methods: a FIFO queue of normalised embeddings
(saved in checkpoints, all-gathered on push under DDP) and an exact, memory-bounded top-k search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kith import distributed
from kith.device import no_autocast
from kith.errors import UserError

__all__ = ["Queue", "chunked_topk"]


@torch.no_grad()
def chunked_topk(queries: Tensor, keys: Tensor, k: int, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-k of ``queries @ keys.T`` along the keys, without materialising the full (B, N) matrix.

    ``queries: (B, D)``, ``keys: (N, D)`` (used as given: normalise them for cosine similarity).
    Returns ``(sims, idx)``, both (B, k), sorted descending (nearest first): the same as
    ``torch.topk(queries @ keys.T, k)`` but with peak extra memory O(B x chunk_size). Loops over key
    chunks, keeping a running top-k that is merged with each chunk's top-k. Float32 even under
    autocast (inputs are cast up).
    """
    n = keys.shape[0]
    if not 1 <= k <= n:
        raise UserError(f"cannot take the {k} nearest neighbours among {n} entries; use 1 <= k <= {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    best_sims: Tensor | None = None
    best_idx: Tensor | None = None
    with no_autocast(queries.device.type):
        q = queries.float()
        for start in range(0, n, chunk_size):
            chunk = keys[start : start + chunk_size].float()
            sims = q @ chunk.T  # (B, c)
            c_sims, c_idx = sims.topk(min(k, sims.shape[1]), dim=1)
            c_idx = c_idx + start
            if best_sims is None:
                best_sims, best_idx = c_sims, c_idx
                continue
            merged_sims = torch.cat([best_sims, c_sims], dim=1)
            merged_idx = torch.cat([best_idx, c_idx], dim=1)
            best_sims, pos = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
            best_idx = merged_idx.gather(1, pos)
    assert best_sims is not None and best_idx is not None
    return best_sims, best_idx


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

        ptr = int(self.ptr)
        skip = max(0, n - self.size)  # rows that would be overwritten within this same push
        pos = (ptr + torch.arange(skip, n, device=device)) % self.size
        self.data[pos] = x[skip:]
        self.labels[pos] = labels[skip:]
        self.indices[pos] = indices[skip:]
        self.ptr.fill_((ptr + n) % self.size)

    @torch.no_grad()
    def neighbours(self, queries: Tensor, k: int, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
        """Cosine top-k of ``queries (B, dim)`` (normalised inside) in the queue: ``(sims (B, k),
        idx (B, k))``, nearest first. Index ``self.data[idx]``, ``self.labels[idx]``, ..."""
        q = F.normalize(queries.detach().to(device=self.data.device, dtype=torch.float32), dim=-1)
        return chunked_topk(q, self.data, k, chunk_size)
