"""The seed papers' claims, checked in miniature under the CPU protocol: one verdict per claim from the runs.

Each claim compares settings of `benchmarks/cpu_cifar.py` (`SETTINGS`) paired by seed, on kNN@200
top-1 unless it says otherwise: a comparison is one number per seed that is positive when the claim
holds (e.g. kNN@200 of `msf` minus that of `msf (k=1)`). Over the n seeds both settings have, its
mean and a 95% t interval (mean ± t(0.975, n-1) · std / sqrt(n)) give the verdict:

- reproduced: every comparison's interval lies above the claimed margin (0 unless the paper names one);
- reproduced in direction: every interval lies above 0, but not all above the margin;
- not reproduced: some comparison's interval lies below 0 (the opposite holds);
- inconclusive: otherwise (an interval straddles 0), or fewer than 2 seeds measured;
- not measured yet: a comparison has no seed with both settings.

`verdicts(runs)` computes them from the results file's runs; `cpu_cifar.py` stores them beside the
summary and `results_page.py` renders them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable


def seeds(n: int) -> str:
    """How many seeds, in words: "1 seed", "3 seeds"."""
    return f"{n} seed{'' if n == 1 else 's'}"

# t(0.975, n - 1) for n seeds: a 95% interval with 3 seeds is 4.3 standard errors wide each side
_T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


@dataclass(frozen=True)
class Comparison:
    label: str  # what the number is, in the page's words
    settings: tuple[str, ...]  # the settings it reads
    value: Callable[[dict[str, dict]], float]  # one seed's runs by setting -> positive when it holds
    metric: str = "knn@200"  # the run entry's key it reads


def better(winner: str, loser: str) -> Comparison:
    """kNN@200 of `winner` minus that of `loser`."""
    return Comparison(f"`{winner}` − `{loser}`", (winner, loser),
                      lambda v: v[winner]["knn@200"] - v[loser]["knn@200"])


def lower(metric: str, low: str, high: str, what: str) -> Comparison:
    """`metric` of `high` minus that of `low` (positive when `low` has less of it)."""
    return Comparison(f"{what}: `{high}` − `{low}`", (low, high), lambda v: v[high][metric] - v[low][metric],
                      metric)


def less_sensitive(robust: tuple[str, str], sensitive: tuple[str, str]) -> Comparison:
    """How much more kNN@200 moves between the two `sensitive` settings than between the two `robust`
    ones: abs(Δ sensitive) − abs(Δ robust) (positive when `robust` is the steadier pair)."""
    (a, b), (c, d) = robust, sensitive
    def moves(v: dict, x: str, y: str) -> float:
        return abs(v[x]["knn@200"] - v[y]["knn@200"])
    return Comparison(f"abs(`{c}` − `{d}`) − abs(`{a}` − `{b}`)", (a, b, c, d),
                      lambda v: moves(v, c, d) - moves(v, a, b))


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    comparisons: tuple[Comparison, ...]
    margin: float = 0.0  # kNN@200 points the paper claims (0: only the direction)


def _all4one_beats(suffix: str) -> tuple[Comparison, ...]:
    return tuple(better(f"all4one{suffix}", f"{other}{suffix}") for other in ("nnclr", "barlow_twins"))


CLAIMS: tuple[Claim, ...] = (
    Claim("All4One", "at a low projector dimension (32) All4One beats NNCLR and Barlow Twins by more than "
          "5 points", _all4one_beats(" (dim 32)"), margin=5.0),
    Claim("All4One", "under weak views (crop and flip only) All4One beats NNCLR and Barlow Twins by more "
          "than 5 points", _all4one_beats(" (weak aug)"), margin=5.0),
    Claim("All4One", "at the default setting All4One beats NNCLR and Barlow Twins", _all4one_beats("")),
    Claim("MSF", "k=5 neighbours beat k=1 (BYOL's target)", (better("msf", "msf (k=1)"),)),
    Claim("MSF", "a weak target view with a strong query view beats strong/strong",
          (better("msf", "msf (strong target)"),)),
    Claim("ReSSL (TPAMI)", "a weak teacher view beats a strong one",
          (better("ressl", "ressl (strong teacher)"),)),
    Claim("ReSSL (TPAMI)", "the predictor and the InfoNCE warm-up make ReSSL less sensitive to the teacher "
          "temperature (t_teacher 0.04 vs 0.07)",
          (less_sensitive(("ressl", "ressl (t_teacher 0.07)"),
                          ("ressl (plain)", "ressl (plain; t_teacher 0.07)")),)),
    Claim("SPCL", "the prototype terms beat the instance term alone",
          (better("spcl", "spcl (instance term only)"),)),
    Claim("SPCL", "SPCL's prototype negatives share the anchor's class less often than SimCLR's in-batch "
          "negatives at batch 256 (the share of the loss's repulsion on same-class negatives, %)",
          (lower("false_negative_weighted", "spcl", "simclr (batch 256)",
                 "same-class share of the repulsion"),)),
)


def interval(values: list[float]) -> dict:
    """Mean, sample std and the 95% t interval of the mean (None bounds below 2 values)."""
    n = len(values)
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if n > 1 else 0.0
    half = _T975.get(n, 1.96) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "n": n,
            "low": None if half is None else mean - half, "high": None if half is None else mean + half}


def _verdict(intervals: list[dict], margin: float) -> str:
    if any(i["n"] == 0 for i in intervals):
        return "not measured yet"
    if any(i["n"] < 2 for i in intervals):
        return "inconclusive"
    if any(i["high"] < 0 for i in intervals):
        return "not reproduced"
    if all(i["low"] > margin for i in intervals):
        return "reproduced"
    if all(i["low"] > 0 for i in intervals):
        return "reproduced in direction"
    return "inconclusive"


def verdicts(runs: dict) -> list[dict]:
    """Every claim with its comparisons' per-seed numbers, intervals and verdict, from the results file's
    runs (`{"<setting>/seed<s>": {"setting", "seed", "knn@200", ...}}`)."""
    by_seed: dict[int, dict[str, dict]] = {}
    for run in runs.values():
        by_seed.setdefault(run["seed"], {})[run["setting"]] = run
    out = []
    for claim in CLAIMS:
        rows = []
        for comparison in claim.comparisons:
            seeds = sorted(s for s, v in by_seed.items()
                           if all(comparison.metric in v.get(name, {}) for name in comparison.settings))
            per_seed = {s: comparison.value(by_seed[s]) for s in seeds}
            rows.append({"label": comparison.label, "settings": list(comparison.settings),
                         "per_seed": {str(s): round(v, 4) for s, v in per_seed.items()},
                         **interval(list(per_seed.values()))})
        out.append({"paper": claim.paper, "claim": claim.claim, "margin": claim.margin,
                    "comparisons": rows, "verdict": _verdict(rows, claim.margin)})
    return out
