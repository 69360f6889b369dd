"""train.online_linear: a classifier on detached features, trained with the run, never in the backbone's
gradient, logged each epoch and in summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from kith.runs.checkpoint import CHECKPOINT
from kith.train.loop import run_training
from kith.train.online_linear import OnlineLinear
from tests.helpers import clusters, small_heads, tiny_config


def test_online_linear_learns_a_separable_toy_set():
    torch.manual_seed(0)
    backbone = torch.nn.Identity()  # the features are the points themselves
    online = OnlineLinear(backbone, feature_dim=8, num_classes=4, device=torch.device("cpu"))
    x, y = clusters(64, 4, 8, spread=1.0, seed=0)
    test_x, test_y = clusters(32, 4, 8, spread=1.0, seed=0)  # same centres (same seed), other draws below
    test_x = test_x + torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        idx = torch.randperm(len(y), generator=gen)[:32]
        labels = y[idx].clone()
        labels[:4] = -1  # unlabelled images count for nothing
        online.begin()
        backbone(x[idx])  # the step's forward: the hook keeps the (detached) features
        backbone(x[idx])  # a second view of the same images
        metrics = online.step(labels, lr_factor=1.0)
    assert set(metrics) == {"online_linear_loss", "online_linear_train_acc"}
    with torch.no_grad():
        acc = (online.head(test_x).argmax(1) == test_y).float().mean().item()
    assert acc > 0.95


def test_no_label_known_gives_no_accuracy_and_no_update():
    backbone = torch.nn.Identity()
    online = OnlineLinear(backbone, 4, 3, torch.device("cpu"))
    assert online.step(torch.tensor([-1, -1]), 1.0) == {}  # no forward since begin: nothing kept
    before = online.head.weight.detach().clone()
    backbone(torch.ones(2, 4))
    metrics = online.step(torch.tensor([-1, -1]), 1.0)
    assert torch.isnan(metrics["online_linear_train_acc"]) and metrics["online_linear_loss"] == 0
    assert torch.equal(online.head.weight, before)
    backbone.eval()
    backbone(torch.ones(2, 4))  # an eval-mode call (kNN monitor, feature extraction) is not kept
    assert online.step(torch.tensor([0, 1]), 1.0) == {}


def test_its_gradient_never_reaches_the_backbone():
    backbone = torch.nn.Linear(6, 4)
    online = OnlineLinear(backbone, 4, 2, torch.device("cpu"))
    backbone(torch.randn(8, 6))
    online.step(torch.randint(0, 2, (8,)), 1.0)
    assert backbone.weight.grad is None and backbone.bias.grad is None
    assert online.head.weight.grad is not None


def _run(tmp_path, name, *extra):
    cfg = tiny_config("byol", *small_heads("byol"), "train.knn_every=0", *extra)
    run_training(cfg, run_dir=tmp_path / name)
    return tmp_path / name


def test_a_run_with_it_trains_the_same_backbone_and_reports_it_each_epoch(tmp_path):
    plain = _run(tmp_path, "plain")
    online = _run(tmp_path, "online", "train.online_linear=true")
    want = torch.load(plain / CHECKPOINT, weights_only=True)["method"]
    got = torch.load(online / CHECKPOINT, weights_only=True)
    assert want.keys() == got["method"].keys()
    for key in want:  # bit for bit: the classifier changes nothing the method computes
        assert torch.equal(want[key], got["method"][key]), key
    assert set(got["online_linear"]) == {"head", "optimizer"}
    rows = [json.loads(line) for line in (online / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "online_linear"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["online_linear_top1"] <= 100 for r in evals)
    assert any("online_linear_loss" in r for r in rows if r["kind"] == "train")
    summary = json.loads((online / "summary.json").read_text())
    assert summary["online_linear_top1"] == pytest.approx(evals[-1]["online_linear_top1"])
    assert "online_linear_top1" not in json.loads((plain / "summary.json").read_text())
