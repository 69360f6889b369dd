"""Spherical k-means (kith.methods.spcl.cluster) and SPCL's prototype state (spcl.prototypes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from kith.methods.spcl.cluster import KMeansResult, spherical_kmeans
from kith.methods.spcl.prototypes import PrototypeState
from kith.utils.errors import UserError


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cosine nearest-centroid assignment written out, to check the clustering's own final assignment."""
    return (F.normalize(x, dim=1) @ F.normalize(centroids, dim=1).T).argmax(dim=1)

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def blobs(num_clusters=8, per_cluster=40, dim=16, spread=0.05, seed=0):
    """Well-separated clusters on the sphere: random directions plus small noise."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_clusters, dim, generator=g), dim=1)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm] * 3.0, labels[perm]  # un-normalised on purpose


# ----------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_recovers_separated_clusters(init):
    x, labels = blobs()
    # "random" init can put two seeds in one blob; a few iterations with reseeding are not
    # guaranteed to fix that, so check it on the easier kmeans++ path strictly and allow
    # random init to be near-perfect.
    res = spherical_kmeans(x, 8, iters=20, seed=0, init=init, backend="torch")
    assert isinstance(res, KMeansResult)
    assert res.centroids.shape == (8, 16) and res.assignments.shape == (len(x),)
    assert res.assignments.dtype == torch.long
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(8))
    ari = adjusted_rand_score(labels.numpy(), res.assignments.numpy())
    if init == "kmeans++":
        assert ari == 1.0
    else:
        assert ari > 0.7


def test_kmeans_assignments_match_final_centroids():
    x, _ = blobs(seed=3)
    res = spherical_kmeans(x, 8, iters=5, seed=1, backend="torch")
    a = (F.normalize(x, dim=1) @ F.normalize(res.centroids, dim=1).T).max(dim=1).indices
    assert torch.equal(a, res.assignments)


def test_kmeans_deterministic_for_fixed_seed():
    x, _ = blobs(num_clusters=6, spread=0.6, seed=1)  # overlapping: the seed matters
    r1 = spherical_kmeans(x, 12, iters=5, seed=7, backend="torch")
    r2 = spherical_kmeans(x, 12, iters=5, seed=7, backend="torch")
    assert torch.equal(r1.assignments, r2.assignments)
    assert torch.equal(r1.centroids, r2.centroids)
    others = [spherical_kmeans(x, 12, iters=5, seed=s, backend="torch").assignments for s in range(8, 12)]
    assert any(not torch.equal(r1.assignments, o) for o in others)


def test_kmeans_chunk_size_does_not_change_result():
    x, _ = blobs(spread=0.5, seed=4)
    ref = spherical_kmeans(x, 10, iters=5, seed=0, backend="torch")
    for chunk in (13, 100):
        res = spherical_kmeans(x, 10, iters=5, seed=0, chunk_size=chunk, backend="torch")
        assert torch.equal(res.assignments, ref.assignments)
        torch.testing.assert_close(res.centroids, ref.centroids)


def test_empty_clusters_reseeded_from_bad_init():
    # All data in the upper half of dim 0; 3 of 8 initial centroids point away from it, so
    # their clusters are empty after the first assignment and must be re-seeded.
    x, labels = blobs(num_clusters=5, per_cluster=30, seed=5)
    x = F.normalize(x, dim=1)
    x[:, 0] = x[:, 0].abs() + 1.0
    init = torch.zeros(8, 16)
    init[:5] = F.normalize(x[torch.stack([(labels == c).nonzero()[0, 0] for c in range(5)])], dim=1)
    init[5:, 0] = -1.0
    init[5:, 1 + torch.arange(3)] = 0.1
    res = spherical_kmeans(x, 8, iters=5, seed=0, init=init, backend="torch")
    assert res.num_reseeded >= 3
    assert torch.bincount(res.assignments, minlength=8).min() >= 1


def test_no_empty_clusters_when_k_equals_n():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    for init in ("kmeans++", "random"):
        res = spherical_kmeans(x, 20, iters=3, seed=0, init=init, backend="torch")
        assert torch.equal(torch.bincount(res.assignments, minlength=20), torch.ones(20, dtype=torch.long))


def test_duplicates_force_reseeding_and_are_counted():
    # 5 distinct points, each 4 times; K = 8 > 5 distinct points: some seeds coincide, their
    # clusters empty out (ties go to the lower index) and get re-seeded every iteration.
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    x = base.repeat(4, 1)
    res = spherical_kmeans(x, 8, iters=4, seed=0, backend="torch")
    assert res.num_reseeded > 0
    # The final step moves copies into the clusters still empty (N >= K), and every cluster
    # holds copies of a single distinct point.
    assert torch.bincount(res.assignments, minlength=8).min() >= 1
    point = torch.arange(20) % 5
    for c in range(8):
        assert len(set(point[res.assignments == c].tolist())) == 1


def test_k_greater_than_n_is_a_user_error():
    x = torch.randn(10, 4)
    with pytest.raises(UserError, match="exceeds the N=10 training images; lower method.num_prototypes"):
        spherical_kmeans(x, 11)
    with pytest.raises(UserError, match="lower method.num_prototypes"):
        PrototypeState(10, 4, [5, 11])


def test_bad_options_are_user_errors():
    x = torch.randn(10, 4)
    with pytest.raises(UserError, match="init"):
        spherical_kmeans(x, 2, init="kmeans")
    with pytest.raises(UserError, match="backend"):
        spherical_kmeans(x, 2, backend="sklearn")


@pytest.mark.skipif(HAS_FAISS, reason="faiss installed")
def test_faiss_backend_without_faiss_is_a_user_error_and_auto_uses_torch():
    x, _ = blobs()
    with pytest.raises(UserError, match="faiss"):
        spherical_kmeans(x, 8, backend="faiss")
    auto = spherical_kmeans(x, 8, iters=5, seed=0, backend="auto")
    torch_ = spherical_kmeans(x, 8, iters=5, seed=0, backend="torch")
    assert torch.equal(auto.assignments, torch_.assignments)


def test_kmeanspp_seeds_are_the_init_of_the_iterations_and_final_assignment_matches():
    """What the faiss branch relies on, on the torch path: `iters=0` returns the k-means++ seeds,
    iterating from those seeds passed explicitly is the same as init="kmeans++", and the returned
    assignments are the nearest final centroids."""
    x, _ = blobs(spread=0.5, seed=6)
    seeds = spherical_kmeans(x, 8, iters=0, seed=3, backend="torch")
    assert torch.equal(seeds.assignments, nearest_centroid(x, seeds.centroids))
    via_name = spherical_kmeans(x, 8, iters=4, seed=3, backend="torch")
    via_tensor = spherical_kmeans(x, 8, iters=4, seed=3, init=seeds.centroids, backend="torch")
    assert torch.equal(via_name.centroids, via_tensor.centroids)
    assert torch.equal(via_name.assignments, via_tensor.assignments)
    assert not torch.equal(via_name.centroids, seeds.centroids)  # the iterations moved them
    assert torch.equal(via_name.assignments, nearest_centroid(x, via_name.centroids))


FAISS_SKIP = "faiss is not installed (optional: pip install faiss-cpu); the torch backend is tested above"


@pytest.mark.skipif(not HAS_FAISS, reason=FAISS_SKIP)
def test_faiss_backend_recovers_clusters():
    x, labels = blobs()
    res = spherical_kmeans(x, 8, iters=20, seed=0, backend="faiss")
    assert res.centroids.shape == (8, 16)
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(8))
    assert adjusted_rand_score(labels.numpy(), res.assignments.numpy()) == 1.0
    assert torch.equal(res.assignments, nearest_centroid(x, res.centroids))  # final assignment in torch


@pytest.mark.skipif(not HAS_FAISS, reason=FAISS_SKIP)
def test_faiss_iterations_equal_the_torch_iterations_from_the_same_seeds():
    """faiss gets the k-means++ seeds, the iteration count and spherical=True: from the same seeds,
    its spherical Lloyd iterations give the torch backend's centroids (overlapping clusters, so
    every iteration moves them and a wrong count or a non-spherical update would show)."""
    x, _ = blobs(spread=0.5, seed=6)
    for iters in (1, 3):
        ref = spherical_kmeans(x, 8, iters=iters, seed=3, backend="torch")
        res = spherical_kmeans(x, 8, iters=iters, seed=3, backend="faiss")
        torch.testing.assert_close(res.centroids, ref.centroids, atol=1e-5, rtol=0)
        assert torch.equal(res.assignments, ref.assignments)
        assert res.num_reseeded == ref.num_reseeded == 0


@pytest.mark.skipif(not HAS_FAISS, reason=FAISS_SKIP)
def test_faiss_counts_its_splits_as_reseeded():
    x, _ = blobs(seed=7)
    init = F.normalize(x[:8].clone(), dim=1)
    init[1] = init[0]  # two identical seeds: one of them starts empty, faiss splits a cluster
    res = spherical_kmeans(x, 8, iters=2, init=init, backend="faiss")
    assert res.num_reseeded >= 1
    assert torch.bincount(res.assignments, minlength=8).min() >= 1


# ------------------------------------------------------------------- prototype state


def fixed_state():
    """N=10, two granularities; granularity 0 has a singleton prototype (index 9)."""
    state = PrototypeState(10, 4, [3, 2])
    a0 = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 2])  # prototype 2 = {9}
    a1 = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    state.set_clusters(0, torch.randn(3, 4), a0)
    state.set_clusters(1, torch.randn(2, 4), a1)
    return state, (a0, a1)


def test_partners_share_prototype_and_differ_unless_alone():
    state, assignments = fixed_state()
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(10).repeat(50)
    for gran, a in enumerate(assignments):
        p = state.partners(idx, gran, g)
        assert p.shape == idx.shape and p.dtype == torch.long
        assert torch.equal(a[p], a[idx])
        alone = idx == 9 if gran == 0 else torch.zeros_like(idx, dtype=torch.bool)
        assert torch.equal(p[alone], idx[alone])
        assert (p[~alone] != idx[~alone]).all()


def test_partners_roughly_uniform_among_members():
    state, _ = fixed_state()
    g = torch.Generator().manual_seed(1)
    draws = 20_000
    p = state.partners(torch.full((draws,), 2), 0, g)  # index 2 in prototype 0 = {0, 2, 4, 6, 8}
    counts = torch.bincount(p, minlength=10).float()
    assert counts[2] == 0
    assert counts[[1, 3, 5, 7, 9]].sum() == 0
    freq = counts[[0, 4, 6, 8]] / draws
    assert (freq - 0.25).abs().max() < 0.02


def test_partners_before_clustering_raises():
    state = PrototypeState(10, 4, [3])
    assert not bool(state.clustered)
    assert (state.assignments(0) == -1).all()
    with pytest.raises(RuntimeError, match="recluster"):
        state.partners(torch.arange(3), 0, torch.Generator())


def test_update_bank_overwrites_normalised_rows():
    state = PrototypeState(10, 4, [3])
    emb = torch.randn(3, 4) * 5
    state.update_bank(torch.tensor([1, 5, 7]), emb)
    torch.testing.assert_close(state.bank[[1, 5, 7]], F.normalize(emb, dim=1))
    assert (state.bank[[0, 2, 3, 4, 6, 8, 9]] == 0).all()


def test_recluster_metrics_and_state():
    x, labels = blobs(num_clusters=4, per_cluster=25, seed=6)
    state = PrototypeState(100, 16, [4, 10])
    metrics = state.recluster(x, iters=10, seed=0, labels=labels)
    assert bool(state.clustered)
    torch.testing.assert_close(state.bank, F.normalize(x, dim=1))
    for k in (4, 10):
        for name in ("nmi", "ari", "partner_acc", "size_min", "size_median", "size_max", "num_reseeded"):
            assert f"k{k}/{name}" in metrics
        assert metrics[f"k{k}/size_min"] >= 1
    assert metrics["k4/nmi"] == pytest.approx(1.0)
    assert metrics["k4/ari"] == pytest.approx(1.0)
    assert metrics["k4/partner_acc"] == 1.0
    assert state.centroids(1).shape == (10, 16)
    assert state.cluster_sizes(1).sum() == 100
    assert (state.assignments(1) >= 0).all()

    # Without labels (or with all labels unknown) there are no label metrics.
    for lab in (None, torch.full((100,), -1)):
        metrics = PrototypeState(100, 16, [4]).recluster(x, labels=lab)
        assert "k4/nmi" not in metrics and "k4/ari" not in metrics and "k4/size_max" in metrics


def test_state_dict_round_trip():
    x, labels = blobs(num_clusters=4, per_cluster=25, seed=7)
    state = PrototypeState(100, 16, [4, 10])
    state.recluster(x, iters=5, seed=0, labels=labels)
    state.update_bank(torch.tensor([0, 1]), torch.randn(2, 16))

    fresh = PrototypeState(100, 16, [4, 10])
    fresh.load_state_dict(state.state_dict())
    assert bool(fresh.clustered)
    torch.testing.assert_close(fresh.bank, state.bank)
    idx = torch.arange(100)
    for g in range(state.num_granularities):
        assert torch.equal(fresh.assignments(g), state.assignments(g))
        torch.testing.assert_close(fresh.centroids(g), state.centroids(g))
        p1 = state.partners(idx, g, torch.Generator().manual_seed(3))
        p2 = fresh.partners(idx, g, torch.Generator().manual_seed(3))
        assert torch.equal(p1, p2)
    assert state.num_granularities == 2


def test_constructor_validation():
    with pytest.raises(UserError, match="repeated"):
        PrototypeState(10, 4, [3, 3])
    with pytest.raises(UserError, match="empty"):
        PrototypeState(10, 4, [])
