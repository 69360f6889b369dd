"""The training loop: one function, `run_training`, readable top to bottom.

data -> batched augmentation -> method.training_step -> backward -> optimizer -> EMA update,
with warmup+cosine lr, autocast, checkpoints, metrics.jsonl, an online kNN monitor and exact
resume. It never looks at which method it is training. The optimizer and schedule are in
`kith.train.optim`, the step in `kith.train.step`, the run folder (config, metrics, checkpoints)
in `kith.runs`, the random streams in `kith.utils.rng`; `kith.pretrain` (kith.api) is the public
entry point.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from kith.config import to_yaml
from kith.data.augment import clean_view
from kith.data.loader import iter_images, make_train_loader
from kith.data.sources import load_splits
from kith.data.spec import image_spec
from kith.evaluation.probe import KnnSettings, backbone_knn
from kith.methods.base import Method
from kith.methods.context import EpochContext, TrainInfo
from kith.runs.checkpoint import CHECKPOINT, load_checkpoint, non_finite_keys, save_checkpoint
from kith.runs.files import atomic_write_text
from kith.runs.folder import check_run_dir, default_run_dir, open_run_dir, write_skipped_images
from kith.runs.metrics import MetricsLog
from kith.runs.resume import resume_changes
from kith.train.finish import finish_run
from kith.train.optim import load_optimizer_state
from kith.train.setup import build_method
from kith.train.step import TrainStep, compile_stats
from kith.utils import distributed as dist
from kith.utils import rng
from kith.utils.device import resolve_device
from kith.utils.errors import UserError


def _diverged(what: str, step: int, epoch: int, ckpt_path: Path, saved_epoch: int | str | None,
              checkpoint_every: int) -> UserError:
    """The one-line error of a diverged run; it names the checkpoint only when one exists."""
    kept = (f"the last good checkpoint is kept at '{ckpt_path}' (epoch {saved_epoch})"
            if saved_epoch is not None
            else f"no checkpoint was written yet (the first is due after epoch {checkpoint_every})")
    return UserError(f"{what} by step {step} (epoch {epoch}); lower train.lr or set train.precision=fp32; "
                     f"{kept}")


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
def run_training(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False,
                 stop_after_epoch: int | None = None, final_eval: bool = True,
                 overwrite: bool = False, stop_after_step: int | None = None) -> RunResult:
    """Train `cfg.method` on `cfg.data`; write config.yaml, metrics.jsonl, checkpoints/last.pt, summary.json.

    `resume=True` continues from `run_dir/checkpoints/last.pt`, at an epoch end or inside an epoch;
    keys of `cfg` that differ from the checkpoint's config must be in `kith.runs.resume.RESUMABLE_KEYS` (they
    take effect and are logged as a `resume` row). Without `resume`, a folder that already holds a run
    is refused unless `overwrite` (which deletes that run's files). The folder is created only once the
    config and data are valid, and locked while the run writes it. `stop_after_epoch` ends the run
    early after that many epochs, `stop_after_step` after that global step (writing a checkpoint
    there, mid-epoch if it falls inside one); the schedule still spans `train.epochs`.
    """
    with ExitStack() as stack:  # the run folder's lock, released however the run ends
        return _run_training(stack, cfg, run_dir, resume, stop_after_epoch, final_eval, overwrite,
                             stop_after_step)


def _run_training(stack: ExitStack, cfg: DictConfig, run_dir: str | Path | None, resume: bool,
                  stop_after_epoch: int | None, final_eval: bool, overwrite: bool,
                  stop_after_step: int | None) -> RunResult:
    t = cfg.train
    device = dist.setup_from_env() or resolve_device(t.device)
    rank, world = dist.rank(), dist.world_size()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    ckpt_path = run_dir / CHECKPOINT
    if resume or dist.is_main_process():
        check_run_dir(run_dir, resume, overwrite)  # fail before the data is loaded; again under the lock

    rng.seed_everything(cfg.seed)
    train_data, test_data = load_splits(cfg.data, cfg.seed, list_dir=cfg.out_dir)
    loader, train_data = make_train_loader(train_data, cfg, device, cfg.seed, rank, world)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size={t.batch_size} leaves no full batch of the "
                        f"{len(train_data)} images")
    spec = image_spec(cfg.data)
    info = TrainInfo(num_samples=len(train_data), steps_per_epoch=steps_per_epoch, epochs=t.epochs,
                     seed=cfg.seed)
    trainer = TrainStep(cfg, build_method(cfg, info), device, steps_per_epoch, rank, world)
    method, optimizer, scaler = trainer.method, trainer.optimizer, trainer.scaler

    open_run_dir(stack, run_dir, resume, overwrite, device)  # only now: a failed start leaves no folder
    # `start` > 0: the checkpoint was written inside epoch `start_epoch`, after its step `start`;
    # `pending`: the steps since the last metrics row, so the next row averages the same steps
    start_epoch, start, step, elapsed, images_seen, pending, changed = 0, 0, 0, 0.0, 0, [], {}
    saved_epoch: int | str | None = None  # the checkpoint on disk, for the divergence message
    if resume:
        ckpt = load_checkpoint(run_dir, device)
        changed = resume_changes(ckpt.get("config") or (run_dir / "config.yaml").read_text(), cfg)
        method.load_state_dict(ckpt["method"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():  # empty when saved without fp16 (e.g. another device)
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        saved_epoch = start_epoch
        elapsed, images_seen = ckpt.get("elapsed", 0.0), ckpt.get("images_seen", 0)
        start, pending = ckpt.get("epoch_step", 0), ckpt.get("pending", [])
        if start and ckpt["steps_per_epoch"] != steps_per_epoch:
            raise UserError(f"the checkpoint was written inside an epoch of {ckpt['steps_per_epoch']} steps, "
                            f"which now has {steps_per_epoch}: resume mid-epoch with the run's own "
                            "train.batch_size and data")
        # each rank's own generators (dropout draws differ per rank, e.g. one CUDA generator per device)
        ranks_rng = ckpt.get("rank_rng") or []
        rng.set_rng_state(ranks_rng[rank] if len(ranks_rng) == world else ckpt["rng"])
    if dist.is_main_process():  # after the checkpoint loaded: a refused or failed resume keeps the old config
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    log = MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step if resume else None, logger=t.logger,
                     config=cfg)
    if resume:
        log.write({"kind": "resume", "step": step, "epoch": start_epoch, "changed": changed})
    else:
        start_row = {"kind": "start", "step": 0, "method": cfg.method.name, "data": cfg.data.name,
                     "num_train": len(train_data), "num_test": len(test_data), "world_size": world,
                     "device": str(device)}
        if cfg.data.skip_bad_images:
            start_row["skipped_images"] = write_skipped_images(run_dir, train_data, test_data)
        log.write(start_row)

    def clean_batches():
        for b in iter_images(train_data, cfg.eval.batch_size, device, spec.size):
            yield clean_view(b.images, spec), b.labels, b.indices

    ctx = EpochContext(clean_batches, train_data.labels, t.progress)
    end_epoch = min(t.epochs, stop_after_epoch) if stop_after_epoch else t.epochs
    train_time = 0.0
    compile_logged, compile_time = False, 0.0
    last_save = time.monotonic()

    def checkpoint_due() -> bool:
        """Whether train.checkpoint_every_minutes have passed since the last checkpoint (or the start).
        Asked only at metrics rows, where the loop waits for the device anyway, and rank 0's clock
        decides for every rank (one 1-element broadcast per row, none when off)."""
        every_s = t.checkpoint_every_minutes * 60
        return every_s > 0 and dist.broadcast_flag(time.monotonic() - last_save >= every_s, device)

    def maybe_checkpoint(due: bool, epoch: int, epoch_step: int, pending: list[dict], run_time: float
                         ) -> None:
        """Write last.pt when `due` (the same on every rank): after `epoch` epochs and `epoch_step` steps
        of the next (0 at an epoch end)."""
        nonlocal last_save, saved_epoch
        if not due:
            return
        # a finite loss does not make finite state (BatchNorm statistics overflow first): every rank
        # checks its weights, buffers and optimizer state; the ranks agree, so none waits in a collective
        state = {"method": method.state_dict(), "optimizer": optimizer.state_dict()}
        bad = non_finite_keys(state)
        if (dist.all_reduce_sum(torch.tensor([float(len(bad))], device=device)).item() if world > 1
                else len(bad)):
            where = f" ({', '.join(bad[:3])})" if bad else " on another rank"
            raise _diverged(f"{len(bad) or 'some'} tensors of the model state are not finite{where}",
                            step, epoch + (1 if epoch_step else 0), ckpt_path, saved_epoch,
                            t.checkpoint_every)
        ranks_rng = dist.gather_objects(rng.rng_state())  # a collective: every rank is here at this step
        if dist.is_main_process():
            save_checkpoint({**state, "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                             "epoch_step": epoch_step, "steps_per_epoch": steps_per_epoch, "pending": pending,
                             "elapsed": run_time, "images_seen": images_seen, "rng": ranks_rng[0],
                             "rank_rng": ranks_rng if world > 1 else None, "config": to_yaml(cfg)}, run_dir)
        last_save = time.monotonic()
        saved_epoch = epoch if not epoch_step else f"{epoch + 1}, step {epoch_step} of {steps_per_epoch}"

    epochs_done = start_epoch
    for epoch in range(start_epoch, end_epoch):
        method.train()
        first = start if epoch == start_epoch else 0
        if first:
            method.on_resume_mid_epoch(epoch, ctx)
        else:
            epoch_metrics = method.on_epoch_start(epoch, ctx)
            if epoch_metrics:
                log.write({"kind": "epoch_start", "step": step, "epoch": epoch, **epoch_metrics})
        bar = tqdm(loader.epoch(epoch, first), total=steps_per_epoch, initial=first,
                   desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (t.progress and dist.is_main_process()),
                   leave=False, dynamic_ncols=True)
        tic = time.perf_counter()
        due = stopped = False
        for batch in bar:
            loss, metrics, tau = trainer(batch, step)
            step += 1
            images_seen += batch.images.shape[0] * world
            pending.append({"loss": loss, **metrics})
            if trainer.compile_s is not None and not compile_logged:
                # the compiling step's time goes here, not into images/s
                log.write({"kind": "compile", "step": step, "compile_s": trainer.compile_s,
                           **compile_stats(trainer.compile_base)})
                compile_logged, compile_time = True, trainer.compile_s
            epoch_step, due = step - epoch * steps_per_epoch, False
            if step % t.log_every == 0 or epoch_step == steps_per_epoch:
                # checked here, not every step, to avoid a device sync per step; no checkpoint is written
                # before this check, so a diverged run never overwrites the last good one
                row = _mean_metrics(pending)
                pending = []
                if not math.isfinite(row["loss"]):
                    raise _diverged(f"loss became {row['loss']}", step, epoch + 1, ckpt_path, saved_epoch,
                                    t.checkpoint_every)
                row.update(kind="train", step=step, epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
                if tau is not None:
                    row["tau"] = tau
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                due = checkpoint_due()
            if epoch_step < steps_per_epoch:  # an epoch end checkpoints below, after the kNN monitor
                stopped = step == stop_after_step
                maybe_checkpoint(due or stopped, epoch, epoch_step, pending,
                                 elapsed + train_time + time.perf_counter() - tic - compile_time)
                if stopped:
                    break
        train_time += time.perf_counter() - tic - compile_time
        compile_time = 0.0
        if stopped:
            break
        done = epochs_done = epoch + 1
        if (t.knn_every and (done % t.knn_every == 0 or done == t.epochs) and test_data.has_labels
                and dist.is_main_process()):
            knn = backbone_knn(method.backbone, train_data, test_data, spec, device,
                               KnnSettings.of(cfg.eval, [cfg.eval.monitor_k], t.progress))
            log.write({"kind": "knn", "step": step, "epoch": done,
                       **{f"knn_top1@{k}": v for k, v in knn.items()}})
            top1 = knn.get(cfg.eval.monitor_k, float("nan"))
            dist.print0(f"epoch {done}: kNN@{cfg.eval.monitor_k} top-1 {top1:.2f}")
        stopped = step == stop_after_step
        maybe_checkpoint(due or stopped or done % t.checkpoint_every == 0 or done == end_epoch, done, 0, [],
                         elapsed + train_time)
        if stopped:
            break

    elapsed += train_time
    images_per_s = images_seen / elapsed if elapsed > 0 else 0.0  # over the whole run, resumed parts included
    knn, knn_random = finish_run(run_dir, cfg, method.backbone, train_data, test_data, device, log, step,
                                 epochs_done, elapsed, images_per_s, final_eval)
    dist.barrier()
    return RunResult(run_dir, knn, knn_random, epochs_done, elapsed, images_per_s, method)
