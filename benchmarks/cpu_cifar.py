"""The standard CPU benchmark: every registered method on real CIFAR-10 images, a small fixed budget.

Each method trains a tiny convnet (`backbone.name=tiny backbone.width=32`) on a
class-balanced subset of the CIFAR-10 training images (default 5,000) for a fixed number
of epochs (default 15) at batch 256, starting from the method's own CIFAR-10 preset
(its optimizer, lr, heads, temperatures), with queues/banks shrunk to 4,096 and SPCL's
prototype counts derived from the subset size, where the method has those keys; the lr
warm-up is 10% of the epochs. It is then
evaluated on the full 10,000-image test set: weighted kNN@20/@200 and a linear probe
(cached features, 100 epochs) of the trained backbone next to the same backbone at random
initialisation. Meant to take roughly 3-5 minutes per method on 2 quiet CPU cores.

    python benchmarks/cpu_cifar.py [--methods simclr,byol] [--epochs 10] [--train-subset 5000]

Data: the JPEG pack `../shared/data/cifar10/cifar10-jpeg.npz` (relative to the repository
root), unpacked once to `benchmarks/.cache/cifar10` (cifar-python layout) and reused; when
the pack is absent the benchmark says so and exits 0. Run folders go to
`benchmarks/.cache/runs/<method>` (replaced on every run). Results are merged by method
into `benchmarks/results/cpu_cifar.json` (numbers, exact overrides, torch version, date,
CPU count) and `benchmarks/results/cpu_cifar.md` (the README table, made by kith.tools.compare).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from kith.config import available_presets, build_config
from kith.data.sources import load_splits
from kith.evaluation.probe import probe_backbone
from kith.methods import METHODS, get_method_class
from kith.nn.backbones import build_backbone
from kith.runs.files import atomic_write_text
from kith.runs.metrics import MetricsLog, read_metrics
from kith.tools.compare import to_markdown
from kith.train.loop import run_training

PACK = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.npz"
PREPARE = PACK.parent / "prepare.py"
CACHE = REPO / "benchmarks" / ".cache"
DATA_DIR = CACHE / "cifar10"
RUNS_DIR = CACHE / "runs"
RESULTS = REPO / "benchmarks" / "results"
QUEUE_KEYS = ("queue_size", "bank_size")
SMALL_QUEUE = 4096
LINEAR_EPOCHS = 100

COLUMNS = [
    ("method", "method"),
    ("epochs", "epochs"),
    ("train images", "num_train"),
    ("kNN@20", "knn@20"),
    ("kNN@200", "knn@200"),
    ("linear top-1", "linear_top1"),
    ("random-init kNN@200", "random_init_knn@200"),
    ("random-init linear top-1", "random_init_linear_top1"),
    ("wall time", "wall_time_s"),
    ("images/s", "images_per_s"),
]


def prepare_data() -> Path | None:
    """The cifar-python folder, unpacked from the JPEG pack on first use; None when the pack is absent."""
    folder = DATA_DIR / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file():
        if not PACK.is_file():
            return None
        print(f"unpacking {PACK} to {DATA_DIR} (once) ...", flush=True)
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(PREPARE), "--out", str(DATA_DIR), "--format", "cifar-python"],
                       check=True)
    return DATA_DIR


# Ablations run beside their method: name -> (method, extra overrides).
VARIANTS = {
    # SPCL's instance term alone (a BYOL with SPCL's schedule): do the prototype terms help?
    "spcl (instance term only)": ("spcl", ["method.lambda_intra=0", "method.lambda_inter=0"]),
}


def method_overrides(method: str, data_dir: Path, epochs: int, train_subset: int,
                     run_name: str | None = None) -> list[str]:
    """The exact overrides of one method's run: its CIFAR-10 preset, then the budget."""
    keys = {f.name for f in fields(get_method_class(method).Config)}
    preset = f"cifar10/{method}" if f"cifar10/{method}" in available_presets() else "cifar10/_data"
    items = [f"preset={preset}", f"method.name={method}", f"data.path={data_dir}",
             "backbone.name=tiny", "backbone.width=32", "backbone.cifar_stem=true",
             f"train.epochs={epochs}", "train.batch_size=256",
             f"train.warmup_epochs={max(0.1 * epochs, 0.0):g}",
             "train.knn_every=0", f"train.checkpoint_every={epochs}", "train.progress=false",
             "train.device=cpu",
             "eval.knn_k=[20,200]", f"out_dir={RUNS_DIR}", f"run_name={run_name or method}"]
    if train_subset:
        items.append(f"data.train_subset={train_subset}")
    for key in QUEUE_KEYS:
        if key in keys:
            items.append(f"method.{key}={SMALL_QUEUE}")
    if "num_prototypes" in keys:  # SPCL: PCL's N/50, N/25, N/12.5 granularities, of the subset's N
        if "num_prototypes_ratio" in keys:
            items.append("method.num_prototypes=null")  # derived from num_prototypes_ratio and N
        else:
            n = train_subset or 50_000
            items.append(f"method.num_prototypes=[{n // 50},{n // 25},{int(n / 12.5)}]")
    if "warmup_mode" in keys:  # ReSSL's InfoNCE warm-up: 5 of 200+ epochs in the paper; 10% of this budget
        items.append(f"method.warmup_epochs={max(0.1 * epochs, 1.0):g}")
    return items


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_method(name: str, data_dir: Path, epochs: int, train_subset: int, linear_epochs: int) -> dict:
    method, extra = VARIANTS.get(name, (name, []))
    overrides = method_overrides(method, data_dir, epochs, train_subset, slug(name)) + extra
    cfg = build_config(overrides)
    run_dir = RUNS_DIR / slug(name)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    tic = time.perf_counter()
    result = run_training(cfg, run_dir=run_dir)
    train_s = time.perf_counter() - tic
    splits = load_splits(cfg.data, cfg.seed)
    trained = probe_backbone(result.method.backbone, cfg, [20, 200], linear=True, linear_epochs=linear_epochs,
                                device="cpu", splits=splits)
    torch.manual_seed(cfg.seed)  # the initial weights the trained backbone started from (as train.py)
    random_net, _ = build_backbone(cfg.backbone)
    random = probe_backbone(random_net, cfg, [20, 200], linear=True, linear_epochs=linear_epochs,
                            device="cpu", splits=splits)
    MetricsLog(run_dir / "metrics.jsonl").write(
        {"kind": "eval", "step": max((r.get("step", 0) for r in read_metrics(run_dir)), default=0),
         "epoch": result.epochs,
         **{f"knn_top1@{k}": v for k, v in trained["knn"].items()},
         "linear_top1": trained["linear"]["top1"], "linear_top5": trained["linear"]["top5"],
         "linear_epochs": linear_epochs, "linear_augment": False, "eval_time_s": trained["time_s"]})
    total_s = time.perf_counter() - tic
    entry = {
        "method": name, "epochs": result.epochs,
        "num_train": trained["num_train"], "num_test": trained["num_test"],
        "knn@20": trained["knn"].get(20), "knn@200": trained["knn"].get(200),
        "linear_top1": trained["linear"]["top1"], "linear_top5": trained["linear"]["top5"],
        "random_init_knn@20": random["knn"].get(20), "random_init_knn@200": random["knn"].get(200),
        "random_init_linear_top1": random["linear"]["top1"],
        "random_init_linear_top5": random["linear"]["top5"],
        "wall_time_s": result.wall_time_s, "images_per_s": result.images_per_s,
        "pretrain_s": train_s, "total_s": total_s, "linear_epochs": linear_epochs,
        "overrides": [o.replace(f"{REPO}/", "") for o in overrides],  # paths relative to the repo root
        "run_dir": str(run_dir.relative_to(REPO)),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(f"   kNN@20 {entry['knn@20']:.2f}  kNN@200 {entry['knn@200']:.2f}  "
          f"linear {entry['linear_top1']:.2f}"
          f"  (random init: kNN@200 {entry['random_init_knn@200']:.2f}, linear "
          f"{entry['random_init_linear_top1']:.2f})  pretrain {result.wall_time_s:.0f} s "
          f"({result.images_per_s:.0f} images/s), total {total_s:.0f} s", flush=True)
    return entry


def write_results(entries: dict[str, dict], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "cpu_cifar",
        "what": "kNN (cosine, T=0.07) and linear probe (cached standardised features, seeded SGD) "
                "top-1 on the full CIFAR-10 test set (JPEG copy) after a short CPU pretraining of a tiny "
                "convnet; the same network at random initialisation for reference. Entries are merged by "
                "method; each has its own overrides.",
        "data": str(PACK.relative_to(REPO.parent)),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch_version": torch.__version__, "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "methods": dict(sorted(entries.items())),
    }
    atomic_write_text(RESULTS / "cpu_cifar.json", json.dumps(doc, indent=2) + "\n")
    rows = list(doc["methods"].values())
    budgets = sorted({(r["epochs"], r["num_train"]) for r in rows})
    budget = "; ".join(f"{e} epoch{'' if e == 1 else 's'} on {n} images" for e, n in budgets)
    md = ("CPU benchmark (`python benchmarks/cpu_cifar.py`): tiny convnet (width 32), batch 256, "
          f"{budget}, each method's CIFAR-10 preset otherwise; "
          "CIFAR-10 JPEG copy, full 10,000-image test set. "
          "Accuracies are top-1 %; random-init columns are the same network before training. "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; exact overrides in cpu_cifar.json.\n\n"
          + to_markdown(rows, COLUMNS))
    atomic_write_text(RESULTS / "cpu_cifar.md", md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated methods or variants "
                                          "(default: every registered method; "
                                          "a method's ablation variants run with it)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=5000,
                        help="class-balanced training images (0 = all)")
    parser.add_argument("--linear-epochs", type=int, default=LINEAR_EPOCHS)
    parser.add_argument("--publish", action="store_true",
                        help="write benchmarks/results/ (the README's rows) even when the run is not "
                             "the full protocol; without it such a run writes benchmarks/results/scratch/")
    args = parser.parse_args(argv)
    global RESULTS
    full = (args.epochs, args.train_subset, args.linear_epochs) == (15, 5000, LINEAR_EPOCHS)
    if not (full or args.publish):  # a quick try never replaces the published rows by accident
        RESULTS = RESULTS / "scratch"
        print(f"not the full protocol: writing {RESULTS} (--publish to replace the published results)")
    methods = args.methods.split(",") if args.methods else list(METHODS)
    methods += [v for v, (m, _) in VARIANTS.items() if m in methods and v not in methods]
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    data_dir = prepare_data()
    if data_dir is None:
        print(f"CIFAR-10 pack not found at {PACK}; skipping the CPU benchmark (nothing written).")
        return 0
    results_file = RESULTS / "cpu_cifar.json"
    entries = {}
    if results_file.is_file():
        try:
            entries = json.loads(results_file.read_text()).get("methods", {})
        except json.JSONDecodeError:
            entries = {}
    command = "python benchmarks/cpu_cifar.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tic = time.perf_counter()
    for method in methods:
        entries[method] = run_method(method, data_dir, args.epochs, args.train_subset, args.linear_epochs)
        write_results(entries, command.strip())
    print(f"done in {time.perf_counter() - tic:.0f} s; wrote {RESULTS / 'cpu_cifar.json'} and cpu_cifar.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
