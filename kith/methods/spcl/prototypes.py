"""SPCL prototype state: the per-image bank, the k-means prototypes at each granularity, and
the intra-prototype partner sampling.

Everything is a buffer of a shape fixed by the constructor, so the whole state rides along in
the method's state_dict (checkpoints) and loads into a fresh `PrototypeState(N, D, Ks)`.

Per granularity g (index into `num_prototypes`, K_g prototypes):
  assignments_g (N,)    prototype of each dataset index (-1 before the first clustering)
  centroids_g   (K_g, D) normalised prototype vectors
  members_g     (N,)    dataset indices sorted by prototype (stable, so ascending within one)
  starts_g      (K_g,)  offset of each prototype's first member in members_g
  sizes_g       (K_g,)  number of members of each prototype
  position_g    (N,)    where each dataset index sits in members_g
The last four make `partners` a handful of gathers: draw a rank in [0, size-1) and skip over
the image's own position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kith.methods.spcl.cluster import spherical_kmeans
from kith.utils import distributed
from kith.utils.device import to_device
from kith.utils.errors import UserError


def resolve_num_prototypes(config: Any, num_samples: int) -> list[int]:
    """K per granularity: `config.num_prototypes`, or round(N / r) for r in `config.num_prototypes_ratio`."""
    if config.num_prototypes is not None:
        return [int(k) for k in config.num_prototypes]
    ratios = [float(r) for r in (config.num_prototypes_ratio or [])]
    if not ratios:
        raise UserError("method.num_prototypes and method.num_prototypes_ratio are both empty; set one")
    for r in ratios:
        if r < 1:
            raise UserError(f"method.num_prototypes_ratio {r} < 1 would give more prototypes than the "
                            f"N={num_samples} images; use ratios >= 1")
    return [max(1, round(num_samples / r)) for r in ratios]


def resolve_warmup_epochs(config: Any, epochs: int) -> int:
    """`proto_warmup_epochs`, or ceil(proto_warmup_fraction * epochs) when it is null."""
    if config.proto_warmup_epochs is not None:
        if config.proto_warmup_epochs < 0:
            raise UserError(f"method.proto_warmup_epochs={config.proto_warmup_epochs} must be >= 0")
        return int(config.proto_warmup_epochs)
    if not 0.0 <= config.proto_warmup_fraction <= 1.0:
        raise UserError(f"method.proto_warmup_fraction={config.proto_warmup_fraction} must lie in [0, 1]")
    return math.ceil(round(config.proto_warmup_fraction * epochs, 6))


def size_histogram(sizes: torch.Tensor) -> list[int]:
    """Counts of clusters whose size lies in [2^b, 2^(b+1)), b = 0, 1, ... (empty clusters not counted)."""
    sizes = sizes[sizes > 0].long()
    if sizes.numel() == 0:
        return []
    bucket = torch.floor(torch.log2(sizes.double())).long()
    return torch.bincount(bucket).tolist()


class PrototypeState(torch.nn.Module):
    """SPCL prototype state, all of it buffers so it is saved in checkpoints.

    bank (N, D): normalised target embeddings indexed by dataset index; for each granularity g:
    assignments_g (N,) long (-1 before the first clustering), centroids_g (K_g, D) and the
    member tables used by `partners`; `clustered`: bool buffer, has clustering happened.
    """

    def __init__(self, num_samples: int, dim: int, num_prototypes: Sequence[int]):
        super().__init__()
        ks = [int(k) for k in num_prototypes]
        if num_samples < 1 or dim < 1:
            raise ValueError(f"num_samples and dim must be >= 1, got {num_samples} and {dim}")
        if not ks:
            raise UserError("method.num_prototypes is empty; give at least one number of prototypes")
        for k in ks:
            if k < 1:
                raise UserError(f"num_prototypes K={k} must be >= 1; fix method.num_prototypes")
            if k > num_samples:
                raise UserError(
                    f"num_prototypes K={k} exceeds the N={num_samples} training images; "
                    "lower method.num_prototypes"
                )
        if len(set(ks)) != len(ks):
            raise UserError(f"method.num_prototypes has repeated values {ks}; give each K once")
        self.num_samples = int(num_samples)
        self.dim = int(dim)
        self.num_prototypes = ks

        self.register_buffer("bank", torch.zeros(num_samples, dim))
        self.register_buffer("clustered", torch.tensor(False))
        # host copy of `clustered`: the per-step checks read it, not the device buffer
        self._clustered = False
        self.register_load_state_dict_post_hook(_reload_host_flags)
        for g, k in enumerate(ks):
            self.register_buffer(f"assignments_{g}", torch.full((num_samples,), -1, dtype=torch.long))
            self.register_buffer(f"centroids_{g}", torch.zeros(k, dim))
            self.register_buffer(f"members_{g}", torch.arange(num_samples))
            self.register_buffer(f"starts_{g}", torch.zeros(k, dtype=torch.long))
            self.register_buffer(f"sizes_{g}", torch.zeros(k, dtype=torch.long))
            self.register_buffer(f"position_{g}", torch.arange(num_samples))

    @property
    def is_clustered(self) -> bool:
        """Whether clustering has happened (the `clustered` buffer, read without a device sync)."""
        return self._clustered

    @property
    def num_granularities(self) -> int:
        return len(self.num_prototypes)

    def assignments(self, granularity: int) -> Tensor:
        """(N,) prototype index of each dataset index at this granularity (-1 before clustering)."""
        return getattr(self, f"assignments_{self._check(granularity)}")

    def centroids(self, granularity: int) -> Tensor:
        """(K_g, D) normalised prototypes at this granularity."""
        return getattr(self, f"centroids_{self._check(granularity)}")

    def cluster_sizes(self, granularity: int) -> Tensor:
        """(K_g,) number of images in each prototype (for a cluster-size histogram)."""
        return getattr(self, f"sizes_{self._check(granularity)}")

    @torch.no_grad()
    def update_bank(self, indices: Tensor, embeddings: Tensor) -> None:
        """Overwrite bank rows `indices` (B,) with the normalised `embeddings` (B, D)."""
        idx = indices.to(self.bank.device, torch.long)
        rows = F.normalize(embeddings.detach().to(self.bank.device, self.bank.dtype), dim=1)
        self.bank.index_copy_(0, idx, rows)

    @torch.no_grad()
    def set_clusters(self, granularity: int, centroids: Tensor, assignments: Tensor) -> None:
        """Store one granularity's prototypes (K_g, D) and assignments (N,), and rebuild the
        member tables. Marks the state as clustered once called (recluster calls it for every K)."""
        g = self._check(granularity)
        k = self.num_prototypes[g]
        device = self.bank.device
        a = assignments.to(device, torch.long)
        if tuple(centroids.shape) != (k, self.dim) or tuple(a.shape) != (self.num_samples,):
            raise ValueError(
                f"granularity {g} expects centroids ({k}, {self.dim}) and assignments ({self.num_samples},), "
                f"got {tuple(centroids.shape)} and {tuple(a.shape)}"
            )
        if self.num_samples and (int(a.min()) < 0 or int(a.max()) >= k):
            raise ValueError(f"assignments must lie in [0, {k}) for granularity {g}")
        sizes = torch.bincount(a, minlength=k)
        members = torch.argsort(a, stable=True)
        position = torch.empty_like(members)
        position[members] = torch.arange(self.num_samples, device=device)
        getattr(self, f"centroids_{g}").copy_(F.normalize(centroids.to(device, torch.float32), dim=1))
        getattr(self, f"assignments_{g}").copy_(a)
        getattr(self, f"members_{g}").copy_(members)
        getattr(self, f"sizes_{g}").copy_(sizes)
        getattr(self, f"starts_{g}").copy_(torch.cumsum(sizes, 0) - sizes)
        getattr(self, f"position_{g}").copy_(position)
        self.clustered.fill_(True)
        self._clustered = True

    @torch.no_grad()
    def recluster(
        self,
        embeddings: Tensor,
        iters: int = 10,
        seed: int = 0,
        labels: Tensor | None = None,
        backend: str = "auto",
        chunk_size: int = 65536,
    ) -> dict:
        """Refresh the bank with `embeddings` (N, D) (clean-pass target embeddings in
        dataset-index order) and run spherical k-means for each K on it.

        Under DDP every rank clusters (same input, same seed) and rank 0's result is then
        broadcast, so all ranks hold identical prototypes even where GPU k-means is not
        bitwise deterministic. Returns metrics keyed "k{K}/name": size_min, size_median,
        size_max, num_singletons, num_reseeded, size_hist (see `size_histogram`), and, when
        `labels` (N,) are given and not all -1 (unknown), nmi, ari (sklearn, over the labelled
        images) and partner_acc (fraction of
        labelled images whose sampled partner has the same label; a singleton is its own partner).
        """
        if tuple(embeddings.shape) != (self.num_samples, self.dim):
            raise ValueError(
                f"recluster expects embeddings of shape ({self.num_samples}, {self.dim}) "
                f"in dataset-index order, got {tuple(embeddings.shape)}"
            )
        self.bank.copy_(F.normalize(embeddings.detach().to(self.bank.device, self.bank.dtype), dim=1))

        num_reseeded = []
        for g, k in enumerate(self.num_prototypes):
            result = spherical_kmeans(
                self.bank, k, iters=iters, seed=seed, chunk_size=chunk_size, backend=backend
            )
            if distributed.world_size() > 1:
                import torch.distributed as dist

                dist.broadcast(result.centroids, src=0)
                dist.broadcast(result.assignments, src=0)
            self.set_clusters(g, result.centroids, result.assignments)
            num_reseeded.append(result.num_reseeded)

        known = None
        if labels is not None:
            labels = labels.to(self.bank.device, torch.long).flatten()
            if labels.numel() != self.num_samples:
                raise ValueError(f"labels must have {self.num_samples} entries, got {labels.numel()}")
            mask = labels >= 0
            if bool(mask.any()):
                known = mask.nonzero().flatten()

        metrics: dict[str, float | list[int]] = {}
        for g, k in enumerate(self.num_prototypes):
            sizes = self.cluster_sizes(g).float()
            prefix = f"k{k}/"
            metrics[prefix + "size_min"] = float(sizes.min())
            metrics[prefix + "size_median"] = float(sizes.quantile(0.5))
            metrics[prefix + "size_max"] = float(sizes.max())
            metrics[prefix + "num_singletons"] = int((sizes == 1).sum())
            metrics[prefix + "num_reseeded"] = int(num_reseeded[g])
            metrics[prefix + "size_hist"] = size_histogram(self.cluster_sizes(g).cpu())
            if known is not None:
                from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

                truth = labels[known].cpu().numpy()
                pred = self.assignments(g)[known].cpu().numpy()
                metrics[prefix + "nmi"] = float(normalized_mutual_info_score(truth, pred))
                metrics[prefix + "ari"] = float(adjusted_rand_score(truth, pred))
                generator = torch.Generator().manual_seed(int(seed))
                partner = self.partners(known, g, generator)
                metrics[prefix + "partner_acc"] = float((labels[partner] == labels[known]).float().mean())
        return metrics

    def partner_uniforms(self, n: int, generator: torch.Generator) -> Tensor:
        """The (n,) float64 uniforms in [0, 1) one `partners` call of n images draws from `generator`
        (on its own device), on the state's device."""
        device = self.bank.device
        u = torch.rand((n,), generator=generator, device=generator.device, dtype=torch.float64)
        return to_device(u, device)

    def partners(self, indices: Tensor, granularity: int, generator: torch.Generator | None = None,
                 uniforms: Tensor | None = None) -> Tensor:
        """For each dataset index in `indices` (B,): a uniformly random OTHER member of its
        prototype at this granularity, or the index itself when it is alone. Returns (B,) long
        on the state's device. The draw is `uniforms` (B,) when given (made before a compiled step by
        `partner_uniforms`), else `partner_uniforms(B, generator)`."""
        if not self.is_clustered:
            raise RuntimeError("PrototypeState.partners() called before the first recluster()")
        g = self._check(granularity)
        device = self.bank.device
        idx = indices.to(device, torch.long)
        a = self.assignments(g)[idx]
        sizes = getattr(self, f"sizes_{g}")[a]
        starts = getattr(self, f"starts_{g}")[a]
        own = getattr(self, f"position_{g}")[idx] - starts  # own rank within the prototype
        if uniforms is None:
            if generator is None:
                raise ValueError("PrototypeState.partners needs a generator or the uniforms")
            uniforms = self.partner_uniforms(idx.shape[0], generator)
        u = uniforms
        others = (sizes - 1).clamp_min(1)
        draw = torch.minimum((u * others).long(), others - 1)  # uniform in [0, size-1)
        draw = draw + (draw >= own).long()  # skip over the image itself
        draw = torch.where(sizes > 1, draw, own)  # alone: the image itself
        return getattr(self, f"members_{g}")[starts + draw]

    def _check(self, granularity: int) -> int:
        g = int(granularity)
        if not 0 <= g < len(self.num_prototypes):
            raise IndexError(f"granularity {g} out of range for {len(self.num_prototypes)} granularities")
        return g

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.dim}, num_prototypes={self.num_prototypes}"


def _reload_host_flags(state: PrototypeState, incompatible_keys) -> None:
    # after load_state_dict: one device read per load, none per step
    state._clustered = bool(state.clustered)
