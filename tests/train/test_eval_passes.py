"""Evaluation passes a short run does not need: the final kNN reuses the kNN monitor's pass on the
same final weights, and resuming a finished run reports its summary without embedding anything."""

from __future__ import annotations

import json

import pytest
import torch

from kith.data.images import ImageData
from kith.evaluation import probe
from kith.evaluation.baseline import data_fingerprint
from kith.runs.metrics import read_metrics
from kith.train import finish, loop
from kith.train.loop import run_training
from tests.helpers import small_heads, tiny_config


@pytest.fixture
def passes(monkeypatch):
    """Counts the feature passes (backbone_knn calls) of the loop and the end of the run."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[-1].ks)
        return probe.backbone_knn(*args, **kwargs)
    monkeypatch.setattr(loop, "backbone_knn", counting)
    monkeypatch.setattr(finish, "backbone_knn", counting)
    return calls


def test_the_final_knn_is_the_last_monitor_pass(tmp_path, passes):
    cfg = tiny_config("byol", *small_heads("byol"), "train.epochs=2", "train.knn_every=1",
                      "eval.knn_k=[5,20]", "eval.monitor_k=5", out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run")
    # epoch 1 monitor, epoch 2 monitor (every final k too), the random-init baseline: no second pass
    # over the final weights
    assert passes == [(5,), (5, 20), (5, 20)]
    rows = read_metrics(tmp_path / "run")
    last_monitor = [r for r in rows if r["kind"] == "knn"][-1]
    final = next(r for r in rows if r["kind"] == "final")
    assert final["knn_top1@5"] == last_monitor["knn_top1@5"] == result.knn[5]
    assert final["knn_top1@20"] == last_monitor["knn_top1@20"] == result.knn[20]


def test_without_the_monitor_the_final_knn_embeds_the_trained_backbone(tmp_path, passes):
    cfg = tiny_config("byol", *small_heads("byol"), "train.epochs=1", "train.knn_every=0",
                      "eval.knn_k=[5]", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run")
    assert passes == [(5,), (5,)]  # trained, random init


def test_resuming_a_finished_run_reports_its_summary_without_a_pass(tmp_path, passes, capsys):
    cfg = tiny_config("byol", *small_heads("byol"), "train.epochs=1", "eval.knn_k=[5]", out_dir=tmp_path)
    first = run_training(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    passes.clear()
    again = run_training(cfg, run_dir=tmp_path / "run", resume=True)
    assert passes == []
    assert again.knn == first.knn and again.knn_random_init == first.knn_random_init
    assert again.epochs == 1 and json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert "finished its 1 epochs" in capsys.readouterr().out
    # asking for a k the summary does not hold measures again
    run_training(tiny_config("byol", *small_heads("byol"), "train.epochs=1", "eval.knn_k=[5,10]",
                             out_dir=tmp_path), run_dir=tmp_path / "run", resume=True)
    assert passes == [(5, 10), (5, 10)]


def test_the_random_init_baseline_is_measured_once_per_network_seed_and_data(tmp_path, passes):
    def run(name: str, *overrides: str):
        cfg = tiny_config("byol", *small_heads("byol"), "train.epochs=1", "eval.knn_k=[5]", *overrides,
                          out_dir=tmp_path)
        return run_training(cfg, run_dir=tmp_path / name)

    first = run("a")
    assert passes == [(5,), (5,)]
    again = run("b", "train.lr=0.05")  # another training setting: the same initial network and data
    assert passes == [(5,), (5,), (5,)] and again.knn_random_init == first.knn_random_init
    run("c", "seed=1")
    run("d", "data.test_subset=30")
    assert len(passes) == 7  # another seed, other data: each measures its own baseline
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["knn_random_init"] == \
        {str(k): v for k, v in first.knn_random_init.items()}


def test_the_data_fingerprint_reads_only_inside_a_large_split():
    # 50,000 16x16 CIFAR images: 38.4 M values, past float32's exact integers
    big = ImageData(labels=torch.zeros(1), classes=["a"], size=2560,
                    images=torch.zeros(1, 3, 2560, 5000, dtype=torch.uint8))
    digest = data_fingerprint(big)
    big.images[0, 2, -1, -1] = 1  # the last value is one of those read
    assert data_fingerprint(big) != digest
