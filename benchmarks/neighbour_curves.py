"""How often the neighbours NNCLR, All4One and MSF look up share the anchor's class, over training: the
curves the CPU protocol's runs log (`curves` in `benchmarks/results/cpu_cifar.json`), drawn as one
figure for the results page.

NNCLR's and All4One's `nn_acc`: the nearest queue neighbour has the anchor's class. MSF's `purity`: the
share of its k target neighbours (its own target included) that do. Each logged row is one batch of
128, so a curve is smoothed by a running mean over `SMOOTH` rows, then averaged over seeds; the band is
the seeds' range.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.claims import seeds

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "neighbour_curves.png"
SMOOTH = 5


def _runs_with_curves(doc: dict) -> dict[str, list[dict]]:
    """The methods' own settings (no studied keys) whose runs logged a neighbour curve, by setting."""
    out: dict[str, list[dict]] = {}
    for run in doc["runs"].values():
        if run.get("curves") and run["setting"] == run["method"]:
            out.setdefault(run["setting"], []).append(run)
    return dict(sorted(out.items()))


def _smooth(values: list[float]) -> list[float]:
    """Running mean over the last `SMOOTH` values (fewer at the start)."""
    windows = (values[max(0, i - SMOOTH + 1): i + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def plot(doc: dict, path: Path = FIGURE) -> bool:
    """Draw the figure to `path`; False (nothing written) when no run logged a curve."""
    by_setting = _runs_with_curves(doc)
    if not by_setting:
        return False
    from kith.tools.plots import plt, save_figure  # Agg, files only

    fig, ax = plt.subplots(figsize=(7, 4))
    for setting, runs in by_setting.items():
        metric = next(iter(runs[0]["curves"]))
        series = [run["curves"][metric] for run in runs]
        length = min(len(s) for s in series)
        steps = [step for step, _ in series[0][:length]]
        smoothed = [_smooth([v for _, v in s[:length]]) for s in series]
        mean = [sum(col) / len(col) for col in zip(*smoothed)]
        ax.plot(steps, [100 * m for m in mean], label=f"{setting} ({metric}, {seeds(len(runs))})")
        ax.fill_between(steps, [100 * min(col) for col in zip(*smoothed)],
                        [100 * max(col) for col in zip(*smoothed)], alpha=0.2)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.set_xlabel("training step (batch 128)")
    ax.set_ylabel("neighbours with the anchor's class (%)")
    ax.set_title("Neighbour label agreement over training, CPU protocol")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def section(doc: dict) -> list[str]:
    """The results page's lines for the figure, with each setting's last smoothed value."""
    by_setting = _runs_with_curves(doc)
    if not by_setting:
        return []
    ends = []
    for setting, runs in by_setting.items():
        metric = next(iter(runs[0]["curves"]))
        last = [_smooth([v for _, v in run["curves"][metric]])[-1] for run in runs]
        ends.append(f"{setting} {100 * sum(last) / len(last):.1f}% ({metric})")
    return ["### Neighbour accuracy and purity over training", "",
            "How often the neighbours each method looks up share the anchor's class, logged every 10 steps "
            f"by the protocol's runs (running mean over {SMOOTH} rows, mean over seeds, band: the seeds' "
            "range; chance is 10%). At the end of training: " + ", ".join(ends) + ".", "",
            f"![Neighbour label agreement over training]({FIGURE.name})", ""]
