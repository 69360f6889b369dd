"""`kith bench`: where a training step's time goes, in images per second.

Three timings of the same `TrainStep` the training loop uses (`kith.train`), each after its own
warm-up steps (never timed):

- `data_aug`: the loader's batches and their augmented views, nothing else;
- `synthetic_step`: forward + backward + optimizer + EMA on fixed random views of the same shapes
  (no data, no augmentation): what the model alone allows;
- `full_step`: both, as the loop runs them.

`pipeline_efficiency = full / synthetic` (per round, median over rounds): 1.0 when data and
augmentation cost nothing next to the model. FLOPs come from `torch.utils.flop_counter.FlopCounterMode`
over one eager forward + backward of the step (both views, momentum forwards included; the
optimizer's elementwise work is not counted), divided by the batch size; achieved TFLOP/s = FLOPs per
image x images/s. Images are source images: one image with its two views counts once, as in the
loop's images/s.

With `method.extra_views` (multi-crop) the same config is benchmarked again without them, and the
report's `multicrop` block sets the multi-crop step beside the 2-view step: the ratio of their step
times (full and synthetic), of their FLOPs per image, and of the pixels of all their views.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from kith.data.loader import Batch, ResidentLoader
from kith.train.graphed import WARMUP_STEPS
from kith.train.setup import Setup, setup
from kith.train.step import TrainStep, compile_stats
from kith.utils.device import resolve_device
from kith.utils.errors import UserError

__all__ = ["bench", "device_name"]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (else platform.processor())."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[int], object], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of fn(i); the device is drained before the clock starts and before it
    stops, so queued kernels count where they run."""
    _sync(device)
    tic = time.perf_counter()
    for i in range(steps):
        fn(i)
    _sync(device)
    return time.perf_counter() - tic


def _endless(loader) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def _flops_per_step(trainer: TrainStep, views: list[torch.Tensor], batch: Batch, step: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # the eager method: a compiled graph's kernels are invisible to the counter
        loss, _ = trainer.forward(views, batch, step, model=trainer.method)
        loss.backward()
    trainer.method.after_step()  # the queue pushes it recorded: the next forward refuses pending ones
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class _Phases:
    """The three timed phases of one trainer. They share the batch stream and the step counter (the
    lr schedule's and the augmentation stream's step), as the loop's steps would."""

    def __init__(self, trainer: TrainStep, loader, seed: int):
        self.trainer = trainer
        self.batches = _endless(loader)
        self.first = next(self.batches)
        # the synthetic step: the first batch's labels and indices, fixed random views of the real shapes
        real_views = trainer.views(self.first, 0)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # in the real views' dtype and layout (bf16 channels_last under autocast on a conv net)
        self.fake_views = [torch.empty_like(v).copy_(torch.randn(v.shape, generator=gen)) for v in real_views]
        self.step = 0

    @property
    def batch_size(self) -> int:
        return self.first.images.shape[0]

    def by_name(self) -> dict[str, Callable[[int], None]]:
        return {"data_aug": self.data_aug, "synthetic_step": self.synthetic, "full_step": self.full}

    def data_aug(self, i: int) -> None:
        self.trainer.views(next(self.batches), i)

    def synthetic(self, i: int) -> None:
        self.trainer.optimize(self.fake_views, self.first, self.step)
        self.step += 1

    def full(self, i: int) -> None:
        self.trainer(next(self.batches), self.step)
        self.step += 1


def bench(cfg: DictConfig, warmup: int = 5, steps: int = 20, rounds: int = 1) -> dict:
    """Time data+augmentation, the synthetic step and the full step of `cfg` (`rounds` times each, in
    turn; images/s are the medians over the rounds); returns the JSON-ready report."""
    if warmup < 0 or steps < 1 or rounds < 1:
        raise UserError(f"kith bench needs --steps >= 1, --rounds >= 1 and --warmup >= 0, got --steps "
                        f"{steps} --rounds {rounds} --warmup {warmup}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("kith bench measures one process; run it without torchrun")
    if cfg.train.compile:
        warmup = max(warmup, 1)  # the first step compiles: never time it
    if cfg.train.cuda_graph:  # eager steps, then the capture: time only replays
        warmup = max(warmup, WARMUP_STEPS + 1)
    parts = setup(cfg, resolve_device(cfg.train.device))
    trainer, device = parts.trainer, parts.device
    trainer.method.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = _Phases(trainer, parts.loader, cfg.seed)
    flops = _flops_per_step(trainer, phases.fake_views, phases.first, 0)
    for fn in phases.by_name().values():  # warm-up: allocator, cuDNN autotuning, compilation (first step)
        for i in range(warmup):
            fn(i)
    frames_after_warmup = compile_stats()["frames_compiled"] if cfg.train.compile else 0
    # rounds of the three timings in turn: on a shared machine each round sees about the same load,
    # so the ratios of the medians hold better than one long run per phase
    per_round: dict[str, list[float]] = {name: [] for name in phases.by_name()}
    for _ in range(rounds):
        for name, fn in phases.by_name().items():
            per_round[name].append(steps * phases.batch_size / _timed(fn, steps, device))
    report = _report(cfg, parts, phases.batch_size, flops, per_round, {"warmup": warmup, "steps": steps,
                                                                       "rounds": rounds})
    if cfg.train.compile:  # counted over the whole bench, warm-up included, and after the warm-up alone
        report.update(trainer.compile_report(),
                      recompiles_after_warmup=compile_stats()["frames_compiled"] - frames_after_warmup)
    report["host_syncs_per_full_step"] = host_syncs_per_step(phases.full, min(steps, 5), device, start=warmup)
    if cfg.method.extra_views:
        report["multicrop"] = _multicrop(cfg, report, phases, warmup, steps, rounds)
    return report


def host_syncs_per_step(fn: Callable[[int], object], steps: int, device: torch.device, start: int = 0
                        ) -> float | None:
    """The synchronizing CUDA operations per call of `fn` (a step: loader, augmentation, forward,
    backward, optimizer, EMA), counted by CUDA's sync debug mode over `steps` calls; None off CUDA. A
    step that reads nothing back to the host scores 0: the CPU can run ahead of the GPU."""
    if device.type != "cuda":
        return None
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(start, start + steps):
                fn(i)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def _multicrop(cfg: DictConfig, report: dict, phases: _Phases, warmup: int, steps: int, rounds: int
               ) -> dict:
    """The multi-crop step beside the 2-view step of the same config (benchmarked here without extra
    views)."""
    two_cfg = copy.deepcopy(cfg)  # keeps the typed sections
    OmegaConf.set_readonly(two_cfg, False)
    two_cfg.method.extra_views = []
    OmegaConf.set_readonly(two_cfg, True)
    two = bench(two_cfg, warmup, steps, rounds)
    pixels = [v.shape[0] * v.shape[-2] * v.shape[-1] for v in phases.fake_views]  # all crops of the step
    keys = ("full_step_images_per_s", "synthetic_step_images_per_s", "flops_per_image")
    b = phases.batch_size
    return {"extra_views": list(cfg.method.extra_views),
            "crop_sizes": [v.shape[-1] for v in phases.fake_views for _ in range(v.shape[0] // b)],
            "step_time_ratio": two["full_step_images_per_s"] / report["full_step_images_per_s"],
            "synthetic_time_ratio": two["synthetic_step_images_per_s"]
            / report["synthetic_step_images_per_s"],
            "flops_ratio": report["flops_per_image"] / two["flops_per_image"],
            "pixel_ratio": sum(pixels) / sum(pixels[:2]),
            "two_view": {k: two[k] for k in keys}}


def _report(cfg: DictConfig, parts: Setup, batch_size: int, flops: int, per_round: dict[str, list[float]],
            counts: dict[str, int]) -> dict:
    """The JSON-ready report: the setup, the medians of `per_round` (images/s) and what follows from them."""
    t, trainer, device = cfg.train, parts.trainer, parts.device
    rates = {name: statistics.median(r) for name, r in per_round.items()}
    flops_per_image = flops / batch_size
    return {
        "preset": cfg.preset, "method": cfg.method.name, "backbone": cfg.backbone.name, "data": cfg.data.name,
        "image_size": cfg.data.size, "batch_size": batch_size, "views": list(trainer.method.views),
        "resident": isinstance(parts.loader, ResidentLoader),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "precision": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
        "channels_last": trainer.channels_last, "compile": bool(t.compile),
        "compile_mode": t.compile_mode if t.compile else None,
        "compile_augment": bool(t.compile_augment), "cuda_graph": bool(t.cuda_graph),
        "augment_rng": cfg.data.augment_rng, "augment_in_graph": trainer.augment_in_graph,
        **counts,
        "data_aug_images_per_s": rates["data_aug"],
        "synthetic_step_images_per_s": rates["synthetic_step"],
        "full_step_images_per_s": rates["full_step"],
        # per round, then the median: a round's two timings ran under the same load
        "pipeline_efficiency": statistics.median(f / s for f, s in zip(per_round["full_step"],
                                                                       per_round["synthetic_step"])),
        "flops_per_image": flops_per_image,
        "achieved_tflops": flops_per_image * rates["full_step"] / 1e12,
        "synthetic_tflops": flops_per_image * rates["synthetic_step"] / 1e12,
        "per_round_images_per_s": per_round,
        "compile_s": trainer.compile_s,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def summary_line(r: dict) -> str:
    """One human line of a bench report."""
    return (f"{r['method']} {r['backbone']} {r['data']} batch {r['batch_size']} on {r['device_name']} "
            f"({r['precision']}): data+aug {r['data_aug_images_per_s']:.0f} img/s, synthetic step "
            f"{r['synthetic_step_images_per_s']:.0f} img/s, "
            f"full step {r['full_step_images_per_s']:.0f} img/s, "
            f"efficiency {r['pipeline_efficiency']:.2f}, {r['flops_per_image'] / 1e9:.2f} GFLOP/image, "
            f"{r['achieved_tflops']:.2f} TFLOP/s"
            + (f", {r['host_syncs_per_full_step']:g} host syncs per step"
               if r.get("host_syncs_per_full_step") is not None else "")
            + (f"; multi-crop step {r['multicrop']['step_time_ratio']:.2f}x the 2-view step's time "
               f"({r['multicrop']['flops_ratio']:.2f}x its FLOPs)" if "multicrop" in r else ""))
