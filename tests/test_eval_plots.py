"""Evaluation (kNN, linear probe, `kith eval`), `kith compare`, the plots and the study runner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config

from kith.cli import main
from kith.evaluation.probe import LinearSettings, knn_accuracy, linear_probe, weighted_votes
from kith.memory import chunked_topk
from kith.runs.metrics import read_metrics
from kith.tools.compare import compare, run_row, to_csv
from kith.tools.plots import (
    DPI,
    EMBEDDING_SIZE,
    curve_panels,
    curves_figure_pixels,
    plot_curves,
    plot_embedding,
    plot_retrieval,
    retrieval_figure_pixels,
)
from kith.train.loop import run_training


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    centres = 10 * torch.nn.functional.normalize(centres, dim=1)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs (SimCLR and BYOL, 2 epochs on 64 digits images)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for method in ("simclr", "byol"):
        torch.manual_seed(0)
        dirs[method] = run_training(tiny_config(method, out_dir=out), run_dir=out / method).run_dir
    return dirs


# ---- kNN --------------------------------------------------------------------------------
def test_knn_separated_clusters_is_perfect():
    x, y = _clusters(30, 4, 16, 0.5, seed=1)
    xt, yt = _clusters(10, 4, 16, 0.5, seed=1)  # same centres (same seed) ...
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
    x, y = _clusters(10, 2, 8, 0.1, seed=3)
    y_bank = y.clone()
    y_bank[::2] = -1
    y_query = y.clone()
    y_query[:5] = -1
    assert knn_accuracy(x, y_bank, x, y_query, ks=(3,)) == {3: 100.0}


# ---- linear probe -----------------------------------------------------------------------
def test_linear_probe_separable_features():
    x, y = _clusters(40, 5, 32, 1.0, seed=4)
    xt, yt = _clusters(20, 5, 32, 1.0, seed=4)
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


# ---- compare ----------------------------------------------------------------------------
def test_compare_table_of_two_runs(runs, tmp_path):
    csv_file, md_file = tmp_path / "t.csv", tmp_path / "t.md"
    table = compare([runs["simclr"], runs["byol"]], csv_path=csv_file, markdown_path=md_file)
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | method | data | backbone | epochs | kNN@20 | kNN@200 | linear top-1 "
                        "| wall time | images/s |")
    assert len(lines) == 4
    assert lines[2].startswith("| simclr | simclr | digits | tiny | 2 |")
    assert lines[3].startswith("| byol | byol | digits | tiny | 2 |")
    assert md_file.read_text() == table
    header, *body = csv_file.read_text().strip().splitlines()
    assert header.split(",")[:5] == ["name", "method", "data", "backbone", "epochs"]
    assert len(body) == 2
    row = run_row(runs["byol"])
    assert row["knn_source"] == "final" and row["knn@5"] > 0 and row["images_per_s"] > 0


def test_compare_prefers_latest_eval_row(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["simclr"], run)
    with open(run / "metrics.jsonl", "a") as fh:
        row = {"kind": "eval", "knn_top1@20": 11.0, "knn_top1@200": 12.0, "linear_top1": 13.0}
        fh.write(json.dumps(row) + "\n")
        fh.write(json.dumps({"kind": "eval", "knn_top1@20": 21.0, "knn_top1@200": 22.0, "linear_top1": 23.0,
                             "linear_top5": 50.0}) + "\n")
    row = run_row(run)
    got = (row["knn@20"], row["knn@200"], row["linear_top1"], row["knn_source"])
    assert got == (21.0, 22.0, 23.0, "eval")
    assert "| 21.00 | 22.00 | 23.00 |" in compare([run])
    assert "23.0" in to_csv([row])


# ---- kith eval --------------------------------------------------------------------------
def test_cli_eval_prints_knn_and_linear_and_logs_row(runs, capsys):
    before = len(read_metrics(runs["simclr"]))
    assert main(["eval", str(runs["simclr"]), "--k", "5,20", "--linear-epochs", "10"]) == 0
    out = capsys.readouterr().out
    assert "kNN@5 top-1:" in out and "kNN@20 top-1:" in out
    assert "linear probe (10 epochs, cached features): top-1" in out and "top-5" in out
    rows = read_metrics(runs["simclr"])
    assert len(rows) == before + 1
    row = rows[-1]
    assert row["kind"] == "eval" and row["linear_epochs"] == 10
    assert {"knn_top1@5", "knn_top1@20", "linear_top1", "linear_top5"} <= set(row)
    assert run_row(runs["simclr"])["linear_top1"] == row["linear_top1"]
    assert main(["eval", str(runs["simclr"]), "--k", "5", "--linear-epochs", "2", "--linear-augment"]) == 0
    assert "linear probe (2 epochs, augmented views): top-1" in capsys.readouterr().out
    assert read_metrics(runs["simclr"])[-1]["linear_augment"] is True


def test_cli_eval_exported_backbone_and_no_linear(runs, tmp_path, capsys):
    import kith

    backbone = kith.load_backbone(runs["byol"]).state_dict()
    exported = tmp_path / "backbone.pt"
    torch.save({"backbone": backbone, "config": (runs["byol"] / "config.yaml").read_text()}, exported)
    assert main(["eval", "--checkpoint", str(exported), "--no-linear", "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "kNN@5 top-1:" in out and "linear" not in out
    bare = tmp_path / "bare.pt"
    torch.save(backbone, bare)
    assert main(["eval", "--checkpoint", str(bare), "--no-linear", "--k", "5"]) == 2  # no config: says so
    assert "backbone.name" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(bare), "--no-linear", "--k", "5", "backbone.name=tiny",
                 "backbone.width=8", "data.name=digits", "data.size=16", "data.train_subset=64",
                 "data.test_subset=40"]) == 0
    assert "kNN@5 top-1:" in capsys.readouterr().out


def test_cli_eval_kith_export_file(runs, tmp_path, capsys):
    from kith.tools.export import export_backbone

    exported = export_backbone(runs["simclr"], tmp_path / "simclr-backbone.pt", "state_dict")
    assert main(["eval", "--checkpoint", str(exported), "--k", "5", "--no-linear"]) == 2  # which data?
    assert "data.name" in capsys.readouterr().err
    tiny_data = [o for o in TINY if o.startswith("data.")]
    assert main(["eval", "--checkpoint", str(exported), "--k", "5", "--linear-epochs", "3", *tiny_data]) == 0
    out = capsys.readouterr().out
    assert "exported backbone on digits (tiny" in out and "kNN@5 top-1:" in out and "linear probe" in out


@pytest.mark.parametrize("argv", [["eval", "{tmp}"], ["eval", "{tmp}/nowhere"], ["compare", "{tmp}"],
                                  ["plot", "{tmp}"], ["eval"],
                                  ["study", "--kind", "weak-aug", "--methods", "simclr", "--out", "{tmp}/s",
                                   "--values", "8"],
                                  ["study", "--kind", "dim", "--methods", "nosuch", "--out", "{tmp}/s"]])
def test_cli_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kith: error:") and "\n" not in err
    assert "Traceback" not in err


# ---- plots ------------------------------------------------------------------------------
def test_plot_curves_panels_and_size(tmp_path):
    rows = [{"kind": "start", "step": 0, "method": "x"}]
    for step in range(1, 61):
        rows.append({"kind": "train", "step": step, "epoch": 1 + step // 20, "loss": 5.0 / step,
                     "loss_inst": 1.0, "lr": 0.1, "tau": 0.99, "z_std": 0.06, "nn_acc": None})
        if step % 20 == 0:
            rows.append({"kind": "knn", "step": step, "knn_top1@20": 10.0 + step, "knn_top1@200": 9.0 + step})
    rows.append({"kind": "epoch_start", "step": 20, "epoch": 1, "nmi": 0.3})
    titles = [t for t, _ in curve_panels(rows)]
    assert titles[:3] == ["loss", "loss_inst", "kNN top-1 (%)"]
    assert len(titles) == 7  # loss, loss_inst, kNN, lr, tau, z_std, nmi (nn_acc only None: left out)
    path = plot_curves(rows, tmp_path / "curves.png")
    assert path.stat().st_size > 0
    assert _png_size(path) == curves_figure_pixels(7) == (1280, 500)


def test_plot_embedding_size(tmp_path):
    x, y = _clusters(15, 3, 20, 0.5, seed=6)
    y[0] = -1  # unlabelled point drawn grey
    path = plot_embedding(x, y, tmp_path / "emb.png", classes=["a", "b", "c"])
    assert path.stat().st_size > 0
    assert _png_size(path) == (round(EMBEDDING_SIZE[0] * DPI), round(EMBEDDING_SIZE[1] * DPI))


def test_plot_retrieval_size_and_frame_colours(tmp_path):
    gen = torch.Generator().manual_seed(7)
    queries = torch.randint(0, 256, (3, 3, 16, 16), generator=gen, dtype=torch.uint8)
    neighbours = torch.randint(0, 256, (3, 4, 3, 16, 16), generator=gen, dtype=torch.uint8)
    match = np.array([[True, False, True, True]] * 3)
    path = plot_retrieval(queries, neighbours, match, tmp_path / "ret.png")
    assert path.stat().st_size > 0
    width, height = retrieval_figure_pixels(3, 4)
    assert (width, height) == (5 * (64 + 8 + 4) + 12, 24 + 3 * (64 + 8 + 4))
    assert _png_size(path) == (width, height)
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    row_top = 24 + 2 + 1  # header, pad, then inside the 4-pixel frame
    green_x = (64 + 8 + 4) + 12 + 2 + 1  # first neighbour's frame
    red_x = 2 * (64 + 8 + 4) + 12 + 2 + 1  # second neighbour's frame
    assert img[row_top, green_x, 1] > 0.5 and img[row_top, green_x, 0] < 0.3
    assert img[row_top, red_x, 0] > 0.7 and img[row_top, red_x, 1] < 0.3


def test_cli_plot_run(runs, capsys):
    assert main(["plot", str(runs["byol"]), "--max-points", "30"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in printed)
    assert names == ["curves.png", "embedding.png", "retrieval.png"]
    for p in printed:
        assert _png_size(p)[0] > 100


# ---- study ------------------------------------------------------------------------------
def test_study_resumes_after_interruption(tmp_path, monkeypatch):
    from kith.tools import study

    overrides = [o for o in TINY if not o.startswith("train.knn_every")] + ["train.knn_every=0"]
    out = tmp_path / "dim"
    real = study.run_training
    calls = []

    def flaky(cfg, run_dir=None, resume=False, **kw):
        calls.append((run_dir.name, resume))
        if len(calls) == 2:  # the second run dies after its first epoch, leaving a checkpoint
            real(cfg, run_dir=run_dir, stop_after_epoch=1)
            raise KeyboardInterrupt
        return real(cfg, run_dir=run_dir, resume=resume, **kw)

    monkeypatch.setattr(study, "run_training", flaky)
    with pytest.raises(KeyboardInterrupt):
        study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == [("simclr-dim8", False), ("simclr-dim16", False)]
    assert (out / "simclr-dim16" / "checkpoints" / "last.pt").is_file()
    assert json.loads((out / "study.json").read_text())["runs"][0]["status"] == "trained"

    calls.clear()
    result = study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == [("simclr-dim16", True)]  # the first was skipped, the second resumed
    assert [r["status"] for r in result["runs"]] == ["skipped", "resumed"]
    assert all(r["knn"] for r in result["runs"])
    assert "proj_output_dim: 16" in (out / "simclr-dim16" / "config.yaml").read_text()
    assert (out / "study.md").read_text().count("| simclr |") == 1
    assert _png_size(out / "study.png")[0] > 100
    calls.clear()
    study.run_study("dim", ["simclr"], out, values=[8, 16], overrides=overrides, log=lambda *_: None)
    assert calls == []  # everything done: nothing trains


def test_study_weak_aug_plan():
    from kith.tools.study import plan

    runs = plan("weak-aug", ["byol"], overrides=["train.epochs=1"])
    assert [r["name"] for r in runs] == ["byol-strong", "byol-weak"]
    assert runs[1]["overrides"][-1] == "method.views=[weak,weak]"
    from kith.config import build_config

    assert list(build_config(runs[1]["overrides"]).method.views) == ["weak", "weak"]
