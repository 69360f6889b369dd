"""Robustness sweeps the All4One paper reports, as separate resumable runs under one folder.

- `dim`: the projector output dimension (`method.proj_output_dim`) over
  {32, 64, 128, 256, 512, 1024, 2048} (or `values`) for each method.
- `weak-aug`: the weak recipe (crop + flip only: every view of the method set to `weak`)
  against the method's default (strong) views.

Every setting is its own run folder `OUT/<method>-<setting>`. A run whose summary.json
has a final kNN is skipped, one with a checkpoint but no final kNN is resumed, the rest
are trained, so an interrupted sweep continues where it stopped. A run folder is reused
only when its saved config equals the requested one (up to `NO_EFFECT_KEYS`); otherwise
the study stops, or with `rerun` trains that setting again from scratch. Extra `key=value`
overrides apply to every run; `{method}` in them is replaced by the method's name (e.g.
`preset=cifar10/{method}`). Results: `OUT/study.json`, `OUT/study.md`, `OUT/study.png`.
"""

from __future__ import annotations

import json
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


def _config_keys(method: str) -> set[str]:

    return {f.name for f in fields(get_method_class(method).Config)}


def plan(kind: str, methods: Sequence[str], values: Sequence[int] | None = None,
         overrides: Sequence[str] = ()) -> list[dict]:
    """The runs of a study: `[{"method", "setting", "value", "name", "overrides"}, ...]` in run order."""
    if kind not in KINDS:
        raise UserError(f"unknown study kind '{kind}'; one of {', '.join(KINDS)}")
    if not methods:
        raise UserError("a study needs at least one method (--methods simclr,byol)")
    runs = []
    for method in methods:
        base = [o.replace("{method}", method) for o in overrides] + [f"method.name={method}"]
        if kind == "dim":
            if "proj_output_dim" not in _config_keys(method):
                raise UserError(f"method '{method}' has no method.proj_output_dim, so the dim study does not "
                                "apply to it")
            for v in values or DEFAULT_DIMS:
                runs.append({"method": method, "setting": f"dim{int(v)}", "value": int(v),
                             "name": f"{method}-dim{int(v)}",
                             "overrides": base + [f"method.proj_output_dim={int(v)}"]})
        else:
            views = list(build_config(base).method.views)
            runs.append({"method": method, "setting": "strong", "value": "strong", "name": f"{method}-strong",
                         "overrides": base})
            weak = "[" + ",".join(["weak"] * len(views)) + "]"
            runs.append({"method": method, "setting": "weak", "value": "weak", "name": f"{method}-weak",
                         "overrides": base + [f"method.views={weak}"]})
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
    return {**{k: run[k] for k in ("method", "setting", "value", "name", "overrides")},
            "run_dir": str(run_dir), "status": status,
            "knn": {str(k): v for k, v in (summary.get("knn") or {}).items()},
            "knn_random_init": {str(k): v for k, v in (summary.get("knn_random_init") or {}).items()},
            "epochs": summary.get("epochs"), "wall_time_s": summary.get("wall_time_s"),
            "images_per_s": summary.get("images_per_s")}


def primary_k(results: Sequence[dict]) -> str | None:
    """The kNN k the table reports: 200 when every run has it, else the largest k all runs share."""
    common = None
    for r in results:
        ks = set(r["knn"])
        common = ks if common is None else common & ks
    if not common:
        return None
    return "200" if "200" in common else max(common, key=int)


def to_markdown(study: dict) -> str:
    results, kind = study["runs"], study["kind"]
    k = primary_k(results)
    label = f"kNN@{k} top-1" if k else "kNN top-1"
    methods = list(dict.fromkeys(r["method"] for r in results))
    settings = list(dict.fromkeys(r["setting"] for r in results))
    cell = {(r["method"], r["setting"]): r["knn"].get(k) if k else None for r in results}
    head = "projector output dim" if kind == "dim" else "augmentation"
    lines = [f"{label} (%) by {head}; runs under `{study['out']}`.", "",
             "| method | " + " | ".join(s.removeprefix("dim") for s in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for m in methods:
        vals = [cell.get((m, s)) for s in settings]
        lines.append(f"| {m} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
    if study.get("overrides"):
        lines += ["", "overrides: `" + " ".join(study["overrides"]) + "`"]
    return "\n".join(lines) + "\n"


def plot_study(study: dict, path: str | Path) -> Path:
    """kNN against projector dim (log2 axis, one line per method), or weak-vs-strong bars per method."""
    results = study["runs"]
    k = primary_k(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=DPI)
    methods = list(dict.fromkeys(r["method"] for r in results))
    if study["kind"] == "dim":
        for i, m in enumerate(methods):
            pts = sorted((r["value"], r["knn"][k]) for r in results if r["method"] == m and k in r["knn"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=m)
        ax.set_xscale("log", base=2)
        dims = sorted({r["value"] for r in results})
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("projector output dimension (method.proj_output_dim)")
    else:
        width = 0.38
        for j, setting in enumerate(("strong", "weak")):
            vals = [next((r["knn"].get(k, 0.0) for r in results
                          if r["method"] == m and r["setting"] == setting), 0.0) if k else 0.0
                    for m in methods]
            xs = [i + (j - 0.5) * width for i in range(len(methods))]
            colour = "C0" if setting == "strong" else "C1"
            bars = ax.bar(xs, vals, width, label=f"{setting} views", color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylim(0, max([100.0] + [v for r in results for v in r["knn"].values()]) * 1.15)
    ax.set_ylabel(f"kNN@{k} top-1 (%)" if k else "kNN top-1 (%)")
    title = "projector dimension study" if study["kind"] == "dim" else "weak (crop+flip) vs strong views"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=8, frameon=False, ncol=2 if study["kind"] != "dim" else 1,
              loc="upper right" if study["kind"] != "dim" else "best")
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(study: dict, out: Path) -> None:
    atomic_write_text(out / "study.json", json.dumps(study, indent=2))
    atomic_write_text(out / "study.md", to_markdown(study))
    if any(r["knn"] for r in study["runs"]):
        plot_study(study, out / "study.png")


def run_study(kind: str, methods: Sequence[str], out: str | Path, values: Sequence[int] | None = None,
              overrides: Sequence[str] = (), log=print, rerun: bool = False) -> dict:
    """Run (or continue) a study; writes study.json/.md/.png under `out` after every run and returns
    the study. `rerun`: train again the runs whose saved config differs from the requested one (else
    a UserError).
    """
    out = Path(out)
    runs = plan(kind, methods, values, overrides)
    for run in runs:  # fail on a bad override or a changed run before any training, not at the fifth run
        _settings_changed(out / run["name"], build_config(run["overrides"]), rerun)
    out.mkdir(parents=True, exist_ok=True)
    study = {"kind": kind, "methods": list(methods), "values": list(dict.fromkeys(r["value"] for r in runs)),
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
