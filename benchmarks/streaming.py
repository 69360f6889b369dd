"""Images/s of kith's streaming path vs torchvision ImageFolder + PIL transforms, on a folder of JPEGs.

One image = both views ("strong" and "strong_solarize", kith's default two-view recipe) of one file.
- kith: `make_train_loader` streaming (data.resident=false): DataLoader workers decode each file and cut
  both views' random-resized crops (+ flip) from the full image at data.size; the photometric part
  (jitter, grayscale, solarize, normalise) runs batched in the main process (`augment_views`, on the
  CPU here with --threads torch threads; on a GPU it runs on the device). \
`kith_loader_only` stops at the workers' uint8 crops, the
  figure that matters when the photometric part runs on a GPU.
- torchvision: `ImageFolder` with a two-view transform (RandomResizedCrop, ColorJitter p=0.8,
  RandomGrayscale, [RandomSolarize], RandomHorizontalFlip, ToTensor, Normalize) per image, in a
  `DataLoader` with the same workers, batch size and persistent workers.
The pipelines are interleaved within each repeat (so load changes hit all alike); each timing is one
pass over all images after a warm-up pass; the median over repeats is reported.

    python benchmarks/streaming.py [--num-images 20000] [--workers 8] [--sizes 96 224] [--repeats 3]

The synthetic folder (10 classes, JPEGs of random 300-500 px sides) is made once under
benchmarks/.cache/ (git-ignored). Writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kith.config import build_config
from kith.data.augment import BatchAugment
from kith.data.loader import augment_views, make_train_loader
from kith.data.sources import load_splits
from kith.data.spec import IMAGENET_STATS, ImageSpec
from kith.tools.bench import device_name
from kith.utils.rng import generator as step_generator

VIEWS = ("strong", "strong_solarize")


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs in 10 class folders, sides uniform in 300-500 px, smooth content plus noise
    (photo-like sizes)."""
    from PIL import Image

    folder = root / f"jpeg-{n}"
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse = coarse.resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    (folder / ".complete").write_text(str(n))
    return folder


def torchvision_two_views(cfg, size: int):
    """The same two-view recipe as kith's views, as torchvision PIL transforms applied per image."""
    from torchvision import transforms as T

    def recipe(v):
        ops = [T.RandomResizedCrop(size, scale=(v.min_scale, v.max_scale), ratio=(v.min_ratio, v.max_ratio)),
               T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)], p=v.jitter_prob),
               T.RandomGrayscale(p=v.gray_prob)]
        if v.blur_prob > 0:
            k = BatchAugment(v, ImageSpec.of(size, *IMAGENET_STATS)).blur_kernel
            ops.append(T.RandomApply([T.GaussianBlur(k, (v.blur_sigma_min, v.blur_sigma_max))],
                                     p=v.blur_prob))
        if v.solarize_prob > 0:
            ops.append(T.RandomSolarize(128, p=v.solarize_prob))
        ops += [T.RandomHorizontalFlip(v.flip_prob), T.ToTensor(), T.Normalize(*IMAGENET_STATS)]
        return T.Compose(ops)

    first, second = (recipe(cfg.augment[name]) for name in VIEWS)
    return lambda img: (first(img), second(img))


def pipelines(folder: Path, size: int, workers: int, batch: int) -> dict[str, Callable[[], int]]:
    """name -> a function that runs one pass over the folder and returns the number of images."""
    import torchvision

    cfg = build_config(["data.name=folder", f"data.path={folder}", f"data.size={size}", "data.resident=false",
                        f"data.num_workers={workers}", "data.holdout=0.0001", f"train.batch_size={batch}",
                        "method=simclr", "train.progress=false"])
    train, _ = load_splits(cfg.data)
    loader, _ = make_train_loader(train, cfg, torch.device("cpu"), 0, 0, 1)
    augments = {name: BatchAugment(cfg.augment[name], ImageSpec.of(size, *IMAGENET_STATS)) for name in VIEWS}
    epochs = iter(range(10**6))  # a new epoch per pass: new order, new crops

    def kith_full() -> int:
        n, epoch = 0, next(epochs)
        for k, b in enumerate(loader.epoch(epoch)):
            augment_views(b, augments, list(VIEWS), step_generator("augment", 0, epoch * len(loader) + k, 0))
            n += b.images.shape[0]
        return n

    def kith_loader_only() -> int:
        return sum(b.images.shape[0] for b in loader.epoch(next(epochs)))

    dataset = torchvision.datasets.ImageFolder(str(folder), transform=torchvision_two_views(cfg, size))
    tv = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                     num_workers=workers, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers else None)

    def torchvision_pil() -> int:
        return sum(v1.shape[0] for (v1, _), _ in tv)

    return {f"kith@{size}": kith_full, f"kith_loader_only@{size}": kith_loader_only,
            f"torchvision_pil@{size}": torchvision_pil}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (kith's photometric part on the CPU); more "
                             "threads than idle cores make them wait on each other and on the workers")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "streaming")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "streaming.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = make_folder(args.cache, args.num_images)
    print(f"folder: {folder} ({args.num_images} JPEGs, ready in {time.perf_counter() - t0:.0f}s)")
    fns: dict[str, Callable[[], int]] = {}
    for size in args.sizes:
        fns.update(pipelines(folder, size, args.workers, args.batch))
    load_before = os.getloadavg()[0]
    for name, fn in fns.items():  # warm-up: starts the persistent workers, fills the page cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - tic)
    rates = {name: counts[name] / statistics.median(t) for name, t in times.items()}
    for size in args.sizes:
        print(f"data.size {size}: kith {rates[f'kith@{size}']:,.0f} img/s (loader only "
              f"{rates[f'kith_loader_only@{size}']:,.0f}) | torchvision ImageFolder+PIL "
              f"{rates[f'torchvision_pil@{size}']:,.0f} img/s")

    import torchvision

    result = {
        "benchmark": "streaming",
        "what": "images/s (two views per image) from a folder of JPEGs, 300-500 px, DataLoader workers, CPU",
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "seconds_per_pass": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "images_per_pass": counts,
        "num_images": args.num_images,
        "workers": args.workers,
        "batch": args.batch,
        "repeats": args.repeats,
        "statistic": "median of repeats, pipelines interleaved in each repeat, after one warm-up pass each",
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "torch_threads_main_process": torch.get_num_threads(),
        "hardware": {"cpu": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(), "gpu": None},
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
