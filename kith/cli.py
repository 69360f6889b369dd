"""The `kith` command. User errors print one line (no traceback) and exit 2.

Each sub-command imports the tool it runs inside its own function, on purpose: a command then
loads only its own tool (`kith --help` and `kith pretrain` never load matplotlib, scikit-learn's
t-SNE or the benchmark code). The module is longer than the 400-line rule: `build_parser` is one
declarative argparse tree, which reads best whole."""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from pathlib import Path

from kith.utils.boundary import as_user_error, debug
from kith.utils.errors import UserError, one_line
from kith.utils.signals import stop_on_signals

TOP_LEVEL_HELP = """\
config keys (override with key=value; nested with dots):
  preset=NAME          a preset from the list below (default: demo)
  seed, out_dir, run_name
  data.*               name (digits|cifar10|cifar100|stl10|folder|filelist|npz), path, size,
                       train_subset, test_subset, holdout, ...
  backbone.*           name (resnet18|resnet34|resnet50|tiny|timm:<model>), cifar_stem, width
  method.*             name and the method's own keys (`kith methods` lists methods)
  augment.<view>.*     recipes strong, strong_solarize, weak: min_scale, brightness, blur_prob, ...
  train.*              epochs, batch_size, optimizer (lars|sgd|adamw), lr, weight_decay, precision,
                       knn_every, checkpoint_every, ...
  eval.*               knn_k, knn_temperature, batch_size, monitor_k
`kith config --keys` lists every key with its type, default, range and resume policy;
`kith config KEY=VALUE ...` prints the resolved config of a command line without training.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _presets_text() -> str:
    from kith.config import available_presets

    return "presets:\n  " + "\n  ".join(available_presets())


def cmd_pretrain(args: argparse.Namespace) -> int:
    from kith.config import build_config
    from kith.runs.folder import load_run_config
    from kith.train.loop import run_training

    if args.resume and (args.overwrite or args.run_dir):
        raise UserError("--resume RUN_DIR continues that run; it takes neither --run-dir nor --overwrite")
    if args.resume:
        cfg = load_run_config(args.resume, args.overrides)
        result = run_training(cfg, run_dir=args.resume, resume=True)
    else:
        cfg = build_config(args.overrides)
        result = run_training(cfg, run_dir=args.run_dir, overwrite=args.overwrite)
    from kith.utils.distributed import is_main_process

    if not is_main_process():
        return 0
    print(f"run folder: {result.run_dir}")
    print(f"trained {cfg.method.name} on {cfg.data.name} for {result.epochs} epochs in "
          f"{result.wall_time_s:.0f} s ({result.images_per_s:.0f} images/s)")
    for k, acc in result.knn.items():
        rand = result.knn_random_init.get(k, float("nan"))
        print(f"kNN@{k} top-1: {acc:.2f}%  (same network at random initialisation: {rand:.2f}%)")
    return 0


def _split_targets(items: list[str]) -> tuple[str | None, list[str]]:
    """Positional words of `kith eval`: at most one run folder, the rest key=value overrides."""
    paths = [i for i in items if "=" not in i or Path(i).exists()]
    overrides = [i for i in items if i not in paths]
    if len(paths) > 1:
        raise UserError(f"kith eval takes one run folder, got {len(paths)}: {' '.join(paths)}")
    return (paths[0] if paths else None), overrides


def _run_dir_of(target: Path) -> Path | None:
    """The run folder a target belongs to (the folder itself, or the one holding checkpoints/<file>)."""
    if target.is_dir():
        return target if (target / "config.yaml").is_file() else None
    if target.parent.name == "checkpoints" and (target.parent.parent / "config.yaml").is_file():
        return target.parent.parent
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from kith.evaluation.probe import DEFAULT_EVAL_K, probe_run

    run_dir, overrides = _split_targets(args.targets)
    if run_dir and args.checkpoint:
        raise UserError("give either RUN_DIR or --checkpoint FILE, not both")
    target = args.checkpoint or run_dir
    if target is None:
        raise UserError("kith eval needs RUN_DIR or --checkpoint FILE")
    try:
        ks = [int(k) for k in args.k.split(",")] if args.k else list(DEFAULT_EVAL_K)
    except ValueError:
        raise UserError(f"--k must be comma-separated integers (e.g. 10,20,100,200), "
                        f"got '{args.k}'") from None
    if any(k < 1 for k in ks):
        raise UserError(f"--k values must be at least 1, got {args.k}")
    if args.linear_epochs is not None and args.linear_epochs < 1:
        raise UserError("--linear-epochs must be at least 1")
    result = probe_run(target, ks, linear=not args.no_linear, linear_epochs=args.linear_epochs,
                          linear_augment=args.linear_augment, device=args.device, seed=args.seed,
                          overrides=overrides, progress=args.progress)
    print(f"{result['method']} on {result['data']} ({result['backbone']}, "
          f"{result['image_size']}x{result['image_size']} images, {result['feature_dim']}-d features): "
          f"{result['num_train']} train / {result['num_test']} test images")
    for k, acc in result["knn"].items():
        print(f"kNN@{k} top-1: {acc:.2f}%")
    linear = result["linear"]
    if linear:
        how = "augmented views" if result["linear_augment"] else "cached features"
        print(f"linear probe ({result['linear_epochs']} epochs, {how}): top-1 {linear['top1']:.2f}%  "
              f"top-5 {linear['top5']:.2f}%")
    print(f"evaluation took {result['time_s']:.1f} s")
    owner = _run_dir_of(Path(target))
    if owner is not None and (owner / "metrics.jsonl").exists():
        from kith.runs.metrics import MetricsLog

        row = {"kind": "eval", **{k: result[k] for k in ("step", "epoch") if k in result},
               **{f"knn_top1@{k}": v for k, v in result["knn"].items()}}
        if linear:
            row.update(linear_top1=linear["top1"], linear_top5=linear["top5"],
                       linear_epochs=result["linear_epochs"], linear_augment=result["linear_augment"])
        row.update(eval_time_s=result["time_s"], checkpoint=str(target), overrides=overrides)
        MetricsLog(owner / "metrics.jsonl").write(row)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kith.tools.compare import compare

    print(compare(args.run_dirs, csv_path=args.csv, markdown_path=args.markdown), end="")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from kith.tools.run_plots import PLOTS, plot_run

    which = args.only.split(",") if args.only else list(PLOTS)
    for path in plot_run(args.run_dir, which, umap=args.umap, max_points=args.max_points, seed=args.seed,
                         device=args.device, overrides=args.overrides, progress=args.progress):
        print(path)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from kith.tools.study import run_study, split_values, to_markdown

    methods = [m for m in (args.methods or "").split(",") if m]
    values = split_values(args.values) if args.values else None
    if values is not None and args.kind == "weak-aug":
        raise UserError("--values does not apply to --kind weak-aug (its settings are strong and weak)")
    if values is not None and args.kind == "dim":
        try:
            values = [int(v) for v in values]
        except ValueError:
            raise UserError(f"--values must be comma-separated integers for --kind dim, got '{args.values}'"
                            ) from None
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers like 0,1,2, got '{args.seeds}'") from None
    study = run_study(args.kind, methods, args.out, values, args.overrides, rerun=args.rerun, key=args.key,
                      seeds=seeds)
    print(to_markdown(study), end="")
    print(f"wrote {Path(args.out) / 'study.json'}, study.md, study.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kith.tools.export import export_backbone

    path = export_backbone(args.source, args.output, args.format)
    print(f"wrote {args.format} backbone to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from kith.config import build_config
    from kith.tools.bench import bench, summary_line

    words = list(args.targets)
    if words and "=" not in words[0]:
        words[0] = f"preset={words[0]}"
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    cfg = build_config(["train.progress=false", *words])
    report = bench(cfg, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    report["overrides"] = list(args.targets)
    text = json.dumps(report, indent=2)
    if args.out:
        from kith.runs.files import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text + "\n")
        print(summary_line(report))
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def cmd_upgrade_checkpoint(args: argparse.Namespace) -> int:
    from kith.runs.checkpoint import upgrade_checkpoint

    print(f"rewrote {upgrade_checkpoint(args.file)} in the weights-only format")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        from kith.tools.config_reference import render_text

        print(render_text(), end="")
        return 0
    from kith.config import build_config, to_yaml

    print(to_yaml(build_config(args.overrides)), end="")
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

    p = sub.add_parser("pretrain", help="train a method",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a self-supervised method; ends with kNN top-1 of the learned "
                                   "features next to the same network at random initialisation.",
                       epilog=TOP_LEVEL_HELP + "\n" + _presets_text()
                       + "\n\nexample: kith pretrain preset=cifar10/byol data.path=data train.epochs=5")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint; overrides may change "
                        "train.epochs, train.lr and other schedule, logging, eval and device keys (logged as "
                        "a 'resume' row of metrics.jsonl), not the model, method, data, batch size, seed or "
                        "augmentations")
    p.add_argument("--run-dir", help="run folder (default: out_dir/<method>-<data>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a --run-dir that already holds a run, deleting that run's files")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="kNN and linear-probe evaluation of a trained run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=_wrap("Evaluate a frozen backbone on its data's test split: weighted kNN "
                                         "(cosine, T=0.07) for several k, and a linear probe on "
                                         "standardised features extracted once (seeded SGD, cosine "
                                         "schedule, fixed epochs; top-1 and top-5). Results are printed and "
                                         "appended to the run's metrics.jsonl as a row with kind 'eval'."),
                       epilog=_wrap("targets: a run folder; --checkpoint takes a kith checkpoint, an "
                              "exported backbone file (config + backbone state_dict), or a bare "
                              "state_dict / TorchScript file together with backbone.*=... and data.*=... "
                              "overrides.") + "\n"
                              "examples:\n  kith eval runs/byol-cifar10-20250101-120000\n"
                              "  kith eval runs/my-run data.path=/new/data --k 20,200 --no-linear\n"
                              "  kith eval --checkpoint backbone.pt --linear-augment")
    p.add_argument("targets", nargs="*", metavar="RUN_DIR|key=value",
                   help="run folder, then optional config overrides (e.g. data.path=...)")
    p.add_argument("--checkpoint", help="a checkpoint or exported backbone file instead of a run folder")
    p.add_argument("--k", help="comma-separated k values for kNN (default: 10,20,100,200)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (kNN only)")
    p.add_argument("--linear-epochs", type=int, help="linear probe epochs (default: 100)")
    p.add_argument("--linear-augment", action="store_true",
                   help="train the probe on fresh random-resized-crop + flip views each epoch (the "
                        "papers' protocol; flips only when the run's strong recipe flips): runs the backbone "
                        "over the training set every epoch, so it is much slower than the default cached "
                        "features")
    p.add_argument("--seed", type=int, default=0, help="seed of the linear probe (default 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="one table of several runs",
                       description="Markdown table (stdout) of runs: method, data, backbone, epochs, "
                                   "kNN@20, kNN@200, linear top-1, wall time, images/s, from summary.json "
                                   "and the latest 'eval' row of metrics.jsonl (else the final kNN).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV (raw numbers)")
    p.add_argument("--markdown", metavar="FILE", help="also write the Markdown table to FILE")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="pictures of a run: curves, embedding, retrieval",
                       description="Write RUN_DIR/plots/curves.png (metrics.jsonl), embedding.png (t-SNE "
                                   "of test features coloured by class; UMAP with --umap) and retrieval.png "
                                   "(8 seeded test queries and their 8 nearest training images; green = same "
                                   "class).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("overrides", nargs="*", help="config overrides (e.g. data.path=... when the data moved)")
    p.add_argument("--only", help="comma-separated subset of curves,embedding,retrieval")
    p.add_argument("--umap", action="store_true", help="UMAP instead of t-SNE (needs umap-learn)")
    p.add_argument("--max-points", type=int, default=2000, help="test images in the embedding (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("study", help="sweep any key over seeds (mean ± std); presets: projector dim, "
                                     "weak vs strong views",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=_wrap("Sweeps a config key (--key K --values a,b) or a preset "
                                         "(--kind dim: method.proj_output_dim; --kind weak-aug: every view "
                                         "set to the weak crop+flip recipe, and the default views), for each "
                                         "method and each seed of --seeds, each (setting, seed) a separate "
                                         "resumable run under --out. Finished runs are skipped and "
                                         "interrupted ones resumed. Writes study.json, study.md (mean ± "
                                         "sample std over seeds) and study.png (error bars)."),
                       epilog="overrides apply to every run; {method} is replaced by the method name.\n"
                              "examples:\n  kith study --key method.k --values 1,5 --seeds 0,1,2 "
                              "--methods msf --out runs/msf-k preset=cifar10/msf\n"
                              "  kith study --kind dim --methods simclr,byol --out runs/dim "
                              "--values 64,256,1024 train.epochs=20")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    p.add_argument("--kind", choices=["dim", "weak-aug"], help="a preset sweep (instead of --key)")
    p.add_argument("--key", help="the dotted config key to sweep, e.g. method.k")
    p.add_argument("--methods", help="comma-separated method names (default: the method the overrides name)")
    p.add_argument("--seeds", help="comma-separated seeds, one run per seed of every setting (default: the "
                                   "config's seed, folders without a -s<seed> suffix)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the study's runs and results")
    p.add_argument("--values", help="values of --key (commas inside [...] stay), or dims for --kind dim "
                                    "(default 32,64,128,256,512,1024,2048)")
    p.add_argument("--rerun", action="store_true",
                   help="train again, from scratch, the runs whose saved config differs from the "
                        "requested one")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("export", help="export the trained backbone (state_dict, TorchScript, ONNX)",
                       description=_wrap("Write the online backbone of a run folder or checkpoint. "
                                         "state_dict: torchvision keys for ResNets (without fc), plus the "
                                         "backbone name, stem and feature size; export: a torch.export "
                                         "archive (.pt2) that torch.export.load runs without kith; "
                                         "torchscript: a traced module; onnx: needs the onnx extra."))
    p.add_argument("source", help="run folder or checkpoint file")
    p.add_argument("output", help="file to write")
    p.add_argument("--format", choices=["state_dict", "export", "torchscript", "onnx"], default="state_dict",
                   help="state_dict (default); export: a torch.export .pt2 archive; torchscript (deprecated "
                        "by PyTorch); onnx (the onnx extra)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="images/s of data+augmentation, the model step and the full step",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=_wrap(
                           "Time the training step of a preset (the loop's own code) three ways, each "
                           "after --warmup untimed steps: (a) data + augmentation alone, (b) forward + "
                           "backward + optimizer + EMA on fixed random views of the same shapes, (c) the "
                           "full step. Reports images/s of each, (c)/(b) as the pipeline efficiency, model "
                           "FLOPs per image (torch.utils.flop_counter, forward + backward of one step) and "
                           "achieved TFLOP/s, with the device, torch version and threads, as JSON (stdout, "
                           "or --out FILE)."),
                       epilog="examples:\n  kith bench demo --steps 3 --warmup 1\n"
                              "  kith bench cifar10/byol data.path=data train.batch_size=512 "
                              "train.compile=true --out bench.json")
    p.add_argument("targets", nargs="*", metavar="PRESET|key=value",
                   help="a preset name (default demo), then key=value config overrides")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind (default 20)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the three in turn this many times and report the medians (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", metavar="FILE", help="write the JSON report to FILE (default: print it)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("upgrade-checkpoint",
                       help="convert a checkpoint of an older kith (only files you trust)",
                       description=_wrap("Rewrite a checkpoint written by an older kith (numpy's RNG state "
                                         "pickled) so that it loads weights-only. This unpickles the file in "
                                         "full, which runs any code a crafted file holds: use it only on "
                                         "checkpoints you made yourself or otherwise trust."))
    p.add_argument("file", help="the checkpoint (.pt) to rewrite in place")
    p.set_defaults(func=cmd_upgrade_checkpoint)

    p = sub.add_parser("config", help="print the resolved config of a command line, or every key",
                       description=_wrap("Print the config `kith pretrain` would run with the same key=value "
                                         "overrides (defaults <- preset <- overrides), as YAML, without "
                                         "training; with --keys, every config key with its type, default, "
                                         "allowed range and whether a resume may change it."),
                       epilog="examples:\n  kith config preset=cifar10/byol train.epochs=5\n"
                              "  kith config --keys")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (as for kith pretrain)")
    p.add_argument("--keys", action="store_true", help="list every config key instead")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=cmd_methods)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, letting `key=value` overrides come after options too
    (`kith eval RUN --no-linear data.path=...`): argparse fills a command's positional list once, so
    words after an option come back unrecognised; those that are overrides join the command's list."""
    args, extra = parser.parse_known_args(argv)
    words = [w for w in extra if "=" in w and not w.startswith("-")]
    unknown = [w for w in extra if w not in words]
    listed = next((name for name in ("overrides", "targets") if isinstance(getattr(args, name, None), list)),
                  None)
    if unknown or (words and listed is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown or words)}")
    if words:
        getattr(args, listed).extend(words)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    with stop_on_signals():  # SIGINT and SIGTERM stop kith the same way from its first instruction on
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("kith: interrupted; the last checkpoint is kept (resume with --resume RUN_DIR)",
                  file=sys.stderr)
            return 130
        except Exception as exc:
            error = as_user_error(exc)
            if error is None:
                raise  # a bug: its traceback
            if debug():
                traceback.print_exc()
            print(f"kith: error: {one_line(error)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
