"""Presets equal their public recipes (kith/presets/_recipes.yaml), docs/recipes.md is current,
`train.exclude_bias_norm_wd` controls the optimizer, and `kith compare` shows published numbers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kith.config import build_config, to_yaml
from kith.methods.context import TrainInfo
from kith.tools import recipes
from kith.tools.compare import compare, run_row
from kith.train.optim import build_optimizer
from kith.train.setup import build_method
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_preset_equals_its_recipe_or_says_why():
    assert recipes.undocumented_differences() == {}


def test_docs_recipes_md_is_regenerated():
    doc = ROOT / recipes.DOC_PATH
    assert doc.is_file(), "docs/recipes.md is missing: python -m kith.tools.recipes --write"
    assert doc.read_text() == recipes.render_markdown(), \
        "docs/recipes.md is stale: python -m kith.tools.recipes --write"


@pytest.fixture
def edited_recipes(monkeypatch):
    """A deep copy of the recipes file that a test may edit."""
    data = copy.deepcopy(recipes.load_recipes())
    monkeypatch.setattr(recipes, "load_recipes", lambda: data)
    return data


def test_a_drifted_value_is_reported_until_a_reason_is_recorded(edited_recipes):
    edited_recipes["recipes"]["cifar/byol"]["keys"]["train.lr"] = 0.5
    rows = {r.key: r for r in recipes.preset_rows("cifar10/byol")}
    assert rows["train.lr"].status == recipes.DIFFERS
    assert (rows["train.lr"].kith, rows["train.lr"].reference) == (1.0, 0.5)
    edited_recipes["deliberate"].append({"presets": ["cifar*/byol"], "keys": ["train.lr"],
                                         "reason": "because"})
    rows = {r.key: r for r in recipes.preset_rows("cifar10/byol")}
    assert rows["train.lr"].status == recipes.DELIBERATE and rows["train.lr"].reason == "because"


def test_heads_and_views_are_compared_too(edited_recipes):
    edited_recipes["recipes"]["cifar/simclr"]["keys"]["head.projector"] = \
        "Linear 512→2048, BN, ReLU, Linear 2048→256"
    edited_recipes["recipes"]["cifar/simclr"]["views"][1] = {**edited_recipes["views"]["symmetric"],
                                                             "solarize_prob": 0.2}
    bad = {r.key for r in recipes.preset_rows("cifar10/simclr") if r.status == recipes.DIFFERS}
    assert bad == {"head.projector", "view2.solarize_prob"}


@pytest.mark.parametrize("exclude", [True, False])
def test_exclude_bias_norm_wd_decides_what_is_decayed(exclude):
    cfg = tiny_config("simclr", "train.optimizer=sgd", "train.weight_decay=0.01",
                      f"train.exclude_bias_norm_wd={str(exclude).lower()}")
    method = build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2))
    opt = build_optimizer(method, cfg)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    one_d = [p for p in method.parameters() if p.ndim == 1]
    assert one_d and all(decay[id(p)] == (0.0 if exclude else 0.01) for p in one_d)
    assert all(decay[id(p)] == 0.01 for p in method.parameters() if p.ndim > 1)


# ---- kith compare: the published column ------------------------------------------------------
def fake_run(tmp_path: Path, name: str, *overrides: str, linear: float | None = 91.0,
             online: float | None = 90.5) -> Path:
    """A run folder as `kith pretrain train.online_linear=true` + `kith eval --linear` leave it, without
    training (`online`/`linear` None: not measured)."""
    cfg = build_config(["preset=cifar10/byol", *overrides])
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "summary.json").write_text(json.dumps({
        "method": "byol", "preset": "cifar10/byol", "data": cfg.data.name, "backbone": cfg.backbone.name,
        "epochs": cfg.train.epochs, "knn": {"200": 85.5}, "wall_time_s": 10.0, "images_per_s": 100.0,
        **({} if online is None else {"online_linear_top1": online})}))
    rows = [{"kind": "eval", "linear_top1": linear}] if linear is not None else []
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_published_beside_a_run_of_the_reference_recipe_and_budget(tmp_path):
    run = fake_run(tmp_path, "full")
    row = run_row(run)
    assert row["published"] == pytest.approx(92.58) and row["published_note"] == ""
    table = compare([run])
    assert "| published |" in table.splitlines()[0]
    assert "| 91.00 | 90.50 | 92.58 (online_linear_top1) |" in table
    # lightly's kNN number at its own budget (200 epochs, batch 512)
    run = fake_run(tmp_path, "lightly", "train.epochs=200", "train.batch_size=512", linear=None)
    assert run_row(run)["published"] == pytest.approx(86.8)


def test_published_online_linear_only_beside_an_online_linear_run(tmp_path):
    # solo-learn's number is online linear: an offline probe of the same recipe and budget is not compared
    row = run_row(fake_run(tmp_path, "offline", online=None))
    assert row["published"] is None and row["linear_top1"] == 91.0
    assert "no online_linear_top1, measured by an online linear classifier" in row["published_note"]
    assert "train.online_linear=true" in row["published_note"]


def test_published_says_what_differs(tmp_path):
    row = run_row(fake_run(tmp_path, "short", "train.epochs=15"))
    assert row["published"] is None
    assert "published 92.58 online_linear_top1" in row["published_note"]
    assert "at epochs=1000" in row["published_note"] and "this run: epochs=15" in row["published_note"]
    row = run_row(fake_run(tmp_path, "tweaked", "train.lr=0.5"))
    assert row["published"] is None and "this run: train.lr=0.5" in row["published_note"]
    row = run_row(fake_run(tmp_path, "other_method", "method.name=simclr"))
    assert row["published"] is None and "method.name=simclr" in row["published_note"]
    table = compare([tmp_path / "short"])
    assert "- short: published 92.58" in table


def test_no_published_column_without_references(tmp_path):
    run = fake_run(tmp_path, "noref", "reference=[]")
    assert "published" not in compare([run])


def test_duplicate_view_names_draw_independent_views():
    # SimCLR / MoCo v2+ presets use one recipe for both views: [strong, strong]
    from kith.data.augment import BatchAugment
    from kith.data.spec import ImageSpec

    cfg = build_config(["preset=cifar10/simclr"])
    assert list(cfg.method.views) == ["strong", "strong"]
    aug = BatchAugment(cfg.augment.strong, ImageSpec.of(32, [0.5] * 3, [0.25] * 3))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(aug(images, gen), aug(images, gen))


def test_the_multicrop_presets_are_ressl_multi_with_its_published_number(edited_recipes):
    cfg = build_config(["preset=imagenet/ressl-multicrop"])
    sizes = [cfg.augment[v].size for v in [*cfg.method.views, *cfg.method.extra_views]]
    assert sizes == [224, 224, 192, 160, 128, 96]
    assert [r.value for r in cfg.reference] == [74.7]
    for preset in ("imagenet/ressl-multicrop", "imagenet100/ressl-multicrop"):
        rows = {r.key: r for r in recipes.preset_rows(preset)}
        assert rows["extra4.size"].status == rows["extra4.max_scale"].status == recipes.SAME
    # the extra crops are compared field by field with the official ones
    edited_recipes["recipes"]["ressl/imagenet-multicrop"]["extra_views"][1] = {
        **edited_recipes["views"]["ressl_multi_160"], "min_scale": 0.2}
    bad = {r.key for r in recipes.preset_rows("imagenet/ressl-multicrop") if r.status == recipes.DIFFERS}
    assert bad == {"extra2.min_scale"}
