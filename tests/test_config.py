from dataclasses import dataclass

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from kith.config import available_presets, build_config, key_policy, load_preset, to_yaml
from kith.data.augment import BatchAugment
from kith.data.loader import Batch
from kith.data.spec import KNOWN_STATS, ImageSpec, image_spec
from kith.data.views import ViewPlan, make_views
from kith.evaluation.probe import KnnSettings
from kith.methods import METHODS, MethodConfig
from kith.methods.context import StepInfo, TrainInfo
from kith.nn.backbones import BACKBONES, RESNET_FEATURE_DIM, build_backbone
from kith.runs.resume import RESUMABLE_KEYS, resume_changes
from kith.tools.study import NO_EFFECT_KEYS
from kith.train.setup import build_method
from kith.utils.errors import UserError
from kith.utils.keys import FIXED, NO_EFFECT, RESUMABLE, Range
from kith.utils.keys import key as config_key
from tests.helpers import small_heads, tiny_config


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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_name_config_and_presets_agree(name):
    """The registry key, the class name, its Config's default name and `method=<name>` are one name;
    every dataset folder has a preset file of that name, which selects that method."""
    cls = METHODS[name]
    assert cls.name == name and cls.Config().name == name and cls.summary
    assert build_config([f"method={name}"]).method.name == name
    # imagenet/ holds only the full-scale published recipe kith copies (ReSSL's 5 crops), not every method
    datasets = {p.split("/")[0] for p in available_presets() if "/" in p} - {"imagenet"}
    assert datasets
    for data in sorted(datasets):
        assert load_preset(f"{data}/{name}").method.name == name, f"{data}/{name}"


def test_every_preset_is_a_registered_method_named_by_its_file():
    presets = available_presets()
    assert "demo" in presets and "cifar10/simclr" in presets
    for preset in presets:  # <dataset>/<method>, or <dataset>/<method>-<variant> (ressl-multicrop)
        if "/" in preset:
            assert preset.split("/")[1].split("-")[0] == load_preset(preset).method.name, preset
    assert {p.split("/")[1].split("-")[0] for p in presets if "/" in p} == set(METHODS)


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_builds_and_trains_one_step(preset):
    """Each preset's method keys, optimizer and view recipes, on a tiny network: its views, one
    training step with a finite loss, and a gradient that reaches the backbone."""
    cfg = build_config([f"preset={preset}", "backbone.name=tiny", "backbone.width=8", "data.size=16",
                        *small_heads(load_preset(preset).method.name)])
    b, spec = 8, image_spec(cfg.data)
    info = TrainInfo(num_samples=64, steps_per_epoch=2, epochs=cfg.train.epochs)
    method = build_method(cfg, info)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, spec.size, spec.size), dtype=torch.uint8, generator=gen)
    plan = ViewPlan.of(cfg.augment, method.views, method.extra_views, spec.size)  # + extra crops, by size
    views = make_views(Batch(images, torch.zeros(b), torch.arange(b)),
                       {v: BatchAugment(cfg.augment[v], spec) for v in plan.names}, plan, gen)
    batch = Batch(images=images, labels=torch.arange(b) % 3, indices=torch.arange(b))
    loss, _ = method.training_step(views, batch, StepInfo(0, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(["preset=cifar10/byol", "train.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = build_config([], base=OmegaConf.load(path))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_wrong_number_of_views_is_a_user_error(method):
    cfg = tiny_config(method, "method.views=[strong]")
    with pytest.raises(UserError, match=f"{method} needs 2 views"):
        build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2))


def _numeric_keys(node, prefix=""):
    """Dotted keys of every int/float value (and list of them) in a resolved config."""
    keys = []
    for key in node:
        value, full = node[key], f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys += _numeric_keys(value, full + ".")
        else:
            items = list(value) if isinstance(value, ListConfig) else [value]
            if items and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                keys.append(full)
    return keys


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_numeric_key_rejects_a_negative_value_in_one_line(method):
    """-1 is out of range for every numeric key; the error names the key instead of a later traceback."""
    base = [f"method={method}"] + (["method.num_prototypes=[10, 5]"] if method == "spcl" else [])
    keys = _numeric_keys(build_config(base))
    assert "train.lr" in keys and "data.size" in keys and "augment.strong.min_scale" in keys
    for key in keys:
        value = build_config(base)
        bad = "[-1]" if isinstance(OmegaConf.select(value, key), ListConfig) else "-1"
        with pytest.raises(UserError) as err:
            build_config(base + [f"{key}={bad}"])
        message = str(err.value)
        assert "\n" not in message and key in message, (key, message)


@pytest.mark.parametrize("override,key", [
    (["train.lr=0"], "train.lr"),
    (["data.size=0"], "data.size"),
    (["train.epochs=0"], "train.epochs"),
    (["data.holdout=1.5"], "data.holdout"),
    (["method=byol", "method.tau_base=1.5"], "method.tau_base"),
    (["augment.strong.min_scale=0.9", "augment.strong.max_scale=0.5"], "augment.strong.min_scale"),
    (["augment.weak.flip_prob=2"], "augment.weak.flip_prob"),
    (["method=all4one", "method.queue_size=3"], "method.queue_size"),
    (["method=msf", "method.bank_size=4", "method.k=5"], "method.bank_size"),
    (["method=all4one", "method.proj_output_dim=30", "method.transformer_heads=8"],
     "method.transformer_heads"),
    (["method=simclr", "method.temperature=0"], "method.temperature"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        build_config(override)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_in_range_edge_values_are_accepted():
    build_config(["train.knn_every=0", "train.weight_decay=0", "train.grad_clip=0", "data.num_workers=0",
                  "augment.strong.hue=0.5", "augment.strong.min_scale=1", "train.warmup_epochs=0"])
    build_config(["method=all4one", "method.queue_size=5", "method.num_neighbours=5"])


def test_every_listed_resnet_builds_from_its_config_section():
    """`BACKBONES` lists what `build_backbone` accepts (resnet34 too), and each named ResNet builds from
    a `backbone` section into a network whose feature width is the one it reports (and the one
    `kith recipes` assumes without building it)."""
    assert {"resnet18", "resnet34", "resnet50", "tiny"} <= set(BACKBONES)
    for name in (b for b in BACKBONES if b.startswith("resnet")):
        net, dim = build_backbone(build_config([f"backbone.name={name}"]).backbone)
        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, dim) == (1, RESNET_FEATURE_DIM[name]), name


@dataclass
class _NewcomerConfig(MethodConfig):
    """A method added later, whose keys share names with other methods' keys."""

    name: str = "newcomer"
    k: int = 0  # MSF's `k` must be >= 1; this one may be 0
    scale: float = 0.0  # Barlow Twins' `scale` must be > 0; this one may be 0
    temperature: float = config_key(2.0, range=Range(1, 3))  # its own range, not SimCLR's > 0


class _Newcomer:
    Config = _NewcomerConfig


def test_a_new_key_named_like_another_methods_key_has_only_its_own_range(monkeypatch):
    monkeypatch.setitem(METHODS, "newcomer", _Newcomer)
    cfg = build_config(["method=newcomer"])
    assert cfg.method.k == 0 and cfg.method.scale == 0.0
    with pytest.raises(UserError, match=r"method.k=-1 is out of range: it must be >= 0$"):
        build_config(["method=newcomer", "method.k=-1"])
    with pytest.raises(UserError, match=r"method.temperature=0.5 is out of range: it must be in \[1, 3\]$"):
        build_config(["method=newcomer", "method.temperature=0.5"])
    build_config(["method=simclr", "method.temperature=0.5"])  # the namesake keeps its own range


def _leaf_keys(node, prefix=""):
    for name in node:
        value = node[name]
        if isinstance(value, DictConfig):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_and_study_policies_come_from_the_field_declarations(method):
    cfg = build_config([f"method={method}"])
    assert key_policy(cfg, "train.lr") == key_policy(cfg, "eval.knn_k") == RESUMABLE
    assert key_policy(cfg, "train.progress") == key_policy(cfg, "train.device") == NO_EFFECT
    assert key_policy(cfg, "train.batch_size") == key_policy(cfg, "seed") == FIXED
    fixed = [k for k in _leaf_keys(cfg) if k.startswith(("method.", "augment.", "backbone."))]
    assert fixed and all(key_policy(cfg, k) == FIXED for k in fixed)
    assert key_policy(cfg, "method.a_key_of_another_method") == FIXED
    assert key_policy(cfg, "augment.a_removed_recipe.min_scale") == FIXED
    assert set(NO_EFFECT_KEYS) < set(RESUMABLE_KEYS) and "train.lr" in RESUMABLE_KEYS
    assert "train.lr" not in NO_EFFECT_KEYS and "train.batch_size" not in RESUMABLE_KEYS


def test_a_resume_may_change_resumable_keys_only():
    saved = to_yaml(build_config(["method=byol"]))
    changed = resume_changes(saved, build_config(["method=byol", "train.lr=0.1", "train.progress=false"]))
    assert set(changed) == {"train.lr", "train.progress"}
    for override in ("method.tau_base=0.9", "augment.strong.min_scale=0.2", "train.batch_size=64"):
        with pytest.raises(UserError, match=f"cannot change {override.split('=')[0]} "):
            resume_changes(saved, build_config(["method=byol", override]))


def test_the_image_spec_and_knn_settings_come_from_their_config_sections():
    cfg = build_config(["data.name=cifar10", "data.size=24", "eval.knn_k=[7,3]", "eval.batch_size=64"])
    assert image_spec(cfg.data) == ImageSpec(24, *KNOWN_STATS["cifar10"])
    own = image_spec(build_config(["data.mean=[0.5,0.5,0.5]"]).data)  # the demo's digits, own mean
    assert own.mean == (0.5, 0.5, 0.5) and own.std == KNOWN_STATS["digits"][1]
    assert KnnSettings.of(cfg.eval) == KnnSettings((7, 3), cfg.eval.knn_temperature, 64, False)
    assert KnnSettings.of(cfg.eval, [5], progress=True).ks == (5,)
