"""The `kith` command. User errors print one line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kith.errors import UserError

TOP_LEVEL_HELP = """\
config keys (override with key=value; nested with dots):
  preset=NAME          a preset from the list below (default: demo)
  seed, out_dir, run_name
  data.*               name (digits|cifar10|cifar100|stl10|folder|npz), path, size, train_subset, ...
  backbone.*           name (resnet18|resnet50|tiny|timm:<model>), cifar_stem, width
  method.*             name and the method's own keys (`kith methods` lists methods)
  augment.<view>.*     recipes strong, strong_solarize, weak: min_scale, brightness, blur_prob, ...
  train.*              epochs, batch_size, optimizer (lars|sgd|adamw), lr, weight_decay, precision, ...
  eval.*               knn_k, knn_temperature, batch_size
"""


def _presets_text() -> str:
    from kith.config import available_presets

    return "presets:\n  " + "\n  ".join(available_presets())


def cmd_pretrain(args: argparse.Namespace) -> int:
    from kith.config import build_config
    from kith.train import load_run_config, pretrain

    if args.resume:
        cfg = load_run_config(args.resume, args.overrides)
        result = pretrain(cfg, run_dir=args.resume, resume=True)
    else:
        cfg = build_config(args.overrides)
        result = pretrain(cfg, run_dir=args.run_dir)
    from kith.distributed import is_main_process

    if not is_main_process():
        return 0
    print(f"run folder: {result.run_dir}")
    print(f"trained {cfg.method.name} on {cfg.data.name} for {result.epochs} epochs in "
          f"{result.wall_time_s:.0f} s ({result.images_per_s:.0f} images/s)")
    for k, acc in result.knn.items():
        rand = result.knn_random_init.get(k, float("nan"))
        print(f"kNN@{k} top-1: {acc:.2f}%  (same network at random initialisation: {rand:.2f}%)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kith.api import evaluate

    target = args.checkpoint or args.run_dir
    if target is None:
        raise UserError("kith eval needs RUN_DIR or --checkpoint FILE")
    ks = [int(k) for k in args.k.split(",")] if args.k else None
    result = evaluate(target, ks, device=args.device)
    for k, acc in result.items():
        print(f"kNN@{k} top-1: {acc:.2f}%")
    if args.run_dir and Path(args.run_dir, "metrics.jsonl").exists():
        from kith.train import MetricsLog

        MetricsLog(Path(args.run_dir) / "metrics.jsonl").write(
            {"kind": "eval", **{f"knn_top1@{k}": v for k, v in result.items()}})
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from kith.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, cls in METHODS.items():
        print(f"{name:<{width}}  {cls.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kith", description="Self-supervised learning from an image's kin.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a method", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a self-supervised method; ends with kNN top-1 of the learned features "
                                   "next to the same network at random initialisation.",
                       epilog=TOP_LEVEL_HELP + "\n" + _presets_text()
                       + "\n\nexample: kith pretrain preset=cifar10/byol data.path=data train.epochs=5")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--run-dir", help="run folder (default: out_dir/<method>-<data>-<time>)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="kNN evaluation of a trained run")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--checkpoint", help="a checkpoint file instead of a run folder")
    p.add_argument("--k", help="comma-separated k values (default: the run's eval.knn_k)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"kith: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kith: interrupted; the last checkpoint is kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
