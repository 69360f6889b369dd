"""Typed configuration: one dataclass tree (OmegaConf structured), YAML presets, `key=value` overrides.

Presets live in `kith/presets/` and are YAML diffs over the defaults below. The `method`
section's schema is the chosen method's own `Config` dataclass, so `method.tau_base` is
valid for BYOL and an error for SimCLR. Unknown keys fail with the closest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kith.data.augment import ViewConfig, default_views
from kith.methods import get_method_class
from kith.utils.errors import UserError, check_choice, did_you_mean, first_line

DEFAULT_PRESET = "demo"


@dataclass
class DataConfig:
    name: str = "cifar10"  # digits | cifar10 | cifar100 | stl10 | folder | filelist | npz
    path: Optional[str] = None  # dataset root (folder, npz file, CIFAR/STL parent folder)
    size: int = 32  # images are stored and cropped at size x size
    train_subset: Optional[int] = None  # keep this many training images (class-balanced when labelled)
    test_subset: Optional[int] = None
    holdout: float = 0.1  # fraction held out as the test split when a source has none
    download: bool = False  # torchvision download for CIFAR/STL when online
    resident: Optional[bool] = None  # whole dataset as one uint8 tensor on the device; None = when it fits
    resident_max_gb: float = 8.0
    num_workers: int = 4  # decode workers of the streaming loader and of streamed clean passes
    # streaming: cpu (decode + crop in workers) | gpu (batched nvjpeg decode + crop on CUDA)
    decode: str = "cpu"
    skip_bad_images: bool = False  # skip corrupt/empty image files instead of stopping
    mean: Optional[list[float]] = None  # per-channel normalisation; None = the dataset's known values
    std: Optional[list[float]] = None


@dataclass
class BackboneConfig:
    name: str = "resnet18"  # resnet18 | resnet50 | tiny | timm:<model name>
    cifar_stem: bool = True  # 3x3 stride-1 first conv, no max-pool (32x32 images)
    width: int = 32  # tiny convnet only


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch (all ranks together)
    optimizer: str = "lars"  # lars | sgd | adamw
    lr: float = 0.4  # base lr for batch 256; used lr = lr * batch_size / 256
    weight_decay: float = 1e-4
    # biases/norms: no weight decay (nor LARS adaptation); False decays them
    exclude_bias_norm_wd: bool = True
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    lars_eta: float = 0.02
    lars_clip: bool = True
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    grad_clip: float = 0.0  # max grad norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    checkpoint_every: int = 10  # epochs; the last epoch always writes one
    checkpoint_every_minutes: float = 30.0  # also at the first metrics row this long after the last; 0 = off
    knn_every: int = 10  # epochs between online kNN monitors; 0 = off
    log_every: int = 10  # steps between metrics.jsonl rows
    progress: bool = True  # tqdm bar
    sync_bn: bool = True  # SyncBatchNorm when world size > 1 (CUDA)
    logger: str = "none"  # none | tensorboard | wandb (extra `log`); metrics.jsonl is always written
    channels_last: str = "auto"  # auto (on for conv nets on CUDA) | true | false
    compile: bool = False  # torch.compile the method's step; its compile time is logged apart (kind compile)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # inductor; aot_eager / eager to debug (no code generation)


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    batch_size: int = 512
    monitor_k: int = 200


@dataclass
class ReferenceConfig:
    """A published number for a preset's recipe; `kith compare` shows it beside a run whose
    recipe and budget (epochs, backbone, data, batch_size) match."""

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
    preset: Optional[str] = None
    seed: int = 0
    out_dir: str = "runs"
    run_name: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: dict[str, ViewConfig] = field(default_factory=default_views)
    method: Any = None  # the method's own Config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: list[ReferenceConfig] = field(default_factory=list)  # published numbers of the preset's recipe


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
    cfg = _merge(schema, preset, f"preset '{preset_name}'")
    if base is not None:
        cfg = _merge(cfg, base_cfg, "the run's config.yaml")
    cfg = _merge(cfg, user, "the command line")
    cfg.preset = preset_name
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


# Allowed ranges, by the key's last name (method and augment keys share names across methods and
# recipes; a full dotted key wins over its last name): (low, high, low_open, high_open), None = unbounded.
# Every numeric key not named here must be >= 0 (`_RANGE_DEFAULT`), so a new key is never unchecked.
_POSITIVE = (0, None, True, False)
_AT_LEAST_1 = (1, None, False, False)
_UNIT = (0, 1, False, False)
_RANGE_DEFAULT = (0, None, False, False)
_RANGES: dict[str, tuple] = {
    **dict.fromkeys(("epochs", "batch_size", "checkpoint_every", "log_every", "width", "train_subset",
                     "test_subset", "queue_size", "bank_size", "num_neighbours", "k", "transformer_layers",
                     "transformer_heads", "transformer_ff_dim", "kmeans_iters", "cluster_every",
                     "kmeans_chunk_size", "proj_hidden_dim", "proj_output_dim", "pred_hidden_dim",
                     "num_prototypes", "knn_k", "monitor_k"), _AT_LEAST_1),
    **dict.fromkeys(("lr", "lars_eta", "temperature", "centroid_temperature", "knn_temperature", "t_student",
                     "t_teacher", "warmup_temperature", "proto_temperature", "transformer_lr", "scale",
                     "resident_max_gb", "num_prototypes_ratio", "min_ratio", "max_ratio", "blur_sigma_min",
                     "blur_sigma_max", "std"), _POSITIVE),
    **dict.fromkeys(("tau_base", "tau_final", "jitter_prob", "gray_prob", "blur_prob", "solarize_prob",
                     "flip_prob", "proto_warmup_fraction", "mean"), _UNIT),
    "data.size": (8, None, False, False),
    "data.holdout": (0, 1, True, True),
    "min_scale": (0, 1, True, False),
    "max_scale": (0, 1, True, False),
    "hue": (0, 0.5, False, False),
    "momentum": (0, 1, False, True),
    "transformer_dropout": (0, 1, False, True),
}
# (smaller, larger) pairs within one section
_ORDERED = (("min_scale", "max_scale"), ("min_ratio", "max_ratio"), ("blur_sigma_min", "blur_sigma_max"),
            ("num_neighbours", "queue_size"), ("k", "bank_size"))


def _range_text(rng: tuple) -> str:
    low, high, low_open, high_open = rng
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _in_range(value: float, rng: tuple) -> bool:
    low, high, low_open, high_open = rng
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _check_ranges(node: DictConfig, prefix: str = "") -> None:
    """Every int/float (and list of them) under `node` against `_RANGES`, then the ordered pairs."""
    for key in node:
        full, value = f"{prefix}{key}", node[key]
        if isinstance(value, DictConfig):
            _check_ranges(value, full + ".")
            continue
        items = list(value) if isinstance(value, ListConfig) else [value]
        if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            continue
        rng = _RANGES.get(full, _RANGES.get(key, _RANGE_DEFAULT))
        for v in items:
            if not _in_range(v, rng):
                raise UserError(f"{full}={value} is out of range: it must be {_range_text(rng)}")
    for small, large in _ORDERED:
        a, b = node.get(small), node.get(large)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            raise UserError(f"{prefix}{small}={a} is larger than {prefix}{large}={b}; "
                            f"{prefix}{small} must be <= {prefix}{large}")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that a schema cannot express, and the range of every numeric key."""
    choices = {
        "train.optimizer": ("lars", "sgd", "adamw"),
        "train.precision": ("auto", "fp32", "bf16", "fp16"),
        "train.logger": ("none", "tensorboard", "wandb"),
        "train.channels_last": ("auto", "true", "false"),
        "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "data.decode": ("cpu", "gpu"),
    }
    cfg.train.channels_last = str(cfg.train.channels_last).lower()  # `=true` on the command line is a bool
    for key, allowed in choices.items():
        check_choice(key, OmegaConf.select(cfg, key), allowed)
    _check_ranges(cfg)
    heads = cfg.method.get("transformer_heads")
    if heads and cfg.method.proj_output_dim % heads:
        raise UserError(f"method.transformer_heads={heads} does not divide method.proj_output_dim="
                        f"{cfg.method.proj_output_dim} (the transformer's width); pick a divisor")
    for name in cfg.method.views:
        if name not in cfg.augment:
            raise UserError(f"method.views names augment recipe '{name}', which does not exist"
                            f"{did_you_mean(name, cfg.augment.keys())}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
