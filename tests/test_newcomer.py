"""What a new user tries first: every command shown in the README and the getting-started page works as
shown (exports load without data settings, overrides after options, the config printed)."""

from __future__ import annotations

import warnings

import pytest
import torch

import kith
from kith.cli import main
from kith.runs.metrics import read_metrics
from kith.tools.export import export_backbone
from tests.helpers import TINY


@pytest.mark.parametrize("name,fmt", [("b.pt", "state_dict"), ("b.ts", "torchscript"), ("b.pt2", "export")])
def test_load_backbone_reads_every_export_without_data_settings(runs, tmp_path, name, fmt):
    x = torch.randn(3, 3, 16, 16)
    expected = kith.load_backbone(runs["simclr"])(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecation noise from kith's own calls
        loaded = kith.load_backbone(export_backbone(runs["simclr"], tmp_path / name, fmt))
    assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)


def test_torch_export_archive_evaluates_from_the_cli(runs, tmp_path, capsys):
    exported = export_backbone(runs["simclr"], tmp_path / "b.pt2", "export")
    tiny_data = [o for o in TINY if o.startswith("data.")]
    assert main(["eval", "--checkpoint", str(exported), "--no-linear", "--k", "5", *tiny_data]) == 0
    assert "kNN@5 top-1:" in capsys.readouterr().out


def test_onnx_file_is_named_as_such(tmp_path, capsys):
    onnx_file = tmp_path / "backbone.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    assert main(["eval", "--checkpoint", str(onnx_file), "data.name=digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ONNX" in err and "\n" not in err and "Python object" not in err


def test_overrides_may_follow_options(runs, capsys):
    assert main(["eval", str(runs["simclr"]), "--no-linear", "--k", "5", "eval.batch_size=64"]) == 0
    assert "kNN@5 top-1:" in capsys.readouterr().out
    assert read_metrics(runs["simclr"])[-1]["overrides"] == ["eval.batch_size=64"]  # it was applied


def test_words_a_command_cannot_take_are_still_rejected():
    with pytest.raises(SystemExit):
        main(["methods", "train.epochs=3"])
    with pytest.raises(SystemExit):
        main(["eval", "--bogus"])


def test_kith_config_prints_the_resolved_config_and_every_key(capsys):
    assert main(["config", "preset=cifar10/byol", "train.epochs=7"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "name: byol" in out
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("data.train_subset", "data.test_subset", "train.knn_every", "method.queue_size"):
        assert key in out


def test_pretrain_help_names_every_data_source(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "filelist" in out and "kith config --keys" in out
