"""The command line on finished runs: `kith eval` of a run, an export and a kith export file,
`kith plot`, and bad input as one line with exit code 2."""

from __future__ import annotations

import pytest
import torch

from kith.cli import main
from kith.runs.metrics import read_metrics
from kith.tools.compare import run_row
from tests.helpers import TINY, png_size


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


def test_cli_plot_run(runs, capsys):
    assert main(["plot", str(runs["byol"]), "--max-points", "30"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in printed)
    assert names == ["curves.png", "embedding.png", "retrieval.png"]
    for p in printed:
        assert png_size(p)[0] > 100
