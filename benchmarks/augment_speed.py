"""Images/s of the two-view `strong` recipe on CPU: kith's BatchAugment vs torchvision's
per-image PIL transforms (the usual CIFAR dataset + transform pipeline) vs kornia's batched
``kornia.augmentation`` (the batched library people reach for), same recipe.

One image = both views ("strong" and "strong_solarize") of one source image. All sides
read the same first 2,560 CIFAR-10 training images, already decoded to uint8 (decoding is
not timed); the PIL side includes ``Image.fromarray`` per image, as
``torchvision.datasets.CIFAR10.__getitem__`` does; the batched sides start from the uint8
batch. kith and kornia run with 1 and with 2 torch intra-op threads; "kith" alone is
kith's default (``BatchAugment.cpu_threads``). Each pipeline is warmed up, then timed
``--repeats`` times, the pipelines interleaved within each repeat so that changes in the
machine's load hit all alike; the median is reported, and every ratio is of medians of
the same run. "kith_compiled" is kith's default with ``train.compile_augment`` (each recipe's
rendering through ``torch.compile``, inductor; its compile, in the warm-up, is not timed), which
runs the probabilistic ops on the whole batch; "kith_whole_batch" is the eager pipeline doing the
same (the branch a GPU runs eagerly), so compiled / whole batch is what compiling buys that branch.
kornia is optional (``pip install kornia``): without it that column is
skipped with a message.

    python benchmarks/augment_speed.py [--data PATH] [--repeats 5] [--batch 256]

Writes benchmarks/results/augment_speed.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
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

from kith.data.augment import BatchAugment, default_views
from kith.data.spec import ImageSpec
from kith.tools.bench import device_name

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_images(path: Path, n: int) -> np.ndarray:
    """The first n training images of the JPEG pack, decoded: uint8 (n, 32, 32, 3)."""
    from PIL import Image

    with np.load(path) as pack:
        jpeg, offsets = pack["train_jpeg"], pack["train_offsets"]
        return np.stack(
            [
                np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
                for i in range(n)
            ]
        )


def torchvision_views():
    from torchvision import transforms as T

    def recipe(solarize: bool):
        ops = [
            T.RandomResizedCrop(32, scale=(0.08, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        if solarize:
            ops.append(T.RandomSolarize(128, p=0.2))
        ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        return T.Compose(ops)

    return recipe(False), recipe(True)


def kornia_pipelines():
    """The same two recipes with ``kornia.augmentation`` on float batches in [0, 1], or None
    without kornia. Solarize at a fixed 0.5 (thresholds=0, additions=0), as torchvision's."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None

    def recipe(solarize: bool) -> torch.nn.Module:
        ops = [
            K.RandomResizedCrop((32, 32), scale=(0.08, 1.0)),
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
        if solarize:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2))
        ops += [K.RandomHorizontalFlip(), K.Normalize(torch.tensor(MEAN), torch.tensor(STD))]
        return torch.nn.Sequential(*ops)

    return recipe(False), recipe(True)


def bench(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn. The fns are interleaved within each repeat, so that
    changes in the machine's load hit all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=REPO / ".." / "shared" / "data" / "cifar10" / "cifar10-jpeg.npz"
    )
    parser.add_argument("--n", type=int, default=2560)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "augment_speed.json")
    args = parser.parse_args()

    if not args.data.exists():
        print(f"augment_speed: no data at {args.data} (pass --data PATH to cifar10-jpeg.npz); skipping.")
        return 0

    images = load_images(args.data, args.n)
    n = len(images)

    from PIL import Image

    tv1, tv2 = torchvision_views()

    def run_torchvision():
        for img in images:
            pil = Image.fromarray(img)
            tv1(pil)
            tv2(pil)

    views = default_views()
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)

    def pair() -> list[BatchAugment]:
        """The two views' augmentations, fresh."""
        spec = ImageSpec.of(32, MEAN, STD)
        return [BatchAugment(views[name], spec) for name in ("strong", "strong_solarize")]

    def batched(augments: list[BatchAugment]) -> Callable[[], None]:
        """Both views of every image, batch by batch."""
        def run() -> None:
            for start in range(0, n, args.batch):
                x = batch[start : start + args.batch]
                for augment in augments:
                    augment(x, gen)

        return run

    run_kith = batched(pair())
    # train.compile_augment: the rendering through torch.compile (inductor), the draws eager; it runs
    # the probabilistic ops on the whole batch, as the eager GPU branch does (whole_batch), which the
    # eager CPU branch does not (it runs them on the drawn samples only)
    compiled = [augment.compile("inductor") for augment in pair()]
    whole = pair()
    for augment in whole:
        augment.whole_batch = True

    kornia_views = kornia_pipelines()
    if kornia_views is None:
        print("augment_speed: kornia is not installed (pip install kornia); skipping the kornia column.")

    def run_kornia():
        k1, k2 = kornia_views
        for start in range(0, n, args.batch):
            x = batch[start : start + args.batch].float().div_(255.0)
            k1(x)
            k2(x)

    threads = torch.get_num_threads()
    # other processes on a small machine make torch's intra-op threads wait on each other;
    # the load average says how busy the machine was
    load_before = os.getloadavg()[0]

    def with_threads(fn: Callable[[], None], k: int) -> Callable[[], None]:
        """fn on k torch intra-op threads, kith's own thread setting off."""

        def run() -> None:
            default = BatchAugment.cpu_threads
            BatchAugment.cpu_threads = None
            torch.set_num_threads(k)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)
                BatchAugment.cpu_threads = default

        return run

    fns = {
        "torchvision_pil": run_torchvision,
        "kith": run_kith,
        "kith_1thread": with_threads(run_kith, 1),
        "kith_2threads": with_threads(run_kith, 2),
        "kith_whole_batch": batched(whole),
        "kith_compiled": batched(compiled),  # the warm-up call compiles (not timed)
    }
    if kornia_views is not None:
        fns["kornia_1thread"] = with_threads(run_kornia, 1)
        fns["kornia_2threads"] = with_threads(run_kornia, 2)
    med = bench(fns, args.repeats)
    t_tv = med["torchvision_pil"]

    result = {
        "benchmark": "augment_speed",
        "what": "images/s, two views (strong + strong_solarize) per image, 32x32 CIFAR-10 train images, CPU",
        "images": n,
        "batch": args.batch,
        "repeats": args.repeats,
        "statistic": "median of repeats, all pipelines interleaved in each repeat",
        "images_per_s": {name: n / t for name, t in med.items()},
        "ratio_over_torchvision_pil": {name: t_tv / t for name, t in med.items()},
        "kith_default_cpu_threads": BatchAugment.cpu_threads,
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu": device_name(torch.device("cpu")),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    result["ratio_compiled_over_eager"] = {"default": med["kith"] / med["kith_compiled"],
                                           "whole_batch": med["kith_whole_batch"] / med["kith_compiled"]}
    if kornia_views is not None:
        result["ratio_kith_over_kornia"] = {
            "1thread": med["kornia_1thread"] / med["kith_1thread"],
            "2threads": med["kornia_2threads"] / med["kith_2threads"],
            "kith_default_over_faster_kornia": min(med["kornia_1thread"], med["kornia_2threads"])
            / med["kith"],
        }
    for mod in ("torchvision", "kornia"):
        try:
            result[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    for name, t in med.items():
        print(f"{name:>16}: {n / t:8,.0f} img/s  {t_tv / t:5.1f}x torchvision PIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
