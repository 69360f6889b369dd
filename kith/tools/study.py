"""A sweep of any config key over any seeds, each (setting, seed) a resumable run; mean ± std per setting.

`run_study(out, key="method.k", values=["1", "5"], seeds=[0, 1, 2], methods=["msf"])` trains one
run per (method, value, seed) under `OUT/<method>-<setting>[-s<seed>]`. Two presets of it are the
robustness sweeps the All4One paper reports (`kind=`):

- `dim`: the projector output dimension (`method.proj_output_dim`) over
  {32, 64, 128, 256, 512, 1024, 2048} (or `values`).
- `weak-aug`: the weak recipe (crop + flip only: every view of the method set to `weak`)
  against the method's default (strong) views.

A run whose summary.json has a final kNN is skipped, one with a checkpoint but no final kNN is
resumed, the rest are trained, so an interrupted sweep continues where it stopped. A run folder
is reused only when its saved config equals the requested one (up to `NO_EFFECT_KEYS`);
otherwise the study stops, or with `rerun` trains that setting again from scratch. Extra
`key=value` overrides apply to every run; `{method}` in them is replaced by the method's name
(e.g. `preset=cifar10/{method}`). Without `seeds` each run keeps the config's seed and its folder
has no `-s<seed>` suffix (the folders of studies made before seeds existed stay valid).

Results, rewritten after every run: `OUT/study.json` (every run, and per (method, setting) the
mean, sample standard deviation and count over seeds of kNN@k, online linear top-1 and the
random-init kNN), `OUT/study.md` (mean ± std table), `OUT/study.png` (error bars).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig

from kith.config import build_config, key_policy, keys_at_least
from kith.methods import get_method_class
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.files import atomic_write_text
from kith.runs.folder import load_run_config
from kith.runs.resume import config_changes
from kith.tools.plots import DPI, plt, save_figure
from kith.train.loop import run_training
from kith.utils.errors import UserError
from kith.utils.keys import NO_EFFECT

KINDS = ("dim", "weak-aug")
DEFAULT_DIMS = (32, 64, 128, 256, 512, 1024, 2048)
DIM_KEY, VIEWS_KEY = "method.proj_output_dim", "method.views"


def _config_keys(method: str) -> set[str]:
    return {f.name for f in fields(get_method_class(method).Config)}


def split_values(text: str) -> list[str]:
    """`"1,5"` -> `["1", "5"]`; commas inside brackets stay (`"[weak,weak],[strong,weak]"` is two values)."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
        else:
            cur += ch
    values.append(cur.strip())
    if any(not v for v in values):
        raise UserError(f"--values has an empty entry in '{text}'; give comma-separated values like 1,5")
    return values


def _label(key: str, value: str) -> str:
    """The setting's part of a folder name: `method.k`, `5` -> `k5` (characters other than letters,
    digits, `.`, `-` become `_`)."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", f"{key.rsplit('.', 1)[-1]}{value}").strip("_")


def _settings(kind: str | None, key: str | None, values: Sequence | None, method: str,
              base: list[str]) -> list[tuple[str, object, list[str]]]:
    """`[(setting label, value, its overrides), ...]` of one method: a preset kind or a key sweep."""
    if kind == "dim":
        if "proj_output_dim" not in _config_keys(method):
            raise UserError(f"method '{method}' has no {DIM_KEY}, so the dim study does not apply to it")
        return [(f"dim{int(v)}", int(v), [f"{DIM_KEY}={int(v)}"]) for v in values or DEFAULT_DIMS]
    if kind == "weak-aug":
        weak = "[" + ",".join(["weak"] * len(build_config(base).method.views)) + "]"
        return [("strong", "strong", []), ("weak", "weak", [f"{VIEWS_KEY}={weak}"])]
    if not values:
        raise UserError(f"--key {key} needs --values (e.g. --values 1,5)")
    return [(_label(key, str(v)), str(v), [f"{key}={v}"]) for v in values]


def plan(kind: str | None, methods: Sequence[str] = (), values: Sequence | None = None,
         overrides: Sequence[str] = (), key: str | None = None,
         seeds: Sequence[int] | None = None) -> list[dict]:
    """The runs of a study in run order: `[{"method", "setting", "value", "seed", "name", "overrides"}]`.

    Either `kind` (a preset: `dim`, `weak-aug`) or `key` (any dotted config key, swept over `values`).
    Without `methods`, the method is the one the overrides name (or the default). `seeds`: one run per
    seed of every setting (`seed=N` appended); None keeps the config's seed.
    """
    if (kind is None) == (key is None):
        raise UserError("a study sweeps either a preset (--kind dim|weak-aug) or a key (--key method.k "
                        "--values 1,5), not both or neither")
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown study kind '{kind}'; one of {', '.join(KINDS)}")
    if key in ("seed", "method.name"):
        raise UserError(f"--key {key} is not swept as a key; use --seeds 0,1,2 or --methods a,b instead")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice ({','.join(map(str, seeds))}); give each seed once")
    runs = []
    for method in methods or [None]:
        base = [o.replace("{method}", method or "") for o in overrides]
        if method is not None:
            base.append(f"method.name={method}")
        else:
            method = build_config(base).method.name
        for setting, value, extra in _settings(kind, key, values, method, base):
            for seed in seeds if seeds is not None else [None]:
                tail = [] if seed is None else [f"seed={int(seed)}"]
                runs.append({"method": method, "setting": setting, "value": value, "seed": seed,
                             "name": f"{method}-{setting}" + ("" if seed is None else f"-s{int(seed)}"),
                             "overrides": base + extra + tail})
    return runs


def _final_summary(run_dir: Path) -> dict | None:
    """summary.json when it holds a final kNN (the run is complete), else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("knn") else None


# keys that change how a run is carried out, not what it computes (declared NO_EFFECT on their config
# fields): a run made under other values is reused
NO_EFFECT_KEYS = keys_at_least(NO_EFFECT)


def _settings_changed(run_dir: Path, requested: DictConfig, rerun: bool) -> list[str]:
    """The keys whose value in the run folder's saved config differs from `requested` ([] without one);
    a UserError when there are any and not `rerun`."""
    if not (run_dir / "config.yaml").is_file():
        return []
    changed = config_changes(load_run_config(run_dir), requested)
    changed = [f"{k} {v['from']} -> {v['to']}" for k, v in changed.items()
               if key_policy(requested, k) < NO_EFFECT]
    if changed and not rerun:
        raise UserError(f"study run '{run_dir}' was made with other settings ({'; '.join(changed)}); "
                        "train it again with --rerun (rerun=True), or give the study another --out")
    return changed


def run_one(run: dict, out: Path, log=print, rerun: bool = False) -> dict:
    """Train, resume or skip one run of the study; returns its result entry. A run folder made under
    other settings is not reused: a UserError, or with `rerun` it is trained again from scratch."""
    run_dir = out / run["name"]
    requested = build_config(run["overrides"])
    changed = _settings_changed(run_dir, requested, rerun)
    summary = None if changed else _final_summary(run_dir)
    if summary is not None:
        status = "skipped"
        log(f"[study] {run['name']}: done before, skipped")
    elif (run_dir / CHECKPOINT).is_file() and not changed:
        status = "resumed"
        log(f"[study] {run['name']}: resuming from its checkpoint")
        run_training(load_run_config(run_dir), run_dir=run_dir, resume=True)
        summary = _final_summary(run_dir) or {}
    else:
        status = "trained"
        log(f"[study] {run['name']}: training" + (" again (other settings)" if changed else ""))
        run_training(requested, run_dir=run_dir, overwrite=rerun)
        summary = _final_summary(run_dir) or {}
    return {**{k: run[k] for k in ("method", "setting", "value", "seed", "name", "overrides")},
            "run_dir": str(run_dir), "status": status,
            "knn": {str(k): v for k, v in (summary.get("knn") or {}).items()},
            "knn_random_init": {str(k): v for k, v in (summary.get("knn_random_init") or {}).items()},
            "online_linear_top1": summary.get("online_linear_top1"),
            "epochs": summary.get("epochs"), "wall_time_s": summary.get("wall_time_s"),
            "images_per_s": summary.get("images_per_s")}


def primary_k(results: Sequence[dict]) -> str | None:
    """The kNN k the table reports: 200 when every run has it, else the largest k all runs share."""
    common = None
    for r in results:
        if not r["knn"]:
            continue  # an unfinished run does not decide k
        ks = set(r["knn"])
        common = ks if common is None else common & ks
    if not common:
        return None
    return "200" if "200" in common else max(common, key=int)


def mean_std(values: Sequence[float]) -> dict:
    """`{"mean", "std", "n"}`: the sample standard deviation (n - 1), None below two values."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One entry per (method, setting), in run order: mean ± std over its finished seeds of kNN@k
    (k from `primary_k`), online linear top-1 and random-init kNN@k, and the seeds they cover."""
    k = primary_k(results)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    entries = []
    for (method, setting), runs in groups.items():
        done = [r for r in runs if k and k in r["knn"]]
        linear = [r["online_linear_top1"] for r in runs if r.get("online_linear_top1") is not None]
        entries.append({"method": method, "setting": setting, "value": runs[0]["value"], "k": k,
                        "seeds": [r.get("seed") for r in done],
                        "knn": mean_std([r["knn"][k] for r in done]),
                        "knn_random_init": mean_std([r["knn_random_init"][k] for r in done
                                                     if k in r["knn_random_init"]]),
                        "online_linear_top1": mean_std(linear)})
    return entries


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    spread = "" if stat["std"] is None else f" ± {stat['std']:.2f}"
    return f"{stat['mean']:.2f}{spread} (n={stat['n']})"


def to_markdown(study: dict) -> str:
    """Rows: methods; columns: settings; cells: kNN mean ± sample std (n seeds); random init below."""
    entries = study.get("settings") or aggregate(study["runs"])
    k = entries[0]["k"] if entries else None
    label = f"kNN@{k} top-1" if k else "kNN top-1"
    methods = list(dict.fromkeys(e["method"] for e in entries))
    settings = list(dict.fromkeys(e["setting"] for e in entries))
    cell = {(e["method"], e["setting"]): e for e in entries}
    head = {"dim": "projector output dim", "weak-aug": "augmentation"}.get(study["kind"],
                                                                          f"`{study.get('key')}`")
    lines = [f"{label} (%), mean ± sample std over seeds, by {head}; runs under `{study['out']}`.", "",
             "| method | " + " | ".join(s.removeprefix("dim") for s in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cell(cell[(m, s)]["knn"]) if (m, s) in cell else "–"
                                                for s in settings) + " |")
    for m in methods:  # the random-init baseline does not depend on the swept key unless it is a backbone key
        base = [cell[(m, s)]["knn_random_init"] for s in settings if (m, s) in cell]
        if any(b["mean"] is not None for b in base):
            lines.append(f"| {m}, random init | " + " | ".join(_cell(b) for b in base) + " |")
    if any(e["online_linear_top1"]["n"] for e in entries):
        lines += ["", "online linear top-1 (%):", "", "| method | " + " | ".join(settings) + " |",
                  "|---|" + "---:|" * len(settings)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_cell(cell[(m, s)]["online_linear_top1"])
                                                    if (m, s) in cell else "–" for s in settings) + " |")
    if study.get("seeds") is not None:
        lines += ["", "seeds: " + ", ".join(map(str, study["seeds"]))]
    if study.get("overrides"):
        lines += ["", "overrides: `" + " ".join(study["overrides"]) + "`"]
    return "\n".join(lines) + "\n"


def _numeric(values: Sequence) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def plot_study(study: dict, path: str | Path) -> Path:
    """kNN mean with sample-std error bars: against the value (one line per method) when every value
    is a number (log2 axis for the dim preset), else grouped bars per method."""
    entries = [e for e in (study.get("settings") or aggregate(study["runs"])) if e["knn"]["mean"] is not None]
    k = entries[0]["k"] if entries else None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=DPI)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    settings = list(dict.fromkeys(e["setting"] for e in entries))
    xs = _numeric([e["value"] for e in entries])
    if xs is not None:
        for i, m in enumerate(methods):
            pts = sorted((float(e["value"]), e["knn"]["mean"], e["knn"]["std"] or 0.0)
                         for e in entries if e["method"] == m)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, color=f"C{i}", label=m)
        if study["kind"] == "dim":
            ax.set_xscale("log", base=2)
            dims = sorted({int(x) for x in xs})
            ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel(DIM_KEY if study["kind"] == "dim" else str(study.get("key")))
    else:
        width = 0.8 / max(1, len(settings))
        for j, s in enumerate(settings):
            rows = [next((e for e in entries if e["method"] == m and e["setting"] == s), None)
                    for m in methods]
            pos = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(methods))]
            bars = ax.bar(pos, [r["knn"]["mean"] if r else 0.0 for r in rows], width, label=s, color=f"C{j}",
                          yerr=[(r["knn"]["std"] or 0.0) if r else 0.0 for r in rows], capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylim(0, max([100.0] + [e["knn"]["mean"] for e in entries]) * 1.15)
    ax.set_ylabel(f"kNN@{k} top-1 (%), mean ± std" if k else "kNN top-1 (%)")
    title = {"dim": "projector dimension study", "weak-aug": "weak (crop+flip) vs strong views"}
    ax.set_title(title.get(study["kind"], f"sweep of {study.get('key')}"), fontsize=10)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=8, frameon=False, ncol=2 if xs is None else 1)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(study: dict, out: Path) -> None:
    study["settings"] = aggregate(study["runs"])
    atomic_write_text(out / "study.json", json.dumps(study, indent=2))
    atomic_write_text(out / "study.md", to_markdown(study))
    if any(r["knn"] for r in study["runs"]):
        plot_study(study, out / "study.png")


def run_study(kind: str | None, methods: Sequence[str], out: str | Path, values: Sequence | None = None,
              overrides: Sequence[str] = (), log=print, rerun: bool = False, key: str | None = None,
              seeds: Sequence[int] | None = None) -> dict:
    """Run (or continue) a study (see `plan` for `kind`, `key`, `values`, `seeds`); writes
    study.json/.md/.png under `out` after every run and returns the study. `rerun`: train again the
    runs whose saved config differs from the requested one (else a UserError).
    """
    out = Path(out)
    runs = plan(kind, methods, values, overrides, key=key, seeds=seeds)
    for run in runs:  # fail on a bad override or a changed run before any training, not at the fifth run
        _settings_changed(out / run["name"], build_config(run["overrides"]), rerun)
    out.mkdir(parents=True, exist_ok=True)
    study = {"kind": kind or "sweep", "key": DIM_KEY if kind == "dim" else VIEWS_KEY if kind else key,
             "methods": list(dict.fromkeys(r["method"] for r in runs)),
             "values": list(dict.fromkeys(r["value"] for r in runs)),
             "seeds": None if seeds is None else [int(s) for s in seeds],
             "overrides": list(overrides), "out": str(out), "runs": []}
    done: dict[str, dict] = {}
    tic = time.perf_counter()
    for run in runs:
        done[run["name"]] = run_one(run, out, log, rerun)
        study["runs"] = list(done.values())
        write_outputs(study, out)  # partial results survive an interruption
    study["wall_time_s"] = time.perf_counter() - tic
    write_outputs(study, out)
    return study
