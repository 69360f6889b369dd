"""Loss fingerprint: every registered method trained a few steps through the real loop on fixed seeds.

Records each logged training loss, the final kNN numbers and a checksum of the trained method's
state_dict, so a refactor that must not change behaviour can be checked number for number:

    python -m benchmarks.loss_fingerprint benchmarks/results/loss_fingerprint_before.json
    ... refactor ...
    python -m benchmarks.loss_fingerprint benchmarks/results/loss_fingerprint_after.json \
        --compare benchmarks/results/loss_fingerprint_before.json

Tiny setup (64 digits images at 16x16, tiny convnet of width 8, batch 32, 2 epochs = 4 steps,
fp32 on the CPU, one thread) so it takes seconds per method. Run from the repository root (`-m`) \
so the local kith is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import kith

TINY = {
    "data.name": "digits", "data.size": 16, "data.train_subset": 64, "data.test_subset": 40,
    "backbone.name": "tiny", "backbone.width": 8, "train.batch_size": 32, "train.epochs": 2,
    "train.warmup_epochs": 0, "train.optimizer": "sgd", "train.lr": 0.1, "train.progress": "false",
    "train.knn_every": 1, "train.log_every": 1, "train.checkpoint_every": 1, "train.device": "cpu",
    "train.precision": "fp32", "eval.knn_k": "[5]", "eval.monitor_k": 5,
}
# keep the heads and memories small; keys a method does not have are left out below
SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32, "queue_size": 256,
         "bank_size": 256, "num_prototypes": "[4,8]", "proto_warmup_epochs": 1}


def fingerprint(method: str, out: Path, precision: str = "fp32") -> dict:
    cls = kith.METHODS[method]
    fields = set(cls.Config.__dataclass_fields__)
    overrides = {**TINY, "method.name": method, "train.precision": precision}
    overrides.update({f"method.{k}": v for k, v in SMALL.items() if k in fields})
    torch.manual_seed(0)
    result = kith.pretrain(run_dir=out / method, **overrides)
    rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in rows if r.get("kind") == "train"]
    state = result.method.state_dict()
    checksum = sum(float(v.double().sum()) for v in state.values() if v.is_floating_point())
    abs_checksum = sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())
    return {"losses": losses, "knn": {str(k): v for k, v in result.knn.items()},
            "knn_random_init": {str(k): v for k, v in result.knn_random_init.items()},
            "state_sum": checksum, "state_abs_sum": abs_checksum}


def compare(got: dict, ref: dict) -> float:
    """Largest absolute difference over every recorded number (inf when the structure differs)."""
    worst = 0.0
    for method, r in ref.items():
        g = got.get(method)
        if g is None or len(g["losses"]) != len(r["losses"]):
            return float("inf")
        pairs = list(zip(g["losses"], r["losses"])) + [(g[k], r[k]) for k in ("state_sum", "state_abs_sum")]
        pairs += [(g[s][k], r[s][k]) for s in ("knn", "knn_random_init") for k in r[s]]
        for a, b in pairs:
            diff = abs(a - b)
            worst = max(worst, diff)
            if diff:
                print(f"{method}: {a!r} vs {b!r} (diff {diff:.3g})")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--compare", type=Path, help="a previous output to compare with")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="train.precision (bf16: CPU autocast; the reference numbers are fp32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: fingerprint(m, Path(tmp), args.precision) for m in sorted(kith.METHODS)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    if args.compare:
        worst = compare(results, json.loads(args.compare.read_text()))
        print(f"largest difference vs {args.compare}: {worst:.3g}")
        sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()
