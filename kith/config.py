"""Typed configuration: one dataclass tree (OmegaConf structured), YAML presets, `key=value` overrides.

Presets live in `kith/presets/` and are YAML diffs over the defaults below. The `method`
section's schema is the chosen method's own `Config` dataclass, so `method.tau_base` is
valid for BYOL and an error for SimCLR. Unknown keys fail with the closest valid key.

What is known about a key is declared once, on its dataclass field (`kith.utils.keys`): its range
and choices (checked by `validate`), and whether a resume may change it and whether it changes the
trained result (read by `kith.runs.resume` and `kith study` through `key_policy`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kith.data.augment import ViewConfig, default_views
from kith.data.images import MAX_PIXELS
from kith.methods import get_method_class
from kith.nn.backbones import BackboneConfig
from kith.utils.errors import UserError, check_choice, did_you_mean, first_line
from kith.utils.keys import (
    NO_EFFECT,
    RESUMABLE,
    KeyMeta,
    Policy,
    Range,
    count,
    fraction,
    has_key,
    key,
    key_meta,
    leaf_policies,
    positive,
)

DEFAULT_PRESET = "demo"


@dataclass
class DataConfig:
    name: str = "cifar10"  # digits | cifar10 | cifar100 | stl10 | folder | filelist | npz
    path: Optional[str] = key(None, policy=RESUMABLE)  # dataset root (folder, npz file, CIFAR/STL parent)
    size: int = key(32, range=Range(8))  # images are stored and cropped at size x size
    train_subset: Optional[int] = count(None)  # keep this many training images (class-balanced when labelled)
    test_subset: Optional[int] = count(None)  # keep this many test images (class-balanced when labelled)
    holdout: float = key(0.1, range=Range(0, 1, low_open=True, high_open=True))  # test fraction when none
    download: bool = key(False, policy=NO_EFFECT)  # torchvision download for CIFAR/STL when online
    # whole dataset as one uint8 tensor on the device; None = when it fits
    resident: Optional[bool] = key(None, policy=NO_EFFECT)
    resident_max_gb: float = positive(8.0, policy=NO_EFFECT)  # resident when the uint8 data fits in this
    num_workers: int = key(4, policy=NO_EFFECT)  # decode workers of the streaming loader and clean passes
    # streaming: cpu (decode + crop in workers) | gpu (batched JPEG decode + batched crops on CUDA)
    decode: str = key("cpu", choices=("cpu", "gpu"), policy=NO_EFFECT)
    # where the augmentation's random parameters are drawn, from the same (seed, step, rank) seed: cpu (a CPU
    # generator, copied over: the same views on every device) | device (a generator on the training device,
    # reseeded each step: no copy, and train.cuda_graph then captures the augmentation in its graph too)
    augment_rng: str = key("cpu", choices=("cpu", "device"))
    skip_bad_images: bool = False  # skip corrupt/empty image files instead of stopping
    # an image with more pixels (its header's width x height, read before decoding) is a bad image; raise it
    # for large photos (3 bytes a pixel decoded)
    max_pixels: int = count(MAX_PIXELS, policy=RESUMABLE)
    # per-channel normalisation; None = the dataset's known values
    mean: Optional[list[float]] = fraction(None)
    std: Optional[list[float]] = positive(None)  # per-channel std; None = the dataset's known values


# A resume may change the optimiser's numbers and the schedule's length (they take effect from the resume
# on), not what fixes the batches or the compiled graph (batch_size, optimizer, channels_last, compile).
@dataclass
class TrainConfig:
    epochs: int = count(100, policy=RESUMABLE)  # training length; a resume may extend it
    batch_size: int = count(256)  # global batch (all ranks together)
    optimizer: str = key("lars", choices=("lars", "sgd", "adamw"))  # LARS, SGD with momentum, or AdamW
    lr: float = positive(0.4, policy=RESUMABLE)  # base lr for batch 256; used lr = lr * batch_size / 256
    weight_decay: float = key(1e-4, policy=RESUMABLE)  # L2 weight decay (see exclude_bias_norm_wd)
    # biases/norms: no weight decay (nor LARS adaptation); False decays them
    exclude_bias_norm_wd: bool = True
    momentum: float = key(0.9, range=Range(0, 1, high_open=True), policy=RESUMABLE)  # SGD / LARS momentum
    warmup_epochs: float = key(10.0, policy=RESUMABLE)  # linear lr warm-up, then cosine to 0
    lars_eta: float = positive(0.02, policy=RESUMABLE)  # LARS trust coefficient
    lars_clip: bool = key(True, policy=RESUMABLE)  # clip LARS's adaptive rate (solo-learn's clip_lr)
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = key("auto", choices=("auto", "fp32", "bf16", "fp16"), policy=RESUMABLE)
    grad_clip: float = key(0.0, policy=RESUMABLE)  # max grad norm; 0 = off
    device: str = key("auto", policy=NO_EFFECT)  # auto | cpu | cuda | cuda:1 ...
    checkpoint_every: int = count(10, policy=NO_EFFECT)  # epochs; the last epoch always writes one
    # also at the first metrics row this long after the last; 0 = off
    checkpoint_every_minutes: float = key(30.0, policy=RESUMABLE)
    knn_every: int = key(10, policy=RESUMABLE)  # epochs between online kNN monitors; 0 = off
    # a linear classifier on detached features, trained with the run and tested each epoch (solo-learn's
    # published protocol; kith.train.online_linear): never in the backbone's gradient
    online_linear: bool = False
    log_every: int = count(10, policy=RESUMABLE)  # steps between metrics.jsonl rows
    progress: bool = key(True, policy=NO_EFFECT)  # progress bars, drawn only when stderr is a terminal
    sync_bn: bool = key(True, policy=RESUMABLE)  # SyncBatchNorm when world size > 1 (CUDA)
    # ... in the momentum (EMA teacher) networks too, as solo-learn (Lightning's sync_batchnorm converts
    # the whole model) and BYOL's cross-replica BN; false: the online networks only
    sync_bn_momentum: bool = key(True, policy=RESUMABLE)
    # none | tensorboard | wandb (extra `log`); metrics.jsonl is always written
    logger: str = key("none", choices=("none", "tensorboard", "wandb"), policy=NO_EFFECT)
    channels_last: str = key("auto", choices=("auto", "true", "false"))  # auto: on for conv nets on CUDA
    # on CUDA: cuDNN times its convolution algorithms for the run's fixed shapes and keeps the fastest
    # (faster steps; the chosen algorithm may differ from run to run, so GPU runs are not bitwise repeatable)
    cudnn_benchmark: bool = key(True, policy=RESUMABLE)
    compile: bool = False  # torch.compile the method's step; its compile time is logged apart (kind compile)
    # torch.compile mode
    compile_mode: str = key("default", choices=("default", "reduce-overhead", "max-autotune",
                                                "max-autotune-no-cudagraphs"))
    compile_backend: str = "inductor"  # inductor; aot_eager / eager to debug (no code generation)
    # torch.compile the augmentation's rendering too (its random draws stay eager), with compile_backend:
    # a view's few hundred elementwise kernels fuse into a few; one graph per recipe
    compile_augment: bool = False
    # CUDA: after 3 eager steps, capture the step from forward to EMA update (backward, optimizer, queue
    # pushes) as one CUDA graph and replay it every step: one launch instead of a thousand or more
    cuda_graph: bool = key(False, policy=RESUMABLE)


# evaluation settings change what is measured, not what is trained: all of them may change on resume
@dataclass
class EvalConfig:
    knn_k: list[int] = count([20, 200], policy=RESUMABLE)  # k of the final kNN evaluation
    knn_temperature: float = positive(0.07, policy=RESUMABLE)  # kNN votes weighted by exp(similarity / T)
    batch_size: int = count(512, policy=RESUMABLE)  # batch of the feature passes
    monitor_k: int = count(200, policy=RESUMABLE)  # k of the online kNN monitor (train.knn_every)


@dataclass
class ReferenceConfig:
    """A published number for a preset's recipe; `kith compare` shows it beside a run whose
    recipe and budget (epochs, backbone, data, batch_size) match. Entries of the `reference` list
    are not range-checked (the list as a whole is one key, of no effect on a run)."""

    source: str = ""  # where the number is published (document, table, commit)
    metric: str = "linear_top1"  # a `kith compare` row key: linear_top1 | knn@200 | knn@20 ...
    value: float = 0.0  # accuracy in %
    epochs: Optional[int] = None
    backbone: Optional[str] = None
    data: Optional[str] = None
    batch_size: Optional[int] = None
    hardware: Optional[str] = None
    note: Optional[str] = None


@dataclass
class Config:
    preset: Optional[str] = None  # the preset the config was built from (`kith pretrain --help` lists them)
    # seeds every random stream (data order, augmentations, initialisation); numpy takes 32-bit seeds
    seed: int = key(0, range=Range(0, 2**32 - 1))
    out_dir: str = key("runs", policy=NO_EFFECT)  # where run folders are made
    run_name: Optional[str] = key(None, policy=NO_EFFECT)  # run folder name; None: <method>-<data>-<time>
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: dict[str, ViewConfig] = field(default_factory=default_views)
    method: Any = None  # the method's own Config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # published numbers of the preset's recipe
    reference: list[ReferenceConfig] = key(factory=list, policy=NO_EFFECT)


def keys_at_least(policy: Policy) -> tuple[str, ...]:
    """The dotted keys outside the method and augment sections whose policy is `policy` or above
    (every method and augment key is fixed for a run)."""
    return tuple(k for k, p in leaf_policies(Config()) if p >= policy)


def available_presets() -> list[str]:
    root = resources.files("kith") / "presets"
    found = []
    for path in Path(str(root)).rglob("*.yaml"):
        if not path.name.startswith("_"):  # _data.yaml files are shared bases, not presets
            found.append(path.relative_to(Path(str(root))).with_suffix("").as_posix())
    return sorted(found)


def load_preset(name: str) -> DictConfig:
    """A preset's YAML; `inherit: other/preset` merges that preset underneath first."""
    path = Path(str(resources.files("kith") / "presets")) / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}'{did_you_mean(name, available_presets())}; "
                        "`kith pretrain --help` lists the presets")
    node = OmegaConf.load(path)
    parent = node.pop("inherit", None)
    return OmegaConf.merge(load_preset(parent), node) if parent else node


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node:
            full = f"{prefix}{key}"
            keys.append(full)
            keys.extend(_dotted_keys(node._get_node(key), full + "."))
    return keys


def _merge(schema: DictConfig, other: DictConfig | ListConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        valid = _dotted_keys(schema)
        if key and key not in valid:
            raise UserError(f"unknown config key '{key}' in {source}{did_you_mean(key, valid)}") from None
        reason = first_line(exc)
        raise UserError(f"bad value for '{key}' in {source}: {reason}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. train.epochs=5)")
    # `method=byol` is shorthand for method.name=byol (and must not clash with method.* keys)
    overrides = [f"method.name={item[7:]}" if item.startswith("method=") else item for item in overrides]
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot parse overrides {overrides}: {first_line(exc)}") from None


def build_config(overrides: list[str] | None = None, base: DictConfig | dict | None = None) -> DictConfig:
    """Resolve defaults <- preset <- `base` <- overrides into a validated, read-only config.

    `overrides` are `key=value` strings; `preset=NAME` picks the preset (default `demo`).
    `base` (e.g. a saved run's config.yaml) is merged before the overrides.
    """
    user = parse_overrides(overrides or [])
    base_cfg = OmegaConf.create(base) if base is not None else OmegaConf.create({})
    preset_name = user.get("preset", base_cfg.get("preset", None))
    if preset_name is None and base is None:
        preset_name = DEFAULT_PRESET
    preset = load_preset(preset_name) if preset_name else OmegaConf.create({})

    def method_of(layer: DictConfig) -> str | None:
        return OmegaConf.select(layer, "method.name", default=None)

    method_name = method_of(user) or method_of(base_cfg) or method_of(preset) or "simclr"
    if method_of(preset) not in (None, method_name):
        # switching method on the command line: the preset's keys belong to its own method
        preset = OmegaConf.masked_copy(preset, [k for k in preset if k != "method"])
    method_cls = get_method_class(method_name)

    schema = OmegaConf.structured(Config(method=method_cls.Config()))
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.augment, False)  # users may name new recipes (each one is a typed ViewConfig)
    cfg = _merge(schema, preset, f"preset '{preset_name}'")
    if base is not None:
        cfg = _merge(cfg, base_cfg, "the run's config.yaml")
    cfg = _merge(cfg, user, "the command line")
    cfg.preset = preset_name
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _section_type(node: Any) -> Any:
    """The dataclass a config node was built from (`dict` for a plain dict section, None for a non-node)."""
    return OmegaConf.get_type(node) if isinstance(node, DictConfig) else None


def config_key_meta(cfg: DictConfig, dotted: str) -> KeyMeta:
    """The metadata of `dotted` key of the root config `cfg`: declared on its field in the section that
    holds it. A key no section declares (inside a plain dict section such as `augment`, or absent
    from `cfg`, e.g. another method's) takes the metadata of the nearest field above it that is declared."""
    parent, _, name = dotted.rpartition(".")
    section = _section_type(OmegaConf.select(cfg, parent) if parent else cfg)
    if has_key(section, name):
        return key_meta(section, name)
    return config_key_meta(cfg, parent) if parent else KeyMeta()


def key_policy(cfg: DictConfig, dotted: str) -> Policy:
    """FIXED, RESUMABLE or NO_EFFECT for the `dotted` key of the root config `cfg` (see `kith.utils.keys`)."""
    return config_key_meta(cfg, dotted).policy


def _numbers(value: Any) -> list | None:
    """The numbers to range-check in a leaf value: it, or its items; None unless all are int/float."""
    items = list(value) if isinstance(value, ListConfig) else [value]
    if items and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return items
    return None


def _check_ranges(node: DictConfig, prefix: str = "") -> None:
    """Every int/float (and list of them) under `node` against its field's declared range (>= 0 when
    it declares none), then each field declared `at_most` a sibling against that sibling."""
    section = _section_type(node)
    for name in node:
        full, value = f"{prefix}{name}", node[name]
        if isinstance(value, DictConfig):
            _check_ranges(value, full + ".")
            continue
        rng = key_meta(section, name).range
        for v in _numbers(value) or []:
            if not math.isfinite(v):
                raise UserError(f"{full}={value} is not a finite number: give a number")
            if v not in rng:
                raise UserError(f"{full}={value} is out of range: it must be {rng}")
    for small in node:
        large = key_meta(section, small).at_most
        a, b = node.get(small), node.get(large) if large else None
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            raise UserError(f"{prefix}{small}={a} is larger than {prefix}{large}={b}; "
                            f"{prefix}{small} must be <= {prefix}{large}")


def _check_choices(node: DictConfig, prefix: str = "") -> None:
    """Every key declared with `choices` under `node` against them."""
    section = _section_type(node)
    for name in node:
        full, value = f"{prefix}{name}", node[name]
        if isinstance(value, DictConfig):
            _check_choices(value, full + ".")
        elif key_meta(section, name).choices:
            check_choice(full, value, key_meta(section, name).choices)


RUN_NAME_MAX = 200  # characters; file systems allow 255 bytes per name, kith adds suffixes to some


def _check_run_name(name: str | None) -> None:
    """run_name is one folder name inside out_dir: no separators, no `..`, short enough for a file system."""
    if name is None:
        return
    if not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
        raise UserError(f"run_name='{name[:80]}' must be a plain folder name inside out_dir (no '/', '\\', "
                        "'..'): to write elsewhere set out_dir or --run-dir")
    if len(name.encode("utf-8", "surrogateescape")) > RUN_NAME_MAX:
        raise UserError(f"run_name is {len(name)} characters long; at most {RUN_NAME_MAX}: shorten it")


def validate(cfg: DictConfig) -> None:
    """Checks a schema cannot express: each key's declared choices and range, the method's own
    cross-field rules (`MethodConfig.check`), and that the method's views name existing recipes."""
    cfg.train.channels_last = str(cfg.train.channels_last).lower()  # `=true` on the command line is a bool
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_run_name(cfg.run_name)
    OmegaConf.to_object(cfg.method).check()
    for which in ("views", "extra_views"):
        for name in cfg.method[which]:
            if name not in cfg.augment:
                raise UserError(f"method.{which} names augment recipe '{name}', which does not exist"
                                f"{did_you_mean(name, cfg.augment.keys())}; define it as "
                                f"augment.{name}={{size: 96, min_scale: 0.05, max_scale: 0.14}} or similar")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
