import pytest
from omegaconf import OmegaConf

from kith.config import available_presets, build_config
from kith.errors import UserError
from kith.methods import METHODS


def test_default_is_demo_preset():
    cfg = build_config([])
    assert cfg.preset == "demo"
    assert cfg.data.name == "digits"


def test_override_and_method_keys():
    cfg = build_config(["preset=cifar10/byol", "train.epochs=5", "method.tau_base=0.996"])
    assert cfg.method.name == "byol"
    assert cfg.train.epochs == 5
    assert cfg.method.tau_base == 0.996
    assert cfg.train.optimizer == "lars" and cfg.train.lr == 1.0  # from the preset
    assert cfg.data.name == "cifar10"  # from the inherited _data preset


def test_method_shorthand():
    assert build_config(["method=byol"]).method.name == "byol"


@pytest.mark.parametrize("key,suggestion", [("train.epoch=5", "train.epochs"),
                                            ("trian.epochs=5", "train"),
                                            ("data.sise=8", "data.size")])
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(UserError) as err:
        build_config([key])
    message = str(err.value)
    assert "\n" not in message
    assert f"did you mean '{suggestion}" in message


def test_method_specific_key_rejected_for_other_method():
    with pytest.raises(UserError, match="method.tau_base"):
        build_config(["method=simclr", "method.tau_base=0.9"])


def test_bad_value_and_unknown_preset_and_method():
    with pytest.raises(UserError, match="train.epochs"):
        build_config(["train.epochs=abc"])
    with pytest.raises(UserError, match="did you mean 'cifar10/byol'"):
        build_config(["preset=cifar10/byl"])
    with pytest.raises(UserError, match="unknown method"):
        build_config(["method=simclrr"])
    with pytest.raises(UserError, match="not key=value"):
        build_config(["train.epochs"])
    with pytest.raises(UserError, match="train.optimizer"):
        build_config(["train.optimizer=adam"])


def test_every_preset_resolves():
    presets = available_presets()
    assert "demo" in presets and "cifar10/simclr" in presets
    for name in presets:
        cfg = build_config([f"preset={name}"])
        assert cfg.method.name in METHODS


def test_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(["preset=cifar10/byol", "train.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = build_config([], base=OmegaConf.load(path))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_wrong_number_of_views_is_a_user_error(method):
    from kith.methods.base import TrainInfo
    from kith.train import build_method
    from tests.conftest import tiny_config

    cfg = tiny_config(method, "method.views=[strong]")
    with pytest.raises(UserError, match=f"{method} needs 2 views"):
        build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2))
