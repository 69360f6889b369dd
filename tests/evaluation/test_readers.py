"""Reading a backbone from every kind of file kith accepts, and the one-line error for each kind that
lacks what evaluating it needs."""

from __future__ import annotations

import pytest
import torch

from kith.config import build_config, to_yaml
from kith.evaluation.readers import load_eval_target
from kith.nn.backbones import build_backbone
from kith.utils.errors import UserError

NET = ["backbone.name=tiny", "backbone.width=8"]
DATA = ["data.name=digits", "data.size=16"]


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    net, _ = build_backbone(build_config(NET).backbone)
    return net


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_file_with_its_run_config_needs_no_overrides(tmp_path, backbone):
    cfg = build_config([*NET, *DATA, "method.name=byol"])
    torch.save({"config": to_yaml(cfg), "backbone": backbone.state_dict(), "step": 7}, tmp_path / "c.pt")
    net, got, info = load_eval_target(tmp_path / "c.pt")
    assert _same_weights(net, backbone) and got.method.name == "byol"
    assert info["method"] == "byol" and info["step"] == 7


def test_a_kith_export_records_the_network_and_asks_for_the_data(tmp_path, backbone):
    export = {"state_dict": backbone.state_dict(), "backbone": "tiny", "width": 8, "image_size": 16}
    torch.save(export, tmp_path / "e.pt")
    with pytest.raises(UserError, match="holds no run config; say which data"):
        load_eval_target(tmp_path / "e.pt")
    net, cfg, _ = load_eval_target(tmp_path / "e.pt", ["data.name=digits"])
    assert _same_weights(net, backbone) and cfg.data.size == 16 and cfg.backbone.width == 8


def test_a_bare_state_dict_needs_the_network_and_the_data(tmp_path, backbone):
    torch.save({f"module.{k}": v for k, v in backbone.state_dict().items()}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="bare state_dict without a config; say which network"):
        load_eval_target(tmp_path / "b.pt", DATA)
    net, _, _ = load_eval_target(tmp_path / "b.pt", [*NET, *DATA])  # DDP's module. prefix is dropped
    assert _same_weights(net, backbone)


def test_weights_of_another_network_say_which_keys_to_set(tmp_path, backbone):
    torch.save(backbone.state_dict(), tmp_path / "b.pt")
    with pytest.raises(UserError, match="do not fit backbone.name=tiny \\(width 16\\)"):
        load_eval_target(tmp_path / "b.pt", ["backbone.name=tiny", "backbone.width=16", *DATA])


def test_a_torchscript_backbone_needs_its_input_size(tmp_path, backbone):
    torch.jit.script(backbone).save(str(tmp_path / "b.ts"))
    with pytest.raises(UserError, match="records no input size"):
        load_eval_target(tmp_path / "b.ts", ["data.name=digits"])
    net, cfg, info = load_eval_target(tmp_path / "b.ts", DATA)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(net(x), backbone.eval()(x)) and info["backbone"] == "TorchScript backbone"


@pytest.mark.parametrize("content", [[1, 2, 3], {"weights": "none"}])
def test_anything_else_is_refused_in_one_line(tmp_path, content):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a kith checkpoint") as info:
        load_eval_target(tmp_path / "x.pt", DATA)
    assert "\n" not in str(info.value)
