"""One table comparing run folders: run, method, data, backbone, epochs, kNN, linear top-1, time, speed.

Numbers come from each run's `summary.json` and `metrics.jsonl`: kNN and linear accuracy
from the latest `eval` row (written by `kith eval`) when it has them, else from the
`final` row / summary (kNN only). `kith compare RUN_DIR... [--csv FILE] [--markdown FILE]`.

The `published` column holds the number a preset's `reference` block (config.yaml) publishes
for the same metric when the run matches it: same data, backbone, epochs and batch size, and
the preset's recipe unchanged. Otherwise a note under the table says what differs. The metric is
the protocol: a published online linear accuracy (solo-learn's tables: `online_linear_top1`, a
classifier trained during pretraining, `train.online_linear=true`) is shown only beside a run that
measured one, never beside an offline linear probe (`linear_top1`, `kith eval --linear`) or a kNN.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kith.config import build_config
from kith.runs.files import read_jsonl
from kith.tools import recipes
from kith.utils.errors import UserError
from kith.utils.files import atomic_write_text

# (header, key of the row dict) in table order
COLUMNS: list[tuple[str, str]] = [
    ("run", "name"),
    ("method", "method"),
    ("data", "data"),
    ("backbone", "backbone"),
    ("epochs", "epochs"),
    ("kNN@20", "knn@20"),
    ("kNN@200", "knn@200"),
    ("linear top-1", "linear_top1"),
    ("online linear", "online_linear_top1"),
    ("published", "published"),
    ("wall time", "wall_time_s"),
    ("images/s", "images_per_s"),
]


_TEXT_KEYS = {"name", "method", "data", "backbone", "run"}


def _float_keys(row: dict, prefix: str) -> dict[int, float]:
    """{k: value} of the `<prefix>@<k>` keys of a metrics row."""
    out = {}
    for key, value in row.items():
        if key.startswith(prefix + "@") and isinstance(value, (int, float)):
            try:
                out[int(key.split("@", 1)[1])] = float(value)
            except ValueError:
                pass
    return out


def run_row(run_dir: str | Path) -> dict:
    """The comparison row of one run folder (missing values are None).

    Keys: run (path), name (folder name), method, data, backbone, epochs, knn@<k> for every k found,
    knn@20, knn@200, linear_top1, linear_top5, random_init_knn@<k>, wall_time_s, images_per_s, knn_source
    (`eval` or `final`).
    """
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or not (summary_path.is_file() or metrics_path.is_file()):
        raise UserError(f"'{run_dir}' is not a kith run folder (no summary.json or metrics.jsonl)")
    summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"'{summary_path}' is not valid JSON") from None
    rows = read_jsonl(metrics_path)
    start = next((r for r in rows if r.get("kind") == "start"), {})
    finals = [r for r in rows if r.get("kind") == "final"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]

    knn = {int(k): float(v) for k, v in (summary.get("knn") or {}).items()}
    random_knn = {int(k): float(v) for k, v in (summary.get("knn_random_init") or {}).items()}
    source = "final" if knn else None
    if finals:
        knn = knn or _float_keys(finals[-1], "knn_top1")
        random_knn = random_knn or _float_keys(finals[-1], "random_init_knn_top1")
        source = "final"
    linear_top1 = linear_top5 = None
    eval_knn = [r for r in evals if _float_keys(r, "knn_top1")]
    if eval_knn:
        knn = {**knn, **_float_keys(eval_knn[-1], "knn_top1")}
        source = "eval"
    eval_linear = [r for r in evals if r.get("linear_top1") is not None]
    if eval_linear:
        linear_top1, linear_top5 = eval_linear[-1]["linear_top1"], eval_linear[-1].get("linear_top5")

    epochs = summary.get("epochs")
    if epochs is None and trains:
        epochs = trains[-1].get("epoch")
    row = {
        "run": str(run_dir),
        "name": run_dir.resolve().name,
        "method": summary.get("method", start.get("method")),
        "data": summary.get("data", start.get("data")),
        "backbone": summary.get("backbone"),
        "epochs": epochs,
        "num_train": summary.get("num_train", start.get("num_train")),
        "num_test": summary.get("num_test", start.get("num_test")),
        "linear_top1": linear_top1,
        "linear_top5": linear_top5,
        "online_linear_top1": _online_linear(summary, rows),
        "wall_time_s": summary.get("wall_time_s"),
        "images_per_s": summary.get("images_per_s"),
        "knn_source": source,
    }
    for k, v in sorted(knn.items()):
        row[f"knn@{k}"] = v
    for k, v in sorted(random_knn.items()):
        row[f"random_init_knn@{k}"] = v
    row.setdefault("knn@20", None)
    row.setdefault("knn@200", None)
    published = published_for(row, _run_config(run_dir))
    row["published"], row["published_metric"], row["published_note"] = published
    return row


def _online_linear(summary: dict, rows: list[dict]) -> float | None:
    """train.online_linear's last test accuracy: summary.json, else the last `online_linear` row."""
    if summary.get("online_linear_top1") is not None:
        return float(summary["online_linear_top1"])
    logged = [r["online_linear_top1"] for r in rows if r.get("kind") == "online_linear"]
    return float(logged[-1]) if logged else None


# how each reference metric is measured, for the note when a run lacks it
PROTOCOLS = {"online_linear_top1": "an online linear classifier (train with train.online_linear=true)",
             "linear_top1": "an offline linear probe (kith eval --linear)"}


# budget keys of a reference and where a run's config keeps them
_BUDGET = {"data": "data.name", "backbone": "backbone.name", "epochs": "train.epochs",
           "batch_size": "train.batch_size"}


def _recipe_changes(cfg: Any) -> list[str]:
    """`key=value` for every recipe key (kith/presets/_recipes.yaml) the run changed from its preset."""
    preset = cfg.get("preset")
    if not preset or preset not in recipes.recipe_presets():
        return []
    try:
        base = build_config([f"preset={preset}"])
        if base.method.name != cfg.method.name:  # another method on the preset's data: not its recipe
            return [f"method.name={cfg.method.name}"]
        keys = [k for k in recipes.reference_keys(preset)
                if not k.startswith("head.") and k not in _BUDGET.values()]
        return [f"{k}={recipes.kith_value(cfg, k, {})}" for k in keys
                if not recipes.same_value(recipes.kith_value(cfg, k, {}), recipes.kith_value(base, k, {}))]
    except (UserError, OmegaConfBaseException, KeyError):  # a config from an older kith: skip the check
        return []


def published_for(row: dict, cfg: Any) -> tuple[float | None, str | None, str]:
    """(published value, its metric, note) for a run: the value when one of its references matches
    the run's metric, recipe and budget; else None and what differs from the closest reference."""
    refs = list(cfg.get("reference") or []) if cfg is not None else []
    if not refs:
        return None, None, ""
    changes = _recipe_changes(cfg)
    if cfg.data.get("train_subset") is not None:
        changes.append(f"data.train_subset={cfg.data.train_subset}")
    best = None
    for ref in refs:
        theirs, ours = [], []
        for key, path in _BUDGET.items():
            want = ref.get(key)
            have = row.get("epochs") if key == "epochs" else OmegaConf.select(cfg, path, default=None)
            if want is not None and have != want:
                theirs.append(f"{key}={want}")
                ours.append(f"{key}={have}")
        if row.get(ref.metric) is None:  # another protocol: never compared
            how = PROTOCOLS.get(ref.metric, "kNN" if ref.metric.startswith("knn") else ref.metric)
            ours.append(f"no {ref.metric}, measured by {how}")
        ours += changes
        if not ours:
            return float(ref.value), str(ref.metric), ""
        if best is None or len(ours) < len(best[2]):
            best = (ref, theirs, ours)
    ref, theirs, ours = best
    at = f" at {', '.join(theirs)}" if theirs else ""
    return None, None, (f"published {ref.value:.2f} {ref.metric} ({ref.source}){at}; "
                        f"this run: {', '.join(ours)}")


def _run_config(run_dir: Path) -> Any:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):  # unreadable: no published column, no crash
        return None


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_value(key: str, value) -> str:
    """A cell of the Markdown table: accuracies with 2 decimals, durations readable, '–' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "images_per_s":
        return f"{value:.0f}"
    if key.endswith("_s") and isinstance(value, (int, float)):
        return format_duration(float(value))
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(rows: Sequence[dict], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A GitHub Markdown table of `rows` (dicts) with the given (header, key) columns."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" if key in _TEXT_KEYS else "---:" for _, key in columns) + "|"]
    for row in rows:
        cells = [format_value(key, row.get(key)) for _, key in columns]
        if row.get("published_metric"):  # which metric the published number is (linear top-1, kNN@200)
            cells = [f"{c} ({row['published_metric']})" if key == "published" else c
                     for c, (_, key) in zip(cells, columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """CSV with the raw (unformatted) values; missing values are empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for _, key in columns])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for _, key in columns])
    return buf.getvalue()


def compare(run_dirs: Sequence[str | Path], csv_path: str | Path | None = None,
            markdown_path: str | Path | None = None) -> str:
    """The Markdown table of `run_dirs` (also written to the given files); returns the Markdown."""
    if not run_dirs:
        raise UserError("kith compare needs at least one run folder")
    rows = [run_row(d) for d in run_dirs]
    columns = COLUMNS
    if not any(row.get("published") is not None or row.get("published_note") for row in rows):
        columns = [c for c in COLUMNS if c[1] != "published"]  # no run carries a published reference
    if all(row.get("online_linear_top1") is None for row in rows):
        columns = [c for c in columns if c[1] != "online_linear_top1"]  # no run trained one
    table = to_markdown(rows, columns)
    notes = [f"- {row['name']}: {row['published_note']}" for row in rows if row.get("published_note")]
    if notes:
        table += "\n" + "\n".join(notes) + "\n"
    if markdown_path:
        atomic_write_text(markdown_path, table)
    if csv_path:
        atomic_write_text(csv_path, to_csv(rows, columns))
    return table
