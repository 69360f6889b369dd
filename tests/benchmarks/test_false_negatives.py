"""The same-class share of a contrastive loss's negatives (SPCL's false-negative argument): the formula
on fixed tensors, and both methods measured on tiny trained runs."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import false_negatives
from kith.data.sources import load_splits
from kith.train.loop import run_training
from tests.helpers import tiny_config


def test_shares_are_the_plain_and_the_softmax_weighted_mean_over_negatives():
    same = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0, 5.0]])
    negative = torch.tensor([[True, True, True, False]])  # the last is the anchor's own: not a negative
    unweighted, weighted = false_negatives._shares(same, logits, negative)
    assert unweighted == pytest.approx(1 / 3)
    assert weighted == pytest.approx(2 / 4)  # exp-weights 2, 1, 1 over the three negatives


@pytest.mark.parametrize("method", false_negatives.METHODS)
def test_a_trained_method_gets_shares_that_match_a_direct_count(method, tmp_path, monkeypatch):
    monkeypatch.setattr(false_negatives, "BATCHES", 2)
    monkeypatch.setattr(false_negatives, "BATCH", 16)
    extra = ["train.epochs=2", "method.num_prototypes=[4,8]"] if method == "spcl" else ["train.epochs=1"]
    cfg = tiny_config(method, *extra, out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    train, _ = load_splits(cfg.data, cfg.seed)
    shares = false_negatives.false_negative_shares(result.method, method, cfg, train, seed=0)
    assert 0 <= shares["weighted"] <= 1 and 0 < shares["unweighted"] < 1
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32]
    labels = train.labels[order]
    if method == "simclr":  # the unweighted share is a pure label count over each batch's other images
        expected = []
        for b in range(2):
            y = labels[b * 16:(b + 1) * 16]
            expected += [((y == y[i]).sum().item() - 1) / 15 for i in range(16)]
        assert shares["unweighted"] == pytest.approx(sum(expected) / len(expected))
