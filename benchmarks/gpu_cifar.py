"""The one short GPU run: every method's training step, eager and compiled, then BYOL on CIFAR-10.

Within a wall-clock budget (default 330 s, measured from the start of this script, so the whole
whole run fits 6 minutes with the wrapper) on one GPU:

(a) throughput of every registered method (their CIFAR-10 presets, ResNet-18 with the CIFAR stem,
    batch 512, bf16 autocast), in images/s of source images (each gives two views), measured by
    `kith bench` (the training loop's own `TrainStep`): `model_only` (synthetic views already on
    the GPU: the ceiling any data pipeline can reach), `full_step` (kith's resident path: the uint8
    training set on the GPU, batched per-sample augmentation, then the step) and their ratio
    `efficiency`; first eager for every method, then with `train.compile=true` (inductor) with
    torch.compile's counters (compiled_graphs, graph_breaks, recompiles, fallbacks), then BYOL and
    All4One with `train.cuda_graph=true data.augment_rng=device` (mode `graphed`: augmentation and step
    as one CUDA graph; in --tiny on the CPU stand-in for the graph, a check and not a speed), method by
    method while the throughput share of the budget (`--throughput-share`, 0.5) lasts: what does
    not fit is listed under `skipped`. `--pil` adds the peers' pipeline for BYOL (a torchvision
    DataLoader with per-image PIL transforms of the same view recipes, 8 workers).
(b) BYOL pretraining through ``kith.pretrain("cifar10/byol", ...)`` at batch 512 (lightly's
    benchmark batch; kith scales the preset's lr 1.0 to 2.0 by lr * batch / 256) for as many
    epochs as the measured eager speed fits in what is left of the budget (at most 200, lightly's
    budget), then kith's final kNN (k=200, T=0.07, weighted) beside lightly's published 86.8
    at 200 epochs (the preset's `reference` block).
(c) one JSON, ``<out>/gpu_cifar.json``, written after every measurement and every progress line
    of (b), so a run cut short still returns what it measured: device, versions, every
    throughput, the budget arithmetic, epochs, kNN, wall times.

Data: the CIFAR-10 JPEG pack (``--data``, an .npz of JPEG bytes) is decoded
with torchvision's libjpeg decoder into uint8 arrays and written as the cifar-python folder
kith's ``cifar10`` source reads, so the run is the ``cifar10/byol`` preset with only the
budget changed (``data.name`` stays ``cifar10``, with its normalisation, and ``kith compare``
can match the run against the preset's references).

``--tiny`` runs the same logic on the CPU (tiny convnet and heads, a few hundred images: a subset
of the pack, or random images when it is absent; torch.compile with aot_eager; 1 epoch).

    python benchmarks/gpu_cifar.py --data .gpu-data/cifar10-jpeg.npz --out OUT [--budget-s 330]
    python benchmarks/gpu_cifar.py --tiny --out /tmp/gpu-tiny

On a bare GPU machine use the wrapper ``benchmarks/gpu_run.sh`` (wheels, log), prepared by
``benchmarks/gpu_prepare.sh``.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here, before the heavy imports

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import pickle
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from kith.config import build_config
from kith.data.augment import ViewConfig
from kith.data.images import ImageData
from kith.data.loader import Batch
from kith.data.ops import blur_kernel_size
from kith.data.sources import balanced_subset
from kith.data.spec import ImageSpec, image_spec
from kith.evaluation.probe import KnnSettings, backbone_knn
from kith.methods import get_method_class
from kith.runs.metrics import read_metrics
from kith.tools.bench import bench as kith_bench
from kith.train.setup import build_trainer
from kith.utils import rng

RESULT_FILE = "gpu_cifar.json"
LIGHTLY_EPOCHS = 200  # lightly's CIFAR-10 benchmark budget: the goal for (b)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the tiny mode's network: a small convnet and small heads (keys a method lacks are skipped)
TINY_OVERRIDES = {
    "backbone.name": "tiny", "backbone.width": 8, "method.proj_hidden_dim": 64, "method.proj_output_dim": 32,
    "method.pred_hidden_dim": 64, "method.queue_size": 256, "method.transformer_ff_dim": 32,
    "method.transformer_layers": 1, "method.num_prototypes": "[4,8]",
}


@dataclass
class Settings:
    """Everything that differs between the real run and `--tiny`."""

    device: str
    precision: str  # train.precision of every step: bf16 on the GPU
    batch_size: int
    pil_workers: int
    warmup_steps: int  # excluded from every throughput timing
    timed_steps: int
    max_epochs: int  # cap of (b): lightly's 200
    reserve_s: float  # (b) beyond its epochs: data load, model build, first-step autotune
    safety: float  # fraction of the time left for (b) kept free
    epoch_overhead: float  # training loop vs the bare timed step (logging, lr updates, syncs)
    num_train: int | None  # None: the whole split
    num_test: int | None
    tiny: bool
    compile_backend: str  # train.compile_backend of the compiled measurements
    throughput_share: float  # of the budget, for (a): what does not fit by then is skipped

    @classmethod
    def for_mode(cls, tiny: bool, args: argparse.Namespace) -> Settings:
        if tiny:
            base = cls(device="cpu", precision="fp32", batch_size=64, pil_workers=2, warmup_steps=1,
                       timed_steps=2, max_epochs=1, reserve_s=3.0, safety=0.05, epoch_overhead=1.10,
                       num_train=320, num_test=160, tiny=True, compile_backend="aot_eager",
                       throughput_share=0.5)
        else:
            base = cls(device="cuda" if torch.cuda.is_available() else "cpu", precision="bf16",
                       batch_size=512, pil_workers=8, warmup_steps=5, timed_steps=20,
                       max_epochs=LIGHTLY_EPOCHS, reserve_s=25.0, safety=0.05, epoch_overhead=1.10,
                       num_train=None, num_test=None, tiny=False, compile_backend="inductor",
                       throughput_share=0.5)
        for f in fields(cls):  # command-line values win
            value = getattr(args, f.name, None)
            if value is not None:
                setattr(base, f.name, value)
        return base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


# ---- data --------------------------------------------------------------------------------------
@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, CPU
    labels: torch.Tensor  # (N,) long

    def image_data(self) -> ImageData:
        return ImageData(labels=self.labels, classes=list(CLASSES), images=self.images, size=32,
                         name="cifar10")


def decode_jpegs(blob: np.ndarray, offsets: np.ndarray, index: list[int] | None = None,
                 threads: int | None = None, chunk: int = 1000) -> torch.Tensor:
    """The JPEGs `index` (default all) of a pack split as (N, 3, H, W) uint8, decoded by
    torchvision's libjpeg decoder (identical to PIL's; PIL where torchvision has none) in chunks
    on a thread pool."""
    import warnings

    data = torch.from_numpy(blob)
    index = range(len(offsets) - 1) if index is None else index
    spans = [(int(offsets[i]), int(offsets[i + 1])) for i in index]
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(part: list[tuple[int, int]]) -> torch.Tensor:
            return torch.stack(decode_jpeg([data[a:b] for a, b in part], mode=ImageReadMode.RGB))
    except ImportError:  # a torchvision without its image codecs
        from PIL import Image

        def decode(part: list[tuple[int, int]]) -> torch.Tensor:
            arrays = [np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB")) for a, b in part]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    parts = [spans[i:i + chunk] for i in range(0, len(spans), chunk)]
    workers = threads or min(16, os.cpu_count() or 1)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 deprecates its codecs
        return torch.cat(list(pool.map(decode, parts)))


def load_pack(path: Path, num_train: int | None = None, num_test: int | None = None) -> tuple[Split, Split]:
    """(train, test) from the JPEG pack (see /work/shared/data/cifar10/README.md): all images of
    each split, or a class-balanced `num_train` / `num_test` of them (the pack is sorted by class)."""
    with np.load(path, allow_pickle=False) as pack:
        splits = []
        for name, count in (("train", num_train), ("test", num_test)):
            labels = torch.from_numpy(pack[f"{name}_labels"].astype(np.int64))
            index = balanced_subset(labels, count, seed=0) if count else torch.arange(len(labels))
            images = decode_jpegs(pack[f"{name}_jpeg"], pack[f"{name}_offsets"], index.tolist())
            splits.append(Split(images, labels[index]))
    return splits[0], splits[1]


def random_pack(num_train: int, num_test: int, seed: int = 0) -> tuple[Split, Split]:
    """Random 32x32 images with random labels: the tiny mode's data when the pack is absent."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                     torch.randint(0, len(CLASSES), (n,), generator=gen))

    return split(num_train), split(num_test)


def write_cifar_python(train: Split, test: Split, root: Path) -> Path:
    """Write `root/cifar-10-batches-py` (the official file names and pickle layout: `data` (N, 3072)
    uint8 in CHW order, `labels`, `batches.meta`) for kith's `cifar10` source; returns `root`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)

    index = np.array_split(np.arange(len(train.labels)), 5)
    for i, idx in enumerate(index, start=1):
        dump(f"data_batch_{i}", {"data": train.images[idx].reshape(len(idx), -1).numpy(),
                                 "labels": train.labels[idx].tolist()})
    dump("test_batch", {"data": test.images.reshape(len(test.labels), -1).numpy(),
                        "labels": test.labels.tolist()})
    dump("batches.meta", {"label_names": list(CLASSES)})
    return root


# ---- the peers' pipeline -----------------------------------------------------------------------
def pil_transform(view: ViewConfig, spec: ImageSpec):
    """torchvision's per-image PIL transforms for one kith view recipe (same ops, order, probabilities)."""
    from torchvision import transforms as T

    size = spec.size
    ops = [T.RandomResizedCrop(size, scale=(view.min_scale, view.max_scale),
                               ratio=(view.min_ratio, view.max_ratio))]
    if view.jitter_prob > 0:
        ops.append(T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                                 p=view.jitter_prob))
    if view.gray_prob > 0:
        ops.append(T.RandomGrayscale(p=view.gray_prob))
    if view.blur_prob > 0:
        blur = T.GaussianBlur(blur_kernel_size(size), (view.blur_sigma_min, view.blur_sigma_max))
        ops.append(T.RandomApply([blur], p=view.blur_prob))
    if view.solarize_prob > 0:
        ops.append(T.RandomSolarize(128, p=view.solarize_prob))
    if view.flip_prob > 0:
        ops.append(T.RandomHorizontalFlip(p=view.flip_prob))
    ops += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


class PilPairs(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ (Image.fromarray of an HWC uint8 array) with one
    transform per view, as the peers' two-view datasets do."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transforms: list):
        self.images, self.labels, self.transforms = images_hwc, labels, transforms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return [t(img) for t in self.transforms], int(self.labels[i]), i


def cycle(make_epoch: Callable[[int], Iterator]) -> Iterator:
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


# ---- throughput --------------------------------------------------------------------------------
def tiny_overrides(method: str) -> dict:
    """TINY_OVERRIDES less the method keys `method` does not have."""
    keys = {f"method.{f.name}" for f in fields(get_method_class(method).Config)}
    return {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("method.") or k in keys}


def method_config(method: str, settings: Settings, extra: dict | None = None) -> object:
    """The method's CIFAR-10 preset at the run's batch size, device and precision (tiny network in --tiny)."""
    items = {"train.batch_size": settings.batch_size, "train.device": settings.device,
             "train.precision": settings.precision, "train.progress": "false"}
    if settings.tiny:
        items.update(tiny_overrides(method))
    items.update(extra or {})
    return build_config([f"preset=cifar10/{method}"] + [f"{k}={v}" for k, v in items.items()])


def time_steps(step: Callable[[int], int], warmup: int, timed: int, device: torch.device) -> dict:
    """Run `step(i)` (returns the images it consumed) `warmup` times untimed, then `timed` times timed."""
    for i in range(warmup):
        step(i)
    sync(device)
    tic = time.perf_counter()
    images = sum(step(i) for i in range(warmup, warmup + timed))
    sync(device)
    seconds = time.perf_counter() - tic
    return {"images_per_s": images / seconds, "ms_per_step": 1000 * seconds / timed, "timed_steps": timed,
            "warmup_steps": warmup}


class Trainer:
    """One method with its optimizer: `step(views, batch, i)` is the training loop's own step
    (`kith.train.step.TrainStep`: autocast, channels_last, lr schedule, backward, optimizer, EMA),
    built as the loop builds it (`kith.train.setup`), the same for every feed."""

    def __init__(self, method_name: str, settings: Settings, num_samples: int):
        self.cfg = method_config(method_name, settings)
        self.device = torch.device(settings.device)
        self.steps_per_epoch = max(num_samples // settings.batch_size, 1)
        rng.seed_everything(self.cfg.seed)
        self.train_step = build_trainer(self.cfg, self.device, num_samples, self.steps_per_epoch)
        self.method = self.train_step.method.train()
        self.spec = dataclasses.replace(image_spec(self.cfg.data), size=32)

    def views_of(self) -> list[ViewConfig]:
        return [self.cfg.augment[name] for name in self.method.views]

    def step(self, views: list[torch.Tensor], batch: Batch, i: int) -> int:
        self.train_step.optimize(views, batch, i)
        return batch.labels.shape[0]


def model_only(trainer: Trainer, settings: Settings) -> dict:
    """The training step on synthetic normalised views already on the device."""
    b, dev = settings.batch_size, trainer.device
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(b, 3, 32, 32, generator=gen).to(dev) for _ in trainer.method.views]
    batch = Batch(torch.zeros(b, 3, 32, 32, dtype=torch.uint8, device=dev),
                  torch.randint(0, 10, (b,), generator=gen).to(dev), torch.arange(b, device=dev))
    return time_steps(lambda i: trainer.step(views, batch, i), settings.warmup_steps, settings.timed_steps,
                      dev)


def kith_side(trainer: Trainer, settings: Settings, data_root: Path) -> dict:
    """kith's resident path (the uint8 split on the device, batched augmentation): data only and the
    full step, measured by `kith bench` (kith/tools/bench.py) on the cifar-python folder."""
    cfg = method_config(trainer.cfg.method.name, settings, {"data.path": data_root})
    report = kith_bench(cfg, warmup=settings.warmup_steps, steps=settings.timed_steps)
    timing = {"timed_steps": settings.timed_steps, "warmup_steps": settings.warmup_steps}
    return {"data_only": {"images_per_s": report["data_aug_images_per_s"], **timing},
            "full_step": {"images_per_s": report["full_step_images_per_s"], **timing},
            "kith_bench": report}


def pil_side(trainer: Trainer, train: Split, settings: Settings) -> dict:
    """The peers' pipeline: a DataLoader of per-image PIL transforms (8 workers, pinned memory)."""
    dev = trainer.device
    transforms = [pil_transform(v, trainer.spec) for v in trainer.views_of()]
    images_hwc = train.images.permute(0, 2, 3, 1).contiguous().numpy()
    dataset = PilPairs(images_hwc, train.labels.numpy(), transforms)
    workers = settings.pil_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0)

    def feed() -> Iterator[tuple[list[torch.Tensor], Batch]]:
        for views, labels, idx in cycle(lambda _: iter(loader)):
            views = [v.to(dev, non_blocking=True) for v in views]
            yield views, Batch(views[0], labels.to(dev, non_blocking=True), idx.to(dev, non_blocking=True))

    data = feed()
    out = {"data_only": time_steps(lambda i: next(data)[1].labels.shape[0], settings.warmup_steps,
                                   settings.timed_steps, dev)}

    def full_step(i: int) -> int:
        views, batch = next(data)
        return trainer.step(views, batch, i)

    out["full_step"] = time_steps(full_step, settings.warmup_steps, settings.timed_steps, dev)
    data.close()  # the loader's persistent workers stop when it is collected, on return
    return out


def attempt(what: str, fn: Callable[[], dict], errors: dict[str, str]) -> dict | None:
    """fn(), or None with the error recorded: one failed measurement costs neither the others nor (b)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        errors[what] = f"{type(exc).__name__}: {exc}"
        log(f"  {what} failed: {errors[what]}")
        return None


def measure_method(method_name: str, train: Split, settings: Settings, data_root: Path) -> dict:
    """Images/s of `method_name`'s training step: model only, kith's resident path, the PIL DataLoader."""
    errors: dict[str, str] = {}
    trainer = Trainer(method_name, settings, len(train.labels))
    res: dict = {
        "step_code": "kith.train.step.TrainStep", "kith_side_by": "kith bench"}
    log(f"{method_name}: model only ...")
    res["model_only"] = attempt("model_only", lambda: model_only(trainer, settings), errors)
    log(f"{method_name}: kith resident path (kith bench) ...")
    kith = attempt("kith", lambda: kith_side(trainer, settings, data_root), errors) or {}
    log(f"{method_name}: PIL DataLoader ({settings.pil_workers} workers) ...")
    pil = attempt("pil", lambda: pil_side(trainer, train, settings), errors) or {}
    res.update(kith_data_only=kith.get("data_only"), kith_full_step=kith.get("full_step"),
               pil_data_only=pil.get("data_only"), pil_full_step=pil.get("full_step"))
    if "kith_bench" in kith:
        res["kith_bench"] = kith["kith_bench"]
    measures = ("model_only", "kith_data_only", "kith_full_step", "pil_data_only", "pil_full_step")
    rate = {k: res[k]["images_per_s"] for k in measures if res[k] is not None}
    if "model_only" in rate:
        for side in ("kith", "pil"):
            if f"{side}_full_step" in rate:
                res[f"{side}_efficiency"] = rate[f"{side}_full_step"] / rate["model_only"]
    if "kith_full_step" in rate and "pil_full_step" in rate:
        res["kith_vs_pil"] = rate["kith_full_step"] / rate["pil_full_step"]
    if errors:
        res["errors"] = errors
    log(f"{method_name}: images/s " + ", ".join(f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.3g}"
                                                for k, v in rate.items())
        + (f" | kith/PIL {res['kith_vs_pil']:.2f}x" if "kith_vs_pil" in res else ""))
    return res  # the trainer (and its GPU memory) goes with this frame


# train.cuda_graph, last in (a) and so the first to be cut: the methods whose step is most launch-bound
# (BYOL at the presets' batch; All4One's transformer and neighbour search at any batch)
GRAPHED_METHODS = ("byol", "all4one")
BENCH_KEYS = ("data_aug_images_per_s", "pipeline_efficiency", "flops_per_image", "achieved_tflops",
              "compile_s", "compiled_graphs", "graph_breaks", "recompiles", "fallbacks",
              "recompiles_after_warmup", "peak_memory_gb", "channels_last", "precision",
              "host_syncs_per_full_step", "cuda_graph", "augment_in_graph")


@contextlib.contextmanager
def graph_stand_in(device: str) -> Iterator[str | None]:
    """train.cuda_graph off CUDA (--tiny): the CPU stand-in for the graph (`ReplayCheck`: it reruns the
    step and checks each "replay" against the capture), so the graphed mode's wiring is rehearsed too;
    its name, or None on CUDA (the real graph)."""
    if device.startswith("cuda"):
        yield None
        return
    from kith.train import step as train_step
    from kith.train.graphed import ReplayCheck

    real = train_step.graph_backend
    train_step.graph_backend = lambda dev: ReplayCheck()
    try:
        yield "ReplayCheck (the CPU stand-in: a check of the capture, not a speed)"
    finally:
        train_step.graph_backend = real


def bench_method(method_name: str, settings: Settings, data_root: Path, mode: str) -> dict:
    """`kith bench` of one method on the cifar-python folder: model only (synthetic views on the device),
    full step (resident data + batched augmentation + step), their ratio; `mode` compiled adds the
    torch.compile counters over the bench (warm-up included), graphed runs with train.cuda_graph."""
    extra: dict = {"data.path": data_root}
    if mode == "graphed":  # the augmentation inside the graph too: one launch for the whole step
        extra.update({"train.cuda_graph": "true", "data.augment_rng": "device"})
    if mode == "compiled":
        torch._dynamo.reset()  # every method's forward is one code object: its graphs count per method
        extra.update({"train.compile": "true", "train.compile_backend": settings.compile_backend})
    cfg = method_config(method_name, settings, extra)
    tic = time.perf_counter()
    stand_in = graph_stand_in(settings.device) if mode == "graphed" else contextlib.nullcontext()
    with stand_in as graph:
        report = kith_bench(cfg, warmup=settings.warmup_steps, steps=settings.timed_steps)
    timing = {"timed_steps": settings.timed_steps, "warmup_steps": settings.warmup_steps}
    return {**({"graph": graph} if graph else {}),
            "model_only": {"images_per_s": report["synthetic_step_images_per_s"], **timing},
            "full_step": {"images_per_s": report["full_step_images_per_s"], **timing},
            "efficiency": report["pipeline_efficiency"], "bench_s": time.perf_counter() - tic,
            **{k: report[k] for k in BENCH_KEYS if k in report}}


def measure_throughput(doc: dict, methods: list[str], settings: Settings, data_root: Path, deadline_s: float,
                       out: Path) -> None:
    """(a): every method eager, then compiled, into `doc["throughput"][method][mode]`, the JSON written
    after each. A measurement is skipped (listed in `doc["throughput_skipped"]`) once `deadline_s` of the
    script's wall time has passed, or would pass by the last measurement of its mode's time."""
    doc["throughput"], doc["throughput_skipped"], errors = {}, [], {}
    for mode in ("eager", "compiled", "graphed"):
        last_s = 0.0
        for method in methods if mode != "graphed" else [m for m in GRAPHED_METHODS if m in methods]:
            if elapsed() + last_s > deadline_s:
                doc["throughput_skipped"].append(f"{method} {mode}")
                continue
            if mode == "graphed" and not (settings.device.startswith("cuda") or settings.tiny):
                doc["throughput_skipped"].append(f"{method} {mode} (train.cuda_graph needs CUDA)")
                continue
            log(f"{method} {mode}: kith bench ...")
            tic = time.perf_counter()
            res = attempt(f"{method} {mode}", lambda: bench_method(method, settings, data_root, mode), errors)
            last_s = time.perf_counter() - tic
            doc["throughput"].setdefault(method, {})[mode] = res
            if res is not None:
                counts = (f", graphs {res.get('compiled_graphs')}, breaks {res.get('graph_breaks')}, "
                          f"recompiles {res.get('recompiles')}" if mode == "compiled" else "")
                log(f"  model only {res['model_only']['images_per_s']:,.0f} img/s, full step "
                    f"{res['full_step']['images_per_s']:,.0f} img/s, "
                    f"efficiency {res['efficiency']:.2f}{counts}"
                    + (" (graph: the CPU stand-in, not a speed)" if "graph" in res else ""))
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the last method's cached blocks
            doc["throughput_errors"] = errors
            write_json(doc, out)


def knn_eval_seconds(train: Split, test: Split, settings: Settings) -> float:
    """Wall time of one kNN evaluation (features of both splits + search) of a fresh backbone:
    `kith.pretrain` ends with two of them (trained and random-init backbone)."""
    from kith.nn.backbones import build_backbone

    cfg = method_config("byol", settings)
    dev = torch.device(settings.device)
    spec = dataclasses.replace(image_spec(cfg.data), size=32)
    net, _ = build_backbone(cfg.backbone)
    sync(dev)
    tic = time.perf_counter()
    backbone_knn(net.to(dev), train.image_data(), test.image_data(), spec, dev, KnnSettings.of(cfg.eval))
    sync(dev)
    return time.perf_counter() - tic


# ---- budget ------------------------------------------------------------------------------------
def plan_epochs(budget_s: float, elapsed_s: float, epoch_s: float, eval_s: float, reserve_s: float,
                safety: float, max_epochs: int) -> dict:
    """How many epochs of (b) fit: (budget - elapsed - reserve - 2 kNN evaluations) * (1 - safety)
    over the seconds per epoch, floored, then clamped to [1, max_epochs]."""
    available = budget_s - elapsed_s - reserve_s - 2 * eval_s
    usable = max(available, 0.0) * (1 - safety)
    fit = math.floor(usable / epoch_s) if epoch_s > 0 else max_epochs
    epochs = min(max(fit, 1), max_epochs)
    return {"budget_s": budget_s, "elapsed_before_training_s": elapsed_s, "reserve_s": reserve_s,
            "knn_eval_s": eval_s, "safety": safety, "available_s": available, "usable_s": usable,
            "epoch_s_estimate": epoch_s, "epochs_that_fit": fit, "max_epochs": max_epochs, "epochs": epochs,
            "limited_by": "max_epochs" if fit >= max_epochs else ("minimum of 1" if fit < 1 else "budget")}


def epoch_seconds(images_per_s: float, num_train: int, batch_size: int, overhead: float) -> float:
    """Seconds per epoch of the training loop, from the timed full step (drop_last epochs)."""
    return (num_train // batch_size) * batch_size / images_per_s * overhead


# ---- (b) pretraining ---------------------------------------------------------------------------
def progress_printer(run_dir: Path, every_s: float, stop: threading.Event,
                     on_row: Callable[[dict], None] | None = None) -> threading.Thread:
    """A thread printing the last logged training row every `every_s` seconds (the run's tqdm is off),
    handing it to `on_row` (the JSON's `training_progress`)."""

    def loop() -> None:
        while not stop.wait(every_s):
            rows = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
            if rows:
                r = rows[-1]
                log(f"  epoch {r.get('epoch')} step {r.get('step')} loss {r.get('loss', float('nan')):.4f} "
                    f"lr {r.get('lr', float('nan')):.3f}")
                if on_row is not None:
                    on_row({**r, "at_s": elapsed()})

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def pretrain_byol(data_root: Path, epochs: int, settings: Settings, work: Path, report_every: float,
                  on_row: Callable[[dict], None] | None = None) -> dict:
    import kith

    overrides = {"data.path": str(data_root), "train.batch_size": settings.batch_size, "train.epochs": epochs,
                 "train.device": settings.device, "train.precision": settings.precision,
                 "train.knn_every": 0, "train.checkpoint_every": epochs, "train.progress": "false",
                 "out_dir": str(work / "runs")}
    if settings.tiny:
        overrides.update(tiny_overrides("byol"))
    cfg = build_config(["preset=cifar10/byol"] + [f"{k}={v}" for k, v in overrides.items()])
    run_dir = work / "runs" / "byol"
    log(f"pretraining: kith.pretrain('cifar10/byol', {', '.join(f'{k}={v}' for k, v in overrides.items())})")
    stop = threading.Event()
    thread = progress_printer(run_dir, report_every, stop, on_row) if report_every > 0 else None
    tic = time.perf_counter()
    try:
        result = kith.pretrain("cifar10/byol", run_dir=run_dir, **overrides)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    total = time.perf_counter() - tic
    return {"preset": "cifar10/byol", "overrides": overrides, "epochs": result.epochs,
            "base_lr": cfg.train.lr, "lr_used": cfg.train.lr * cfg.train.batch_size / 256,
            "warmup_epochs": cfg.train.warmup_epochs, "optimizer": cfg.train.optimizer,
            "knn": {str(k): v for k, v in result.knn.items()},
            "knn_random_init": {str(k): v for k, v in result.knn_random_init.items()},
            "knn_k": list(cfg.eval.knn_k), "knn_temperature": cfg.eval.knn_temperature,
            "train_loop_s": result.wall_time_s, "images_per_s": result.images_per_s, "pretrain_call_s": total,
            "seconds_per_epoch": result.wall_time_s / max(result.epochs, 1), "run_dir": str(run_dir),
            "_run_dir": run_dir}


def lightly_reference() -> dict | None:
    """The preset's reference for lightly's CIFAR-10 kNN benchmark (metric knn@200)."""
    from omegaconf import OmegaConf

    refs = OmegaConf.to_container(build_config(["preset=cifar10/byol"]).reference)
    return next((r for r in refs if r["metric"] == "knn@200"), None)


# ---- main --------------------------------------------------------------------------------------
def device_info(settings: Settings) -> dict:
    import torchvision

    dev = torch.device(settings.device)
    info = {"type": dev.type, "name": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=torch.cuda.get_device_name(dev), memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


_JSON_LOCK = threading.Lock()  # the progress thread of (b) writes too


def write_json(doc: dict, out: Path) -> None:
    with _JSON_LOCK:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(out / RESULT_FILE)


def method_list(text: str) -> list[str]:
    """`--methods`: `all` is every registered method, BYOL first (its numbers plan (b))."""
    from kith.methods import METHODS

    if text == "all":
        return sorted(METHODS, key=lambda m: (m != "byol", m))
    return [m for m in text.split(",") if m]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / ".gpu-data" / "cifar10-jpeg.npz",
                   help="the CIFAR-10 JPEG pack (.npz); --tiny uses random images when it is absent")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {RESULT_FILE}")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of this script "
                   "(default 330; --tiny: 120)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run of the same logic, in seconds")
    p.add_argument("--methods", default="all", help="methods of the throughput part (a), comma-separated "
                   "(all: every registered one, BYOL first)")
    p.add_argument("--pil", action="store_true", help="also time BYOL fed by the PIL DataLoader")
    p.add_argument("--skip-train", action="store_true", help="part (a) only")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh temp folder, "
                   "removed at the end)")
    p.add_argument("--report-every", type=float, default=None, help="seconds between progress lines of (b)")
    for name in ("batch_size", "pil_workers", "warmup_steps", "timed_steps", "max_epochs", "num_train",
                 "num_test"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--compile-backend", default=None)
    for name in ("reserve_s", "safety", "epoch_overhead", "throughput_share"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.for_mode(args.tiny, args)
    budget = args.budget_s if args.budget_s is not None else (120.0 if args.tiny else 330.0)
    report_every = args.report_every if args.report_every is not None else (0.0 if args.tiny else 30.0)
    if not args.tiny and args.device is None and not settings.device.startswith("cuda"):
        print("gpu_cifar: no CUDA device visible; this is the GPU run (--tiny: the CPU smoke run; "
              "--device cpu: the real networks on the CPU, slowly)", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)  # a loaded 2-core CI machine: intra-op threads only fight each other
    work = args.work or Path(tempfile.mkdtemp(prefix="kith-gpu-"))
    command = "python benchmarks/gpu_cifar.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc: dict = {"benchmark": "gpu_cifar",
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
                 "tiny": args.tiny, "device": device_info(settings), "settings": asdict(settings),
                 "images_per_s_counts": "source images per second; each source image gives two views",
                 "reference": lightly_reference()}
    log(f"device {doc['device']['name']} ({settings.device}), torch {torch.__version__}, "
        f"budget {budget:.0f} s")

    tic = time.perf_counter()
    if args.data.is_file():
        train, test = load_pack(args.data, settings.num_train, settings.num_test)
        source = str(args.data)
    elif args.tiny:
        train, test = random_pack(settings.num_train or 320, settings.num_test or 160)
        source = "random images (pack absent)"
    else:
        print(f"gpu_cifar: CIFAR-10 pack not found at '{args.data}'; run benchmarks/gpu_prepare.sh and copy "
              ".gpu-data", file=sys.stderr)
        return 2
    data_root = write_cifar_python(train, test, work / "data")
    doc["data"] = {"source": source, "num_train": len(train.labels), "num_test": len(test.labels),
                   "decode_and_write_s": time.perf_counter() - tic,
                   "layout": "cifar-python (kith data.name=cifar10)"}
    log(f"data: {len(train.labels)} train / {len(test.labels)} test images from {source} "
        f"in {doc['data']['decode_and_write_s']:.1f} s")

    tic = time.perf_counter()
    doc["budget_s"] = budget
    deadline = budget * settings.throughput_share
    measure_throughput(doc, method_list(args.methods), settings, data_root, deadline, args.out)
    if args.pil:
        doc["pil"] = {"byol": measure_method("byol", train, settings, data_root)}
    doc["wall"] = {"throughput_s": time.perf_counter() - tic}
    write_json(doc, args.out)

    if not args.skip_train:
        tic = time.perf_counter()
        eval_s = knn_eval_seconds(train, test, settings)
        byol = (doc["throughput"].get("byol") or {}).get("eager") or \
            attempt("byol eager", lambda: bench_method("byol", settings, data_root, False), {}) or {}
        # the loop's own path, else the model's ceiling
        timing = byol.get("full_step") or byol.get("model_only")
        if timing is None:
            print("gpu_cifar: no BYOL step could be timed; see the errors in the JSON", file=sys.stderr)
            return 1
        ips = timing["images_per_s"]
        epoch_s = epoch_seconds(ips, len(train.labels), settings.batch_size, settings.epoch_overhead)
        plan = plan_epochs(budget, elapsed(), epoch_s, eval_s, settings.reserve_s, settings.safety,
                           settings.max_epochs)
        doc["budget"] = plan
        doc["wall"]["planning_s"] = time.perf_counter() - tic
        log(f"budget: {plan['available_s']:.0f} s left after {plan['elapsed_before_training_s']:.0f} s, "
            f"reserve "
            f"{settings.reserve_s:.0f} s and 2 kNN evaluations of {eval_s:.1f} s; {epoch_s:.2f} s per epoch "
            f"-> {plan['epochs']} epochs ({plan['limited_by']}; lightly's budget is {LIGHTLY_EPOCHS})")
        write_json(doc, args.out)
        tic = time.perf_counter()
        def on_row(row: dict) -> None:
            doc["training_progress"] = row
            write_json(doc, args.out)

        training = pretrain_byol(data_root, plan["epochs"], settings, work, report_every, on_row)
        run_dir = training.pop("_run_dir")
        training["seconds_per_epoch_estimate"] = epoch_s  # vs seconds_per_epoch: tunes --epoch-overhead
        doc["wall"]["training_s"] = time.perf_counter() - tic
        doc["training"] = training
        knn200 = training["knn"].get("200")
        ref = doc["reference"] or {}
        line = (f"kNN@200 (k=200, T={training['knn_temperature']}, weighted): "
                f"{knn200 if knn200 is None else f'{knn200:.2f}'} after {training['epochs']} epochs "
                f"(random init {training['knn_random_init'].get('200', float('nan')):.2f}) | published: "
                f"{ref.get('value')} at {ref.get('epochs')} epochs, {ref.get('source')}")
        doc["summary"] = line
        log(line)
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copy(run_dir / "metrics.jsonl", args.out / "byol_metrics.jsonl")
    doc["wall"]["total_s"] = elapsed()
    doc["wall"]["over_budget_s"] = max(elapsed() - budget, 0.0)
    write_json(doc, args.out)
    log(f"wrote {args.out / RESULT_FILE} (total {elapsed():.0f} s of a {budget:.0f} s budget)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
