"""Presets against the public recipes they copy: the key-by-key table behind docs/recipes.md.

The reference values live in `kith/presets/_recipes.yaml` (with the file and commit each
was read from); deliberate differences are recorded there with their reason. A preset
value that differs from its recipe without a recorded reason is an error
(`undocumented_differences`). `python -m kith.tools.recipes --write` regenerates docs/recipes.md;
`--check` exits 1 when it is out of date or a preset drifted.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kith.config import available_presets, build_config
from kith.methods import get_method_class
from kith.methods.context import TrainInfo
from kith.nn.backbones import RESNET_FEATURE_DIM

RECIPES_FILE = Path(str(resources.files("kith") / "presets")) / "_recipes.yaml"
# the repository's page, wherever kith runs from
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
# ResNet widths, so that heads can be built without building the backbone
# keys kith shows for every preset, also when the recipe does not give them
TRAIN_KEYS = ["train.optimizer", "train.lr", "train.batch_size", "train.epochs", "train.weight_decay",
              "train.exclude_bias_norm_wd", "train.momentum", "train.warmup_epochs"]
LARS_KEYS = ["train.lars_eta", "train.lars_clip"]
VIEW_FIELDS = ["min_scale", "max_scale", "brightness", "contrast", "saturation", "hue", "jitter_prob",
               "gray_prob", "blur_prob", "blur_sigma_min", "blur_sigma_max", "solarize_prob", "flip_prob"]

SAME, DELIBERATE, DIFFERS, KITH_ONLY = "same", "deliberate", "DIFFERS", "kith only"


@dataclass
class Row:
    key: str
    kith: Any
    reference: Any  # None when the recipe does not give the key
    status: str  # same | deliberate | DIFFERS | kith only
    reason: str = ""


@lru_cache(maxsize=1)
def load_recipes() -> dict:
    return yaml.safe_load(RECIPES_FILE.read_text())


def recipe_id(preset: str) -> str:
    """The recipe a preset copies: `method_recipes[method]` or `<dataset family>/<method>`."""
    data = load_recipes()
    dataset, method = preset.split("/", 1)
    return data["method_recipes"].get(method) or f"{data['datasets'][dataset]['family']}/{method}"


def _recipe_keys(rid: str) -> tuple[dict, list[dict], list[str], list[dict]]:
    """(keys, views, files, extra views) of a recipe, its `extends` chain merged underneath."""
    recipe = load_recipes()["recipes"][rid]
    keys, views, files, extra = {}, [], [], []
    if "extends" in recipe:
        keys, views, files, extra = _recipe_keys(recipe["extends"])
    keys = {**keys, **(recipe.get("keys") or {})}
    views = recipe.get("views") or views
    extra = recipe.get("extra_views") or extra
    return keys, views, files + list(recipe.get("files") or []), extra


def reference_keys(preset: str) -> dict[str, Any]:
    """Every reference value of a preset: dataset keys, then the recipe's keys, views and extra views
    (`extra<i>.*`: the recipe of the i-th entry of `method.extra_views`)."""
    data = load_recipes()
    keys = dict(data["datasets"][preset.split("/", 1)[0]]["keys"])
    recipe, views, _, extra = _recipe_keys(recipe_id(preset))
    keys.update(recipe)
    for i, view in enumerate(views, start=1):
        keys.update({f"view{i}.{k}": v for k, v in view.items()})
    for i, view in enumerate(extra, start=1):
        keys.update({f"extra{i}.{k}": v for k, v in view.items()})
    return keys


def source_of(preset: str) -> str:
    """"<repo> @ <commit>: files" for a preset's recipe and each recipe it extends."""
    data = load_recipes()
    parts, rid = [], recipe_id(preset)
    while rid:
        recipe = data["recipes"][rid]
        src = data["sources"][recipe["source"]]
        at = f" @ {src['commit']}" if src.get("commit") else ""
        parts.append(f"{src['repo']}{at}: {', '.join(recipe.get('files') or [])}")
        rid = recipe.get("extends")
    return "; ".join(parts)


def deliberate_reason(preset: str, key: str) -> str | None:
    for entry in load_recipes().get("deliberate") or []:
        if any(fnmatch.fnmatch(preset, p) for p in entry["presets"]) and key in entry["keys"]:
            return entry["reason"]
    return None


def describe_head(module: Any) -> str:
    """"Linear 512→2048, BN, ReLU, Linear 2048→256" for an nn.Sequential head."""
    parts = []
    for layer in module:
        if isinstance(layer, nn.Linear):
            parts.append(f"Linear {layer.in_features}→{layer.out_features}")
        elif isinstance(layer, nn.BatchNorm1d):
            parts.append("BN")
        elif isinstance(layer, nn.ReLU):
            parts.append("ReLU")
        else:
            parts.append(type(layer).__name__)
    return ", ".join(parts)


def head_structures(cfg: DictConfig) -> dict[str, str]:
    """`head.<name>` → layer structure of the method's projector/predictor heads, built on the meta
    device around an identity backbone (no memory, no backbone)."""
    info = TrainInfo(num_samples=50_000, steps_per_epoch=195, epochs=int(cfg.train.epochs))
    with torch.device("meta"):
        method = get_method_class(cfg.method.name)(cfg.method, torch.nn.Identity(),
                                                   RESNET_FEATURE_DIM[cfg.backbone.name], info)
    out = {}
    for name in ("projector", "predictor", "predictor2"):
        head = getattr(method, name, None)
        if isinstance(head, torch.nn.Sequential):
            out[f"head.{name}"] = describe_head(head)
    return out


def kith_value(cfg: DictConfig, key: str, heads: dict[str, str]) -> Any:
    if key.startswith("head."):
        return heads.get(key)
    if key.startswith(("view", "extra")):
        which, field = key.split(".", 1)
        names = cfg.method.views if which.startswith("view") else cfg.method.extra_views
        index = int(which.removeprefix("view").removeprefix("extra")) - 1
        if index >= len(names):
            return None
        view = cfg.augment[names[index]]
        if field == "size":  # a recipe without its own size crops at data.size
            return view.size or cfg.data.size
        return OmegaConf.to_container(view)[field] if field in view else None
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig,)) or OmegaConf.is_list(value) \
        else value


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def shown_keys(cfg: DictConfig, reference: dict[str, Any], heads: dict[str, str]) -> list[str]:
    """The reference's keys, then what kith sets that the recipe does not name."""
    keys = list(reference)
    extra = TRAIN_KEYS + (LARS_KEYS if cfg.train.optimizer == "lars" else [])
    extra += [f"method.{k}" for k in cfg.method if k not in ("name", "views", "extra_views")]
    if cfg.method.extra_views:
        extra.append("method.extra_views")
    extra += [f"view{i}.{f}" for i in (1, 2) if len(cfg.method.views) >= i for f in VIEW_FIELDS]
    extra += [f"extra{i}.{f}" for i in range(1, len(cfg.method.extra_views) + 1)
              for f in ["size", *VIEW_FIELDS]]
    extra += list(heads)
    return keys + [k for k in extra if k not in reference]


def preset_rows(preset: str) -> list[Row]:
    """One row per key of the preset: kith's value, the reference value, and whether they agree."""
    cfg = build_config([f"preset={preset}"])
    reference = reference_keys(preset)
    heads = head_structures(cfg)
    rows = []
    for key in shown_keys(cfg, reference, heads):
        ours = kith_value(cfg, key, heads)
        if key not in reference:
            rows.append(Row(key, ours, None, KITH_ONLY))
            continue
        theirs = reference[key]
        reason = deliberate_reason(preset, key)
        if same_value(ours, theirs):
            rows.append(Row(key, ours, theirs, SAME))
        else:
            rows.append(Row(key, ours, theirs, DELIBERATE if reason else DIFFERS, reason or ""))
    return rows


def recipe_presets() -> list[str]:
    """The presets that copy a public recipe: every `<dataset>/<method>` preset (not `demo`)."""
    datasets = load_recipes()["datasets"]
    return [p for p in available_presets() if p.split("/", 1)[0] in datasets]


def undocumented_differences() -> dict[str, list[str]]:
    """{preset: [keys]} where a preset differs from its recipe with no recorded reason."""
    out = {}
    for preset in recipe_presets():
        bad = [r.key for r in preset_rows(preset) if r.status == DIFFERS]
        if bad:
            out[preset] = bad
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace("|", "\\|")


def render_markdown() -> str:
    """docs/recipes.md: the notes, then one table per preset."""
    data = load_recipes()
    intro = ("Generated by `python -m kith.tools.recipes --write` from `kith/presets/_recipes.yaml`; "
             "do not edit by hand. `tests/test_recipes.py` fails when a preset differs from its recipe "
             "without a recorded reason, or when this file is out of date.")
    lines = ["# Presets and the recipes they copy", "", intro, ""]
    lines += [f"- {note}" for note in data.get("notes") or []]
    for name, ds in data["datasets"].items():
        if ds.get("note"):
            lines.append(f"- {name}: {ds['note']}")
    status = ("Status: `same` = kith's value is the recipe's; `deliberate` = differs on purpose (reason "
              "given); `kith only` = the recipe does not name the key (kith's own setting or a value fixed "
              "in the reference code).")
    lines += ["", status, ""]
    for preset in recipe_presets():
        rows = preset_rows(preset)
        lines += [f"## {preset}", "", f"Recipe `{recipe_id(preset)}` — {source_of(preset)}", ""]
        counts = {s: sum(r.status == s for r in rows) for s in (SAME, DELIBERATE, DIFFERS, KITH_ONLY)}
        lines += [", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
        lines += ["| key | kith | reference | status | reason |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| `{r.key}` | {_cell(r.kith)} | {_cell(r.reference)} | {r.status} | "
                         f"{_cell(r.reason) if r.reason else ''} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kith.tools.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when {DOC_PATH} is stale or a preset drifted")
    args = parser.parse_args(argv)
    text = render_markdown()
    bad = undocumented_differences()
    for preset, keys in bad.items():
        print(f"{preset}: differs from its recipe without a recorded reason: {', '.join(keys)}",
              file=sys.stderr)
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run python -m kith.tools.recipes --write", file=sys.stderr)
            return 1
    else:
        print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
