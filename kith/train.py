"""The training loop: one function, `pretrain`, readable top to bottom.

data -> batched augmentation -> method.training_step -> backward -> optimizer -> EMA update,
with warmup+cosine lr, autocast, checkpoints (atomic), metrics.jsonl, an online kNN monitor
and exact resume. It never looks at which method it is training.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kith import distributed as dist
from kith.config import build_config, to_yaml
from kith.data.augment import BatchAugment, clean_view
from kith.data.loader import iter_images, make_train_loader
from kith.data.sources import load_splits, normalisation_stats
from kith.errors import UserError
from kith.evaluate import evaluate_knn
from kith.methods import get_method_class
from kith.methods.base import EpochContext, Method, StepInfo, TrainInfo
from kith.nn.backbones import build_backbone

CHECKPOINT = "checkpoints/last.pt"


# ---- optimisation ---------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Per parameter: `local_lr = η ||w|| / (||g|| + wd ||w||)`; with `clip`, the adapted rate is
    `min(local_lr / lr, 1)` (never above the scheduled lr). Groups with `lars_exclude=True`
    (biases, norms) skip both adaptation and weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip: bool = True, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      clip=clip, eps=eps, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not group["lars_exclude"]:
                    p_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    wd = group["weight_decay"]
                    local_lr = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    if group["clip"]:
                        local_lr = torch.clamp(local_lr / max(group["lr"], 1e-12), max=1.0)
                    scale = torch.where((p_norm > 0) & (g_norm > 0), local_lr, torch.ones_like(local_lr))
                    d_p = (d_p + wd * p) * scale
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d_p.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def split_decay_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each method group split in two: weights (decay, LARS-adapted) and biases/norms (neither)."""
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        extra = {k: v for k, v in group.items() if k != "params"}
        if decay:
            out.append({**extra, "params": decay, "weight_decay": weight_decay, "lars_exclude": False})
        if no_decay:
            out.append({**extra, "params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return out


def build_optimizer(method: Method, cfg: DictConfig) -> torch.optim.Optimizer:
    """Optimizer over the method's param groups; each group's `base_lr` is its scaled peak lr."""
    t = cfg.train
    scaled_lr = t.lr * t.batch_size / 256
    groups = split_decay_groups(method.param_groups(), t.weight_decay)
    for g in groups:
        g["base_lr"] = g.pop("lr", scaled_lr)  # a method's own lr (All4One's transformer) is not batch-scaled
        g["lr"] = g["base_lr"]
    if t.optimizer == "lars":
        return LARS(groups, lr=scaled_lr, momentum=t.momentum, eta=t.lars_eta, clip=t.lars_clip)
    for g in groups:
        g.pop("lars_exclude")
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=scaled_lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=scaled_lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- run folder -----------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl writer (rank 0 only); on resume drops rows logged after the checkpoint.

    With `logger` tensorboard or wandb, numeric values are also sent there (tag `<kind>/<key>`).
    """

    def __init__(self, path: Path, keep_until_step: int | None = None, logger: str = "none",
                 config: DictConfig | None = None):
        self.path = path
        self.enabled = dist.is_main_process()
        self.sink = None
        if self.enabled and keep_until_step is not None and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= keep_until_step and r.get("kind") != "final"]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.enabled and logger != "none":
            self.sink = _external_logger(logger, path.parent, config)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.sink is not None:
            kind, step = row.get("kind", "train"), row.get("step", 0)
            values = {f"{kind}/{k}": v for k, v in row.items()
                      if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            self.sink(values, step)


def _external_logger(name: str, run_dir: Path, config: DictConfig | None):
    """A `log(values, step)` callable for tensorboard or wandb (the `log` extra)."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))

            def log(values: dict, step: int) -> None:
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
                writer.flush()

            return log
        import wandb

        wandb.init(project="kith", name=run_dir.name, dir=str(run_dir),
                   config=OmegaConf.to_container(config) if config is not None else None)
        return lambda values, step: wandb.log(values, step=step)
    except ImportError:
        raise UserError(f"train.logger={name} needs {name}: pip install 'kith-ssl[log]'") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / name


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a kith run folder (no config.yaml)")
    return build_config(overrides or [], base=OmegaConf.load(path))


# ---- helpers --------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, step, rank), so resume is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_method(cfg: DictConfig, info: TrainInfo) -> Method:
    backbone, feature_dim = build_backbone(cfg.backbone.name, cfg.backbone.cifar_stem, cfg.backbone.width)
    return get_method_class(cfg.method.name)(cfg.method, backbone, feature_dim, info)


def wrap_distributed(method: Method) -> torch.nn.Module:
    """DDP without per-forward buffer broadcasts: queues are identical on every rank by construction
    (all-gathered pushes), and BatchNorm statistics are synchronised by SyncBatchNorm on GPUs."""
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(method, forward_sync_buffers=False)
    return ddp(method, broadcast_buffers=False)


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    sums: dict[str, list] = defaultdict(list)
    for row in rows:
        for k, v in row.items():
            if v is not None:
                sums[k].append(v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v)))
    return {k: torch.stack(v).mean().item() for k, v in sums.items()}


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
def pretrain(cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False,
             stop_after_epoch: int | None = None, final_eval: bool = True) -> RunResult:
    """Train `cfg.method` on `cfg.data`; write config.yaml, metrics.jsonl, checkpoints/last.pt, summary.json.

    `resume=True` continues from `run_dir/checkpoints/last.pt`. `stop_after_epoch` ends the
    run early after that many epochs (the schedule still spans `train.epochs`).
    """
    t = cfg.train
    device = dist.setup_from_env() or resolve_device(t.device)
    rank, world = dist.rank(), dist.world_size()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    ckpt_path = run_dir / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise UserError(f"cannot resume: no checkpoint at '{ckpt_path}'")
    if dist.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    seed_everything(cfg.seed)
    train_data, test_data = load_splits(cfg.data, cfg.seed)
    loader, train_data = make_train_loader(train_data, cfg, device, cfg.seed, rank, world)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size={t.batch_size} leaves no full batch of the "
                        f"{len(train_data)} images")
    mean, std = normalisation_stats(cfg.data)
    size = cfg.data.size
    info = TrainInfo(num_samples=len(train_data), steps_per_epoch=steps_per_epoch, epochs=t.epochs,
                     batch_size=t.batch_size, num_classes=train_data.num_classes, seed=cfg.seed)
    method = build_method(cfg, info).to(device)
    if world > 1 and t.sync_bn and device.type == "cuda":  # SyncBatchNorm is GPU-only
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model = wrap_distributed(method) if world > 1 else method
    augments = {name: BatchAugment(cfg.augment[name], size, mean, std) for name in method.views}
    optimizer = build_optimizer(method, cfg)
    amp_dtype = resolve_precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    total_steps = steps_per_epoch * t.epochs
    warmup_steps = int(t.warmup_epochs * steps_per_epoch)

    start_epoch, step, elapsed, images_seen = 0, 0, 0.0, 0
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        elapsed, images_seen = ckpt.get("elapsed", 0.0), ckpt.get("images_seen", 0)
        set_rng_state(ckpt["rng"])
    log = MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step if resume else None, logger=t.logger,
                     config=cfg)
    if not resume:
        log.write({"kind": "start", "step": 0, "method": cfg.method.name, "data": cfg.data.name,
                   "num_train": len(train_data), "num_test": len(test_data), "world_size": world,
                   "device": str(device)})

    def clean_batches():
        for b in iter_images(train_data, cfg.eval.batch_size, device, size):
            yield clean_view(b.images, size, mean, std), b.labels, b.indices

    ctx = EpochContext(clean_batches, len(train_data), train_data.labels, t.progress)
    end_epoch = min(t.epochs, stop_after_epoch) if stop_after_epoch else t.epochs
    train_time = 0.0
    for epoch in range(start_epoch, end_epoch):
        method.train()
        epoch_metrics = method.on_epoch_start(epoch, ctx)
        if epoch_metrics:
            log.write({"kind": "epoch_start", "step": step, "epoch": epoch, **epoch_metrics})
        pending: list[dict] = []
        bar = tqdm(loader.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not (t.progress and dist.is_main_process()), leave=False, dynamic_ncols=True)
        tic = time.perf_counter()
        for batch in bar:
            factor = lr_factor(step, total_steps, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            gen = step_generator(cfg.seed, step, rank)
            views = [augments[name](batch.images, gen) for name in method.views]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, metrics = model(views, batch, StepInfo(step, epoch, steps_per_epoch))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            tau = method.update_momentum(step)
            step += 1
            images_seen += batch.images.shape[0] * world
            pending.append({"loss": loss.detach(), **metrics})
            if step % t.log_every == 0 or step % steps_per_epoch == 0:
                # checked here, not every step, to avoid a device sync per step; no checkpoint is written
                # before this check, so a diverged run never overwrites the last good one
                row = _mean_metrics(pending)
                pending = []
                if not math.isfinite(row["loss"]):
                    raise UserError(f"loss became {row['loss']} by step {step} (epoch {epoch + 1}); lower "
                                    f"train.lr or set train.precision=fp32; the last good checkpoint is kept "
                                    f"at '{ckpt_path}'")
                row.update(kind="train", step=step, epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
                if tau is not None:
                    row["tau"] = tau
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        train_time += time.perf_counter() - tic
        done = epoch + 1
        if (t.knn_every and (done % t.knn_every == 0 or done == t.epochs) and test_data.has_labels
                and dist.is_main_process()):
            knn = evaluate_knn(method.backbone, train_data, test_data, size, mean, std, device,
                               [cfg.eval.monitor_k], cfg.eval.knn_temperature, cfg.eval.batch_size)
            log.write({"kind": "knn", "step": step, "epoch": done,
                       **{f"knn_top1@{k}": v for k, v in knn.items()}})
            top1 = knn.get(cfg.eval.monitor_k, float("nan"))
            dist.print0(f"epoch {done}: kNN@{cfg.eval.monitor_k} top-1 {top1:.2f}")
        if dist.is_main_process() and (done % t.checkpoint_every == 0 or done == end_epoch):
            atomic_save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": done, "step": step,
                         "elapsed": elapsed + train_time, "images_seen": images_seen, "rng": rng_state(),
                         "config": to_yaml(cfg)}, ckpt_path)

    elapsed += train_time
    images_per_s = images_seen / elapsed if elapsed > 0 else 0.0  # over the whole run, resumed parts included
    knn, knn_random = {}, {}
    if final_eval and end_epoch == t.epochs and test_data.has_labels and dist.is_main_process():
        ks = list(cfg.eval.knn_k)
        knn = evaluate_knn(method.backbone, train_data, test_data, size, mean, std, device, ks,
                           cfg.eval.knn_temperature, cfg.eval.batch_size, t.progress)
        torch.manual_seed(cfg.seed)  # the same initial weights the trained backbone started from
        random_backbone, _ = build_backbone(cfg.backbone.name, cfg.backbone.cifar_stem, cfg.backbone.width)
        knn_random = evaluate_knn(random_backbone.to(device), train_data, test_data, size, mean, std, device,
                                  ks, cfg.eval.knn_temperature, cfg.eval.batch_size, t.progress)
        log.write({"kind": "final", "step": step, "epoch": end_epoch,
                   **{f"knn_top1@{k}": v for k, v in knn.items()},
                   **{f"random_init_knn_top1@{k}": v for k, v in knn_random.items()}})
    if dist.is_main_process():
        summary = {"method": cfg.method.name, "preset": cfg.preset, "data": cfg.data.name,
                   "backbone": cfg.backbone.name,
                   "epochs": end_epoch, "num_train": len(train_data), "num_test": len(test_data),
                   "wall_time_s": elapsed, "images_per_s": images_per_s, "device": str(device),
                   "world_size": world, "knn": knn, "knn_random_init": knn_random}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return RunResult(run_dir, knn, knn_random, end_epoch, elapsed, images_per_s, method)
