"""kNN and linear probes on features with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from kith.evaluation.probe import LinearSettings, knn_accuracy, linear_probe, weighted_votes
from kith.memory import chunked_topk
from tests.helpers import clusters


# ---- kNN --------------------------------------------------------------------------------
def test_knn_separated_clusters_is_perfect():
    x, y = clusters(30, 4, 16, 0.5, seed=1)
    xt, yt = clusters(10, 4, 16, 0.5, seed=1)  # same centres (same seed) ...
    xt = xt + 0.3 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(2))  # ... moved a little
    acc = knn_accuracy(x, y, xt, yt, ks=(1, 5, 20, 200))
    assert acc == {1: 100.0, 5: 100.0, 20: 100.0, 200: 100.0}

def test_knn_weighted_vote_by_hand():
    # bank on the unit circle: angles 0 (class 0), 60 and 90 degrees (class 1); the query at angle 0.
    angles = torch.tensor([0.0, 60.0, 90.0]) * math.pi / 180
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    t = 0.5
    # sims 1, 0.5, 0: class 0 gets e^(1/T) = e^2, class 1 gets e^(0.5/T) + e^0 = e + 1
    sims, idx = chunked_topk(query, bank, 3)
    scores = weighted_votes(labels[idx], (sims / t).exp(), num_classes=2)
    assert scores[0, 0].item() == pytest.approx(math.exp(2.0), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(math.exp(1.0) + 1.0, rel=1e-5)
    # e^2 = 7.39 > e + 1 = 3.72: class 0 wins although it has one vote against two
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), ks=(3,), temperature=t) == {3: 100.0}
    # with a flat temperature the two class-1 votes outweigh the one class-0 vote
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), ks=(3,), temperature=100.0) == {3: 0.0}
    # k=1 is the nearest neighbour only; k above the bank size uses the whole bank
    accuracy = knn_accuracy(bank, labels, query, torch.tensor([0]), ks=(1, 50), temperature=t)
    assert accuracy == {1: 100.0, 50: 100.0}

def test_knn_ignores_unlabelled_items():
    x, y = clusters(10, 2, 8, 0.1, seed=3)
    y_bank = y.clone()
    y_bank[::2] = -1
    y_query = y.clone()
    y_query[:5] = -1
    assert knn_accuracy(x, y_bank, x, y_query, ks=(3,)) == {3: 100.0}

# ---- linear probe -----------------------------------------------------------------------
def test_linear_probe_separable_features():
    x, y = clusters(40, 5, 32, 1.0, seed=4)
    xt, yt = clusters(20, 5, 32, 1.0, seed=4)
    out = linear_probe(x, y, xt, yt, LinearSettings(epochs=20, seed=0))
    assert out["top1"] == pytest.approx(100.0)
    assert out["top5"] == pytest.approx(100.0)
    assert linear_probe(x, y, xt, yt, LinearSettings(epochs=20, seed=0)) == out  # seeded: reproducible

def test_linear_probe_needs_a_linear_boundary_not_a_cluster():
    # labels by the sign of one coordinate, with a margin (linearly separable, but not
    # clustered); features on wildly different scales, which the standardisation handles
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, 6, generator=gen)
    x[:, 2] += 0.5 * x[:, 2].sign()
    x = x * torch.tensor([1e3, 1.0, 1e-3, 5.0, 1.0, 1.0])
    y = (x[:, 2] > 0).long()
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], LinearSettings(epochs=30, seed=1))
    assert out["top1"] >= 97.0
    assert out["top5"] == pytest.approx(100.0)  # two classes: top-5 is top-2
