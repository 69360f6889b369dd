"""Kernels per training step, per method: launch count tracked like FLOPs.

Counts the aten operations one training step dispatches below autograd (`TorchDispatchMode`), on
the CPU: each is about one kernel launch on a GPU, which is what bounds a step whose kernels are
small (the CPU issues them one by one). Views and other metadata-only ops launch nothing and are
counted apart. Two phases of the same `TrainStep` the loop runs: `augment` (the batch's views) and
`step` (forward, backward, optimizer, queue pushes, EMA), each counted on the second step (the first
creates the optimizer's state).

    python -m benchmarks.kernel_count benchmarks/results/kernel_count.json          # the demo preset
    python -m benchmarks.kernel_count out.json --tiny                               # the test's setup
    python -m benchmarks.kernel_count benchmarks/results/kernel_count_resnet18.json --methods byol,simclr \
        backbone.name=resnet18 data.size=32 train.batch_size=8                     # ResNet-18 (CIFAR stem)

On the CPU the augmentation takes its CPU branch, so `augment` is the CPU count (hue and blur on the
samples that drew them); `augment_gpu` counts the same views through the branch a GPU runs
(`BatchAugment.whole_batch`: every op on the whole batch, no data-dependent shapes), which is what a
GPU launches eagerly and what `train.cuda_graph` with `data.augment_rng=device` captures; the model's ops are
those a GPU runs, before any fusion by torch.compile, except the optimizer's: torch's SGD and AdamW
take their multi-tensor (`foreach`) path by default on CUDA tensors only, so on the CPU they count one
kernel per parameter and op. The counts do not depend on the batch size.
`tests/benchmarks/test_kernel_count.py` checks that no method's counts grow beyond
benchmarks/results/kernel_count_tiny.json (`--tiny`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kith

# ops that launch no kernel: views, aliases and reads of metadata
_NO_KERNEL = {"detach", "alias", "lift_fresh", "view", "_unsafe_view", "t", "expand", "permute",
              "transpose", "unsqueeze", "squeeze", "slice", "select", "as_strided", "split",
              "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold", "reshape", "flatten",
              "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
              "_has_compatible_shallow_copy_type"}

TINY = ["data.name=digits", "data.size=16", "data.train_subset=64", "data.test_subset=40",
        "backbone.name=tiny", "backbone.width=8", "train.batch_size=32", "train.optimizer=sgd",
        "train.progress=false", "train.device=cpu", "train.precision=fp32"]
# small heads and memories per method: only the keys each method has are used
SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32, "queue_size": 64,
         "bank_size": 64, "transformer_ff_dim": 32, "num_prototypes": "[4,8]", "kmeans_iters": 3}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels, self.views = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        (self.views if name in _NO_KERNEL or func.is_view else self.kernels)[name] += 1
        return func(*args, **(kwargs or {}))


def _config(method: str, overrides: list[str], tiny: bool):
    from kith.config import build_config
    from kith.methods import get_method_class

    fields = get_method_class(method).Config.__dataclass_fields__
    small = [f"method.{k}={v}" for k, v in SMALL.items() if k in fields] if tiny else []
    base = TINY if tiny else ["preset=demo", "train.progress=false", "train.device=cpu"]
    return build_config([*base, f"method.name={method}", *small, *overrides])


def _clustered(trainer) -> None:
    """SPCL past its first clustering, so its prototype terms are counted."""
    prototypes = getattr(trainer.method, "prototypes", None)
    if prototypes is not None:
        gen = torch.Generator().manual_seed(0)
        prototypes.recluster(torch.randn(prototypes.num_samples, prototypes.dim, generator=gen), iters=2)


def count_method(method: str, overrides: list[str] = (), tiny: bool = True) -> dict:
    """`{augment, augment_gpu, step}` kernels and `{augment_views, step_views}` metadata ops of one step
    of `method`, plus the step's ten most frequent kernels."""
    from kith.train.setup import setup

    torch.manual_seed(0)
    parts = setup(_config(method, list(overrides), tiny), torch.device("cpu"))
    trainer = parts.trainer
    trainer.method.train()
    _clustered(trainer)
    batches = parts.loader.epoch(0)
    trainer(next(batches), 0)  # the first step creates the optimizer state
    batch = next(batches)
    with _Counter() as aug:
        views = trainer.views(batch, 1)
    for augment in trainer.augments.values():  # the branch a GPU runs: every op on the whole batch
        augment.whole_batch = True
    with _Counter() as aug_gpu:
        trainer.views(batch, 1)
    with _Counter() as step:
        trainer.optimize(views, batch, 1)
    return {"augment": sum(aug.kernels.values()), "augment_gpu": sum(aug_gpu.kernels.values()),
            "step": sum(step.kernels.values()),
            "augment_views": sum(aug.views.values()), "step_views": sum(step.views.values()),
            "step_top": dict(step.kernels.most_common(10))}


def count_all(overrides: list[str] = (), tiny: bool = True, methods: list[str] | None = None) -> dict:
    from kith.methods import METHODS

    report = {"torch": torch.__version__, "kith": kith.__version__, "tiny": tiny,
              "overrides": list(overrides), "methods": {}}
    for name in methods or sorted(METHODS):
        report["methods"][name] = count_method(name, overrides, tiny)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    parser.add_argument("--tiny", action="store_true",
                        help="the test's setup: 64 digits, width 8, small heads")
    parser.add_argument("--methods", help="only these methods, comma-separated (default: all)")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else None
    report = count_all(args.overrides, tiny=args.tiny, methods=methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["methods"].items():
        print(f"{name:14s} augment {r['augment']:5d} (GPU branch {r['augment_gpu']:5d})  "
              f"step {r['step']:5d}  kernels", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
