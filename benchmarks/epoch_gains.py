"""Does each method's gap to its random-init network close with more steps? The CPU protocol's runs of
each method at its protocol epochs and at the longer epoch tries (`<method> (N epochs)` settings, which
change `train.epochs` only), as a table and one figure for the results page: kNN@200 gain over the same
seeds' random-init networks against epochs, mean ± std over seeds, with the protocol's 5-point bar.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.claims import seeds

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "epoch_gains.png"
BAR = 5.0  # kNN@200 points over random init, mean over seeds: the protocol's bar


def epochs_only(row: dict) -> bool:
    """A summary row of a setting that differs from its method in `train.epochs` alone."""
    return bool(re.fullmatch(re.escape(row["method"]) + r" \(\d+ epochs\)", row["setting"]))


def by_method(doc: dict) -> dict[str, list[dict]]:
    """Per method, its own row and those that differ from it in `train.epochs` alone, by epochs."""
    out: dict[str, list[dict]] = {}
    for row in doc["summary"].values():
        if row.get("gain_knn@200") and (row["setting"] == row["method"] or epochs_only(row)):
            out.setdefault(row["method"], []).append(row)
    return {m: sorted(rows, key=lambda r: r["epochs"]) for m, rows in sorted(out.items()) if len(rows) > 1}


def first_clearing(rows: list[dict]) -> dict | None:
    """The fewest epochs at which the mean gain reaches the bar, or None."""
    return next((r for r in rows if r["gain_knn@200"]["mean"] >= BAR), None)


def plot(doc: dict, path: Path = FIGURE) -> bool:
    """Draw the figure to `path`; False (nothing written) when no method has an epoch try."""
    methods = by_method(doc)
    if not methods:
        return False
    from kith.tools.plots import plt, save_figure  # Agg, files only

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, rows in methods.items():
        gains = [r["gain_knn@200"] for r in rows]
        ax.errorbar([r["epochs"] for r in rows], [g["mean"] for g in gains], yerr=[g["std"] for g in gains],
                    marker="o", capsize=3, label=method)
    ax.axhline(BAR, color="grey", linestyle=":", linewidth=1, label=f"the bar (+{BAR:g})")
    ax.set_xlabel("epochs (50,000 images, batch 128: 390 steps an epoch)")
    ax.set_ylabel("kNN@200 gain over random init (points)")
    ax.set_title("More epochs, CPU protocol (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    gain, n = row["gain_knn@200"], len(row["seeds"])
    return (f"{gain['mean']:+.2f} ± {gain['std']:.2f} ({seeds(n)}, "
            f"{row['wall_time_s']['mean'] / 60:.1f} min)")


def section(doc: dict) -> list[str]:
    """The results page's lines: a table of gains by epochs (with training minutes a run) and the figure."""
    methods = by_method(doc)
    if not methods:
        return []
    epochs = sorted({r["epochs"] for rows in methods.values() for r in rows})
    lines = ["### More epochs: the gap to random init against training length", "",
             "The same runs with `train.epochs` raised and nothing else changed (the warm-up stays "
             "0.2 epochs): kNN@200 gain over the same seeds' random-init networks, mean ± std over "
             "seeds, and the mean training minutes of a run on the protocol machine. The bar is +5.", "",
             "| method | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
             "|---|" + "---:|" * len(epochs)]
    for method, rows in methods.items():
        at = {r["epochs"]: r for r in rows}
        lines.append(f"| {method} | " + " | ".join(_cell(at.get(e)) for e in epochs) + " |")
    return lines + ["", "![kNN@200 gain over random init against epochs](epoch_gains.png)", ""]
