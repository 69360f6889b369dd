import pytest
import torch
import torchvision

from kith.api import load_backbone
from kith.tools.export import export_backbone
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config("simclr", "train.epochs=1", "method.proj_hidden_dim=32", out_dir=tmp)
    run_training(cfg, run_dir=tmp / "run", final_eval=False)
    return tmp / "run"


def test_state_dict_and_torchscript_match_the_backbone(run_dir, tmp_path):
    backbone = load_backbone(run_dir)
    x = torch.randn(4, 3, 16, 16)
    expected = backbone(x)
    sd_file = export_backbone(run_dir, tmp_path / "b.pt")
    saved = torch.load(sd_file, weights_only=False)
    assert saved["feature_dim"] == 64 and saved["backbone"] == "tiny"
    fresh = load_backbone(run_dir)
    fresh.load_state_dict(saved["state_dict"])
    assert torch.allclose(fresh(x), expected, atol=1e-6)
    ts = torch.jit.load(str(export_backbone(run_dir, tmp_path / "b.ts", "torchscript")))
    assert torch.allclose(ts(x), expected, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_resnet_keys_are_torchvision_keys(tmp_path):
    cfg = tiny_config("simclr", "backbone.name=resnet18", "train.epochs=1", "data.train_subset=32",
                      "method.proj_hidden_dim=32", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    saved = torch.load(export_backbone(tmp_path / "run", tmp_path / "r18.pt"), weights_only=False)
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_bad_format_is_user_error(run_dir, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_backbone(run_dir, tmp_path / "x", "pickle")


def test_cli_export(run_dir, tmp_path, capsys):
    from kith.cli import main

    assert main(["export", str(run_dir), str(tmp_path / "b.pt")]) == 0
    assert "wrote state_dict" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "c.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_onnx_export_is_self_contained_and_matches(run_dir, tmp_path):
    """The .onnx file alone, copied elsewhere, loads and gives the backbone's features."""
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (only the test needs it)")
    pytest.importorskip("onnxscript", reason="the onnx extra (onnxscript) is not installed")
    import shutil

    out = export_backbone(run_dir, tmp_path / "export" / "b.onnx", "onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.onnx"]
    moved = tmp_path / "elsewhere" / "copy.onnx"
    moved.parent.mkdir()
    shutil.copy(out, moved)
    shutil.rmtree(out.parent)
    onnx.checker.check_model(onnx.load(str(moved)))
    session = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)
    (got,) = session.run(None, {"images": x.numpy()})
    assert torch.allclose(torch.from_numpy(got), load_backbone(run_dir)(x), atol=1e-4)


def test_torchscript_export_records_its_input_size_and_backbone(tmp_path, capsys):
    """`kith eval --checkpoint b.ts` used the demo preset's 16 px and named the demo's backbone."""
    from kith.cli import main
    from kith.evaluation.readers import load_eval_target

    cfg = tiny_config("simclr", "backbone.name=resnet18", "data.size=24", "train.epochs=1",
                      "data.train_subset=32", "method.proj_hidden_dim=32", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    ts = export_backbone(tmp_path / "run", tmp_path / "b.ts", "torchscript")
    data = ["data.name=digits", "data.train_subset=32", "data.test_subset=20"]
    _, loaded, info = load_eval_target(ts, data)
    assert loaded.data.size == 24 and info["backbone"] == "resnet18"
    assert main(["eval", "--checkpoint", str(ts), "--k", "5", "--no-linear", *data]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "24x24" in out
    _, loaded, _ = load_eval_target(ts, [*data, "data.size=32"])  # an explicit override still wins
    assert loaded.data.size == 32


LIGHT = ["efficientnet_b0", "mobilenet_v3_large", "mobilenet_v3_small", "vit_s16"]


@pytest.mark.parametrize("name", LIGHT)
def test_lightweight_backbones_export_and_keep_torchvision_keys(name, tmp_path):
    if name == "vit_s16":
        pytest.importorskip("timm")
    cfg = tiny_config("simclr", f"backbone.name={name}", "train.epochs=1", "data.train_subset=32",
                      "method.proj_hidden_dim=32", "method.proj_output_dim=16", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    backbone = load_backbone(tmp_path / "run").eval()
    x = torch.randn(2, 3, 16, 16)
    saved = torch.load(export_backbone(tmp_path / "run", tmp_path / "b.pt"), weights_only=False)
    assert saved["backbone"] == name and saved["feature_dim"] == backbone(x).shape[1]
    if name != "vit_s16":  # torchvision's own network: its keys, less the classifier
        model = getattr(torchvision.models, name)()
        missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
        assert {k.split(".")[0] for k in missing} == {"classifier"} and not unexpected
    ts = torch.jit.load(str(export_backbone(tmp_path / "run", tmp_path / "b.ts", "torchscript")))
    torch.testing.assert_close(ts(x), backbone(x), rtol=1e-4, atol=1e-5)
