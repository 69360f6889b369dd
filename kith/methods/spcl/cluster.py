"""Spherical k-means for SPCL prototypes: torch on the embeddings' device, faiss when installed.

Points and centroids live on the unit sphere; a point belongs to the centroid of highest
cosine similarity, and a centroid is the renormalised mean of its members. Assignment is
computed in chunks, so apart from the normalised copy of the data the extra memory is
O(chunk_size x K). Clusters that come out empty are re-seeded with the points farthest from
their own centroid (lowest similarity), moved out of clusters that keep at least one member,
so whenever N >= K the returned assignments leave no cluster empty (up to exact duplicates:
with fewer distinct points than K some clusters stay empty and are re-seeded every time).

On CPU the torch backend is deterministic for a fixed seed. On CUDA `index_add_` uses atomic
adds, so float sums (and, rarely, a tie-broken assignment) may differ between runs; callers
that need identical results on several ranks should broadcast them (PrototypeState does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kith.utils.errors import UserError

_INITS = ("kmeans++", "random")
_BACKENDS = ("auto", "torch", "faiss")
# k-means++ seeds from a random subsample of at most this many points per cluster: its cost is
# O(K x subsample x D) and sequential over K, and more points do not improve the seeding much.
_KMEANSPP_POINTS_PER_CLUSTER = 20


@dataclass
class KMeansResult:
    centroids: Tensor  # (K, D) float32, L2-normalised
    assignments: Tensor  # (N,) long, index of each point's centroid
    num_reseeded: int  # empty clusters re-seeded, summed over all iterations


@torch.no_grad()
def spherical_kmeans(
    x: Tensor,
    k: int,
    iters: int = 10,
    seed: int = 0,
    init: str | Tensor = "kmeans++",
    chunk_size: int = 65536,
    backend: str = "auto",
) -> KMeansResult:
    """Cluster the rows of `x` (N, D) into `k` groups by cosine similarity, on x's device.

    `x` is L2-normalised here (any float dtype; computed in float32). `iters` Lloyd
    iterations (assign, re-seed empty clusters, update), then a final assignment against the
    final centroids, so each point's assignment is its most cosine-similar final centroid (up to
    clusters re-seeded in that final step, whose centroid is the moved point itself).

    init: "kmeans++" (D²-weighted seeding on a random subsample of at most 20·k points),
    "random" (k distinct random points), or a (k, D) tensor of initial centroids.
    backend: "torch"; "faiss" (faiss.Clustering with spherical=True on x's GPU when x is on
    CUDA and faiss has GPU support, else on CPU; faiss re-seeds empty clusters by splitting
    large ones and reports them as `nsplit`); "auto" = faiss when importable (and, for CUDA
    tensors, built with GPU support), else torch.
    With faiss, "kmeans++" and tensor inits are computed here and passed to faiss; "random"
    uses faiss's own seeded random init. The final assignment is always done here in torch.
    """
    k = int(k)
    _check_arguments(x, k, iters, init, chunk_size, backend)
    n = x.shape[0]
    faiss = _faiss_backend(backend, x.is_cuda)

    x = F.normalize(x.detach().float(), dim=1)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))

    if isinstance(init, Tensor):
        centroids = F.normalize(init.detach().to(x.device, torch.float32), dim=1)
    elif init == "kmeans++":
        centroids = _kmeanspp(x, k, generator)
    elif faiss is None:  # "random" on the torch path; faiss does its own random init
        centroids = x[torch.randperm(n, generator=generator, device=x.device)[:k]].clone()
    else:
        centroids = None

    if faiss is not None:
        centroids, num_reseeded = _faiss_kmeans(faiss, x, k, iters, seed, centroids)
    else:
        num_reseeded = 0
        for _ in range(iters):  # nothing read back to the host: the count stays a device tensor
            assignments, sims = _assign_normalized(x, centroids, chunk_size)
            point_cluster, _ = _reseed_empty(assignments, sims, k)
            assignments = torch.where(point_cluster >= 0, point_cluster, assignments)
            num_reseeded = num_reseeded + (point_cluster >= 0).sum()
            centroids = _update_centroids(x, assignments, k, fallback=centroids)

    # Final assignment against the final centroids; clusters still empty get their farthest
    # point, and their centroid becomes that point.
    assignments, sims = _assign_normalized(x, centroids, chunk_size)
    point_cluster, cluster_point = _reseed_empty(assignments, sims, k)
    assignments = torch.where(point_cluster >= 0, point_cluster, assignments)
    filled = cluster_point >= 0
    centroids = torch.where(filled[:, None], x[cluster_point.clamp(min=0)], centroids)
    num_reseeded = int(num_reseeded + filled.sum())  # the clustering's one read back
    return KMeansResult(centroids=centroids, assignments=assignments, num_reseeded=num_reseeded)


def _check_arguments(x: Tensor, k: int, iters: int, init: str | Tensor, chunk_size: int,
                     backend: str) -> None:
    """The one-line errors for arguments `spherical_kmeans` cannot run with."""
    if x.ndim != 2:
        raise ValueError(f"spherical_kmeans expects x of shape (N, D), got {tuple(x.shape)}")
    n, d = x.shape
    if k < 1:
        raise UserError(f"num_prototypes must be >= 1, got {k}; raise method.num_prototypes")
    if k > n:
        raise UserError(
            f"num_prototypes K={k} exceeds the N={n} training images; lower method.num_prototypes"
        )
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(init, str) and init not in _INITS:
        raise UserError(f"unknown k-means init '{init}'; choose one of {', '.join(_INITS)}")
    if isinstance(init, Tensor) and tuple(init.shape) != (k, d):
        raise ValueError(f"init centroids must have shape ({k}, {d}), got {tuple(init.shape)}")
    if backend not in _BACKENDS:
        raise UserError(f"unknown k-means backend '{backend}'; choose one of {', '.join(_BACKENDS)}")


def _faiss_backend(backend: str, on_cuda: bool):
    """The faiss module when `backend` asks for it and it can help (importable; for CUDA tensors, built
    with GPU support), else None for the torch path."""
    if backend not in ("auto", "faiss"):
        return None
    try:
        import faiss  # optional dependency, imported lazily
    except ImportError:
        if backend == "faiss":
            raise UserError(
                "k-means backend 'faiss' needs faiss: pip install faiss-cpu (or faiss-gpu), "
                "or use backend 'torch'"
            ) from None
        return None
    if backend == "auto" and on_cuda and not hasattr(faiss, "StandardGpuResources"):
        return None  # CPU-only faiss would be slower than torch on the GPU
    return faiss


def _assign_normalized(
    x: Tensor, centroids: Tensor, chunk_size: int, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    assignments = torch.empty(n, dtype=torch.long, device=x.device)
    sims = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size].float()
        if normalize:
            chunk = F.normalize(chunk, dim=1)
        best, idx = (chunk @ centroids.T).max(dim=1)  # ties go to the lowest index
        sims[start : start + chunk_size] = best
        assignments[start : start + chunk_size] = idx
    return assignments, sims


def _kmeanspp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with the spherical distance 2 - 2cos, on a subsample of <= 20k points."""
    n = x.shape[0]
    m = min(n, _KMEANSPP_POINTS_PER_CLUSTER * k)
    pool = x if m == n else x[torch.randperm(n, generator=generator, device=x.device)[:m]]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    # Points are picked with index_select on 1-element index tensors: indexing with a 0-d tensor
    # (`pool[idx[0]]`) reads the index back to the host, one sync per centroid on a GPU.
    first = torch.randint(m, (1,), generator=generator, device=x.device)
    centroids[0] = pool.index_select(0, first)[0]
    best = pool @ centroids[0]  # (m,) similarity to the nearest chosen centroid
    # Work buffers reused across the k sequential steps (no per-step allocations).
    sims = torch.empty_like(best)
    weights = torch.empty(m, dtype=torch.float64, device=x.device)
    cdf = torch.empty_like(weights)
    for j in range(1, k):
        # D² weights with D² = 2 - 2cos. The tiny constant keeps them summable when every point
        # coincides with a chosen centroid (duplicates); otherwise it is negligible.
        torch.mul(best, -2.0, out=sims).add_(2.0).clamp_min_(0.0)
        weights.copy_(sims).add_(1e-12)
        # Inverse-CDF draw (torch.multinomial is slow on CPU for tens of thousands of categories).
        torch.cumsum(weights, 0, out=cdf)
        u = torch.rand(1, generator=generator, device=x.device, dtype=torch.float64) * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp_max_(m - 1)
        centroids[j] = pool.index_select(0, idx)[0]
        torch.mv(pool, centroids[j], out=sims)
        torch.maximum(best, sims, out=best)
    return centroids


def _reseed_empty(assignments: Tensor, sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Points to move into empty clusters, as `(point_cluster (N,), cluster_point (K,))`: the empty
    cluster each moved point joins and the point each empty cluster receives, -1 elsewhere.

    The farthest points (lowest similarity to their centroid) go first, to the empty clusters in
    index order, but each cluster keeps at least its most similar member, so no donor is emptied;
    with N >= K there are always enough candidates (N - nonempty >= K - nonempty). Fixed shapes
    throughout, so nothing is read back to the host (a GPU clustering runs without a sync).
    """
    n, device = assignments.numel(), assignments.device
    counts = torch.bincount(assignments, minlength=k)
    # Rank of every point within its cluster by ascending similarity (0 = farthest); the
    # point of rank counts-1 (most similar) stays.
    by_sim = torch.argsort(sims, stable=True)
    order = by_sim[torch.argsort(assignments[by_sim], stable=True)]  # by cluster, then sim
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device) - starts[assignments[order]]
    movable = rank[by_sim] < counts[assignments[by_sim]] - 1  # in ascending-sim order
    empty = counts == 0
    # the r-th empty cluster (by index) takes the r-th movable point (by ascending similarity)
    m = min(n, k)
    clusters = torch.argsort((~empty).to(torch.uint8), stable=True)[:m]  # the empty ones first
    points = by_sim[torch.argsort((~movable).to(torch.uint8), stable=True)[:m]]  # movable first
    r = torch.arange(m, device=device)
    take = (r < empty.sum()) & (r < movable.sum())
    none = torch.full_like(r, -1)
    point_cluster = torch.full((n,), -1, dtype=torch.long, device=device)
    point_cluster.scatter_(0, points, torch.where(take, clusters, none))
    cluster_point = torch.full((k,), -1, dtype=torch.long, device=device)
    cluster_point.scatter_(0, clusters, torch.where(take, points, none))
    return point_cluster, cluster_point


def _update_centroids(x: Tensor, assignments: Tensor, k: int, fallback: Tensor) -> Tensor:
    """Renormalised sum of each cluster's members; a cluster with no members keeps `fallback`."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, assignments, x)
    norms = sums.norm(dim=1, keepdim=True)
    # A zero sum (empty cluster, or members cancelling out exactly) keeps its previous centroid.
    keep = norms.squeeze(1) <= 1e-12
    return torch.where(keep[:, None], fallback, sums / norms.clamp_min(1e-12))


def _faiss_kmeans(faiss, x: Tensor, k: int, iters: int, seed: int, init: Tensor | None) -> tuple[Tensor, int]:
    """Train with faiss.Clustering (spherical); returns (centroids on x's device, splits)."""
    n, d = x.shape
    x_np = x.cpu().numpy()  # float32, C-contiguous (normalised copy)
    params = faiss.ClusteringParameters()
    params.niter = int(iters)
    params.seed = int(seed) % (2**31)
    params.spherical = True
    params.verbose = False
    params.min_points_per_centroid = 1  # SPCL uses ~12-50 points per prototype: no warning
    params.max_points_per_centroid = max(256, -(-n // k))  # never subsample: same data as torch
    clus = faiss.Clustering(d, k, params)
    if init is not None:
        faiss.copy_array_to_vector(init.detach().cpu().float().numpy().ravel(), clus.centroids)
    if x.is_cuda and hasattr(faiss, "StandardGpuResources"):
        # A flat index on this tensor's GPU (not GPU 0: under DDP each rank has its own).
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(resources, d, config)
    else:
        index = faiss.IndexFlatIP(d)
    if iters > 0:
        clus.train(x_np, index)
        centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
        centroids = torch.from_numpy(centroids.copy()).to(x.device)
        stats = clus.iteration_stats
        num_split = sum(int(getattr(stats.at(i), "nsplit", 0)) for i in range(stats.size()))
    else:
        if init is None:  # no iterations and faiss-side random init: pick k random points here
            generator = torch.Generator(device=x.device)
            generator.manual_seed(int(seed))
            init = x[torch.randperm(n, generator=generator, device=x.device)[:k]]
        centroids, num_split = init.to(x.device, torch.float32), 0
    return F.normalize(centroids, dim=1), num_split
