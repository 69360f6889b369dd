"""`kith bench` on this machine's CPU: BYOL on CIFAR-10 with the tiny convnet and with ResNet-18.

Each entry is one `kith bench` call (the command line is stored beside its numbers): images/s of
data + augmentation alone, of the synthetic step (forward + backward + LARS + EMA on fixed random
views) and of the full training step, their ratio (pipeline efficiency), FLOPs per image and the
achieved TFLOP/s. The three timings alternate over `--rounds` rounds and the medians are kept, so
the ratios are measured in the same run under the same load.

    python benchmarks/bench_cpu.py [--only tiny|resnet18] [--rounds 3] [--pack FILE]

Data: the CIFAR-10 JPEG pack, unpacked once to benchmarks/.cache/cifar10 (as benchmarks/cpu_cifar.py
does); without the pack the benchmark says so and exits 0. Results: benchmarks/results/bench_cpu.json
(entries merged by name).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import cpu_cifar  # noqa: E402
from kith.config import build_config  # noqa: E402
from kith.tools.bench import bench, summary_line
from kith.utils.files import atomic_write_text

RESULTS = REPO / "benchmarks" / "results" / "bench_cpu.json"

# name -> (overrides after the data path, warmup, steps)
CASES = {
    "tiny": (["backbone.name=tiny", "backbone.width=32", "train.batch_size=256"], 1, 3),
    "resnet18": (["train.batch_size=32"], 1, 2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CASES), help="run one case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pack", type=Path, default=cpu_cifar.PACK,
                        help="the CIFAR-10 JPEG pack (default: ../shared/data/cifar10/cifar10-jpeg.npz)")
    parser.add_argument("--publish", action="store_true",
                        help="write benchmarks/results/bench_cpu.json even when --rounds is not 3; else "
                             "such a run writes benchmarks/results/scratch/bench_cpu.json")
    args = parser.parse_args()
    global RESULTS
    if args.rounds != 3 and not args.publish:  # a quick try never replaces the published rows
        RESULTS = RESULTS.parent / "scratch" / RESULTS.name
        print(f"not the full protocol (--rounds 3): writing {RESULTS} (--publish to replace the published "
              "results)")
    cpu_cifar.PACK, cpu_cifar.PREPARE = args.pack, args.pack.parent / "prepare.py"
    data_dir = cpu_cifar.prepare_data()
    if data_dir is None:
        print(f"CIFAR-10 pack not found ({args.pack}): nothing to measure")
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name, (extra, warmup, steps) in CASES.items():
        if args.only and name != args.only:
            continue
        overrides = ["cifar10/byol", f"data.path={data_dir}", "train.device=cpu", *extra]
        command = (f"kith bench {' '.join(overrides)} --warmup {warmup} --steps {steps} "
                   f"--rounds {args.rounds}")
        print(f"== {name}: {command}", flush=True)
        cfg = build_config(["preset=cifar10/byol", "train.progress=false", *overrides[1:]])
        report = bench(cfg, warmup=warmup, steps=steps, rounds=args.rounds)
        report["command"] = command
        report["note"] = ("shared 2-core machine: other jobs ran at the same time, so absolute images/s are "
                          "low and noisy; the three timings alternate within one run, so their ratios share "
                          "the load")
        print(summary_line(report), flush=True)
        results[name] = report
        atomic_write_text(RESULTS, json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
