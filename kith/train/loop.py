"""The training loop: `run_training`, readable top to bottom, and the few steps it is made of.

data -> batched augmentation -> method.training_step -> backward -> optimizer -> EMA update,
with warmup+cosine lr, autocast, checkpoints, metrics.jsonl, an online kNN monitor and exact
resume. It never looks at which method it is training. What it trains with comes from
`kith.train.setup`, the step from `kith.train.step`, where it stands (the loop part of a checkpoint)
is a `kith.train.state.LoopState`, and when and how checkpoints are written and restored is the
`kith.train.checkpointer.Checkpointer`'s; the run folder (config, metrics, checkpoints) is in
`kith.runs`, the random streams in `kith.utils.rng`. `kith.pretrain` (kith.api) is the public
entry point.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from kith.config import to_yaml
from kith.data.augment import clean_view
from kith.data.images import ImageData
from kith.data.loader import iter_images
from kith.data.spec import image_spec
from kith.evaluation.probe import KnnSettings, backbone_knn
from kith.methods.base import Method
from kith.methods.context import EpochContext
from kith.runs.files import atomic_write_text
from kith.runs.folder import check_run_dir, default_run_dir, open_run_dir, write_skipped_images
from kith.runs.metrics import MetricsLog
from kith.train.checkpointer import Checkpointer
from kith.train.finish import finish_run, finished_summary
from kith.train.setup import Setup, run_device, setup
from kith.train.state import LoopState
from kith.train.step import TrainStep
from kith.utils import distributed as dist
from kith.utils.progress import show_progress
from kith.utils.signals import check_stop, stop_on_signals


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean of each metric over the steps that know it: None or NaN marks a step where a metric is
    unknown (e.g. no labelled sample), and a metric no step knows is left out. The loss keeps a
    plain mean, so a NaN loss is never hidden from the divergence check. All the means are read
    from the device at once (one sync per log row)."""
    values: dict[str, list] = defaultdict(list)
    for row in rows:
        for k, v in row.items():
            if v is not None:
                values[k].append(v.detach().float().reshape(()) if torch.is_tensor(v) else float(v))
    if not values:
        return {}
    device = next((x.device for v in values.values() for x in v if torch.is_tensor(x)), torch.device("cpu"))
    stacked = {k: torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device) for x in v])
               for k, v in values.items()}
    means = torch.stack([x.mean() if k == "loss" else x.nanmean() for k, x in stacked.items()]).tolist()
    return {k: v for k, v in zip(stacked, means) if k == "loss" or not math.isnan(v)}


@dataclass
class RunResult:
    run_dir: Path
    knn: dict[int, float]
    knn_random_init: dict[int, float]
    epochs: int
    wall_time_s: float
    images_per_s: float
    method: Method


# ---- the loop -------------------------------------------------------------------------------
@stop_on_signals()  # SIGINT/SIGTERM stop the run as Ctrl-C does, from before the folder or lock exists
def run_training(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False,
                 stop_after_epoch: int | None = None, final_eval: bool = True, overwrite: bool = False,
                 stop_after_step: int | None = None, checkpointer: Checkpointer | None = None) -> RunResult:
    """Train `cfg.method` on `cfg.data`; write config.yaml, metrics.jsonl, checkpoints/last.pt, summary.json.

    `resume=True` continues from `run_dir/checkpoints/last.pt`, at an epoch end or inside an epoch;
    keys of `cfg` that differ from the checkpoint's config must be in `kith.runs.resume.RESUMABLE_KEYS` (they
    take effect and are logged as a `resume` row). Without `resume`, a folder that already holds a run
    is refused unless `overwrite` (which deletes that run's files). The folder is created only once the
    config and data are valid, and locked while the run writes it. `stop_after_epoch` ends the run
    early after that many epochs, `stop_after_step` after that global step (writing a checkpoint
    there, mid-epoch if it falls inside one); the schedule still spans `train.epochs`. `checkpointer`
    (default: a new `Checkpointer`) decides, writes and restores the checkpoints.
    """
    device = run_device(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if resume or dist.is_main_process():
        check_run_dir(run_dir, resume, overwrite)  # fail before the data is loaded; again under the lock
    parts = setup(cfg, device, list_dir=cfg.out_dir)
    checkpointer = checkpointer or Checkpointer()
    with ExitStack() as stack:  # the run folder's lock, released however the run ends
        open_run_dir(stack, run_dir, resume, overwrite, device)  # only now: a failed start leaves no folder
        state = LoopState(parts.steps_per_epoch)
        checkpointer.begin(cfg, run_dir, parts.trainer)
        changed = checkpointer.restore(state) if resume else None
        if dist.is_main_process():  # after the checkpoint loaded: a failed resume keeps the old config
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg), inside=run_dir)
        log = _start_log(cfg, run_dir, parts, state, changed)
        ctx = EpochContext(partial(_clean_batches, cfg, parts.train_data, device), parts.train_data.labels,
                           cfg.train.progress)
        run = _Run(cfg, parts, log, checkpointer, ctx, stop_after_step)
        end_epoch = min(cfg.train.epochs, stop_after_epoch) if stop_after_epoch else cfg.train.epochs
        finished = (finished_summary(run_dir, state.epoch, cfg.eval.knn_k)
                    if resume and final_eval and state.epoch >= cfg.train.epochs else None)
        if finished is not None:  # nothing left to train: report the run as it ended
            dist.print0(f"kith: the run in {run_dir} finished its {state.epoch} epochs; its summary stands")
            return _finished_result(run_dir, finished, parts.trainer.method)
        while state.epoch < end_epoch:
            stopped, due = _train_epoch(run, state)
            if stopped or _end_epoch(run, state, due, end_epoch):
                break
        if parts.trainer.compiled:  # this process's compile counters over all its steps
            log.write({"kind": "compile_total", "step": state.step, **parts.trainer.compile_report()})
        # over the whole run, resumed parts included
        images_per_s = state.images_seen / state.elapsed if state.elapsed > 0 else 0.0
        knn, knn_random = finish_run(run_dir, cfg, parts.trainer.method.backbone, parts.train_data,
                                     parts.test_data, device, log, state.step, state.epoch, state.elapsed,
                                     images_per_s, final_eval, run.summary, run.last_knn)
        dist.barrier()
    return RunResult(run_dir, knn, knn_random, state.epoch, state.elapsed, images_per_s, parts.trainer.method)


def _finished_result(run_dir: Path, summary: dict, method) -> RunResult:
    def by_k(values: dict) -> dict[int, float]:
        return {int(k): v for k, v in (values or {}).items()}
    return RunResult(run_dir, by_k(summary["knn"]), by_k(summary.get("knn_random_init")), summary["epochs"],
                     summary.get("wall_time_s", 0.0), summary.get("images_per_s", 0.0), method)


@dataclass
class _Run:
    """What the parts of one run's loop share besides its `LoopState`."""

    cfg: DictConfig
    parts: Setup
    log: MetricsLog
    checkpointer: Checkpointer
    ctx: EpochContext
    stop_after_step: int | None
    compile_logged: bool = False  # the compile row is written once per process
    summary: dict = field(default_factory=dict)  # keys for summary.json (the online linear accuracy)
    last_knn: tuple[int, dict] | None = None  # (step, kNN) of the last monitor pass: the final kNN reuses it

    @property
    def trainer(self) -> TrainStep:
        return self.parts.trainer


class _EpochTimer:
    """An epoch's training seconds: the wall time since it began, less the compiling step's."""

    def __init__(self) -> None:
        self.tic = time.perf_counter()
        self.compile_s = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.tic - self.compile_s


def _start_log(cfg: DictConfig, run_dir: Path, parts: Setup, state: LoopState,
               changed: dict[str, dict] | None) -> MetricsLog:
    """metrics.jsonl and its first row: `resume` with the `changed` config keys (a resumed run, whose
    rows after the checkpoint are dropped), else `start`."""
    log = MetricsLog(run_dir / "metrics.jsonl", keep_until_step=state.step if changed is not None else None,
                     logger=cfg.train.logger, config=cfg)
    if changed is not None:
        log.write({"kind": "resume", "step": state.step, "epoch": state.epoch, "changed": changed})
        return log
    row = {"kind": "start", "step": 0, "method": cfg.method.name, "data": cfg.data.name,
           "num_train": len(parts.train_data), "num_test": len(parts.test_data), "world_size": parts.world,
           "device": str(parts.device)}
    if cfg.data.skip_bad_images:
        row["skipped_images"] = write_skipped_images(run_dir, parts.train_data, parts.test_data)
    log.write(row)
    return log


def _clean_batches(cfg: DictConfig, data: ImageData, device: torch.device) -> Iterator[tuple]:
    """The un-augmented training set, for `EpochContext.clean_batches`."""
    spec = image_spec(cfg.data)
    for b in iter_images(data, cfg.eval.batch_size, device, spec.size):
        yield clean_view(b.images, spec), b.labels, b.indices


def _start_epoch(run: _Run, state: LoopState) -> None:
    """The method's epoch start (e.g. SPCL's clustering, logged as an `epoch_start` row), or, resumed
    inside an epoch, its resume hook: that epoch has started already."""
    method = run.trainer.method
    method.train()
    if state.mid_epoch:
        method.on_resume_mid_epoch(state.epoch, run.ctx)
        return
    metrics = method.on_epoch_start(state.epoch, run.ctx)
    if metrics:
        run.log.write({"kind": "epoch_start", "step": state.step, "epoch": state.epoch, **metrics})


def _train_epoch(run: _Run, state: LoopState) -> tuple[bool, bool]:
    """Train what is left of epoch `state.epoch`. Returns `(stopped, due)`: whether the run stopped
    inside it (at `stop_after_step`, checkpointed), and whether a timed checkpoint fell due at its last
    metrics row (an epoch end checkpoints in `_end_epoch`, after the kNN monitor)."""
    t, trainer, first = run.cfg.train, run.trainer, state.epoch_step
    _start_epoch(run, state)
    bar = tqdm(run.parts.loader.epoch(state.epoch, first), total=state.steps_per_epoch, initial=first,
               desc=f"epoch {state.epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True,
               disable=not (show_progress(t.progress) and dist.is_main_process()))
    timer, due = _EpochTimer(), False
    for batch in bar:
        check_stop()  # a stop signal whose KeyboardInterrupt a finaliser swallowed
        loss, metrics, tau = trainer(batch, state.step)
        state.step += 1
        state.epoch_step += 1
        state.images_seen += batch.images.shape[0] * run.parts.world
        state.pending.append({"loss": loss, **metrics})
        _log_compile(run, state, timer)
        due = False
        if state.step % t.log_every == 0 or state.epoch_step == state.steps_per_epoch:
            _log_train_row(run, state, tau, bar)
            due = run.checkpointer.time_due()
        if state.epoch_step < state.steps_per_epoch:
            stopped = state.step == run.stop_after_step
            if due or stopped:
                run.checkpointer.write(state, state.elapsed + timer.seconds())
            if stopped:
                state.elapsed += timer.seconds()
                return True, due
    state.elapsed += timer.seconds()
    return False, due


def _log_compile(run: _Run, state: LoopState, timer: _EpochTimer) -> None:
    """The compiling step's row, once: its time goes there, not into images/s."""
    trainer = run.trainer
    if trainer.compile_s is None or run.compile_logged:
        return
    run.log.write({"kind": "compile", "step": state.step, "compile_s": trainer.compile_s,
                   **trainer.compile_report()})
    run.compile_logged, timer.compile_s = True, trainer.compile_s


def _log_train_row(run: _Run, state: LoopState, tau: float | None, bar: tqdm) -> None:
    """The `train` row: the mean metrics of the steps since the last row. The loss is checked here, not
    every step, to avoid a device sync per step; no checkpoint is written before this check, so a
    diverged run never overwrites the last good one."""
    row = _mean_metrics(state.pending)
    state.pending = []
    if not math.isfinite(row["loss"]):
        raise run.checkpointer.diverged(f"loss became {row['loss']}", state.step, state.epoch + 1)
    row.update(kind="train", step=state.step, epoch=state.epoch + 1,
               lr=float(run.trainer.optimizer.param_groups[0]["lr"]))  # a tensor under train.cuda_graph
    if tau is not None:
        row["tau"] = tau
    run.log.write(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}")


def _end_epoch(run: _Run, state: LoopState, due: bool, end_epoch: int) -> bool:
    """After an epoch's last step: the kNN monitor, then the checkpoint when one is due (timed, every
    `train.checkpoint_every` epochs, the run's last epoch, a stop). Returns whether the run stops."""
    state.epoch, state.epoch_step = state.epoch + 1, 0
    _monitor_knn(run, state)
    _monitor_online_linear(run, state)
    stopped = state.step == run.stop_after_step
    done = state.epoch
    if due or stopped or done % run.cfg.train.checkpoint_every == 0 or done == end_epoch:
        run.checkpointer.write(state, state.elapsed)
    return stopped


def _monitor_knn(run: _Run, state: LoopState) -> None:
    """The online kNN monitor of the backbone every `train.knn_every` epochs and after the last (with
    test labels only). Every rank embeds its share of the data (rank 0 logs): a rank that waited for
    rank 0 to embed it all could hit NCCL's collective timeout on a large dataset."""
    cfg, parts, done = run.cfg, run.parts, state.epoch
    t = cfg.train
    if not (t.knn_every and (done % t.knn_every == 0 or done == t.epochs) and parts.test_data.has_labels):
        return
    # after the last epoch the weights are final: one pass for the monitor and every final k
    ks = sorted({cfg.eval.monitor_k, *(cfg.eval.knn_k if done == t.epochs else [])})
    knn = backbone_knn(parts.trainer.method.backbone, parts.train_data, parts.test_data, image_spec(cfg.data),
                       parts.device, KnnSettings.of(cfg.eval, ks, t.progress))
    run.last_knn = (state.step, knn)
    run.log.write({"kind": "knn", "step": state.step, "epoch": done,
                   **{f"knn_top1@{k}": v for k, v in knn.items()}})
    top1 = knn.get(cfg.eval.monitor_k, float("nan"))
    dist.print0(f"epoch {done}: kNN@{cfg.eval.monitor_k} top-1 {top1:.2f}")


def _monitor_online_linear(run: _Run, state: LoopState) -> None:
    """train.online_linear's classifier on the clean test images, every epoch, on rank 0 (with test
    labels only): an `online_linear` row, and the last one's accuracy in summary.json."""
    parts, online = run.parts, run.trainer.online
    if online is None or not parts.test_data.has_labels or not dist.is_main_process():
        return
    top1 = online.evaluate(parts.trainer.method.backbone, parts.test_data, image_spec(run.cfg.data),
                           parts.device, run.cfg.eval.batch_size)
    run.log.write({"kind": "online_linear", "step": state.step, "epoch": state.epoch,
                   "online_linear_top1": top1})
    run.summary["online_linear_top1"] = top1
