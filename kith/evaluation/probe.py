"""Feature extraction, weighted kNN and linear-probe evaluation of a backbone.

kNN protocol (the weighted kNN of Wu et al., 2018): backbone features of clean, centre-resized
images; L2-normalised; cosine similarity; votes weighted by exp(sim / T) with T = 0.07; train
features are the bank, test features the queries; top-1 accuracy.

Linear probe (linear evaluation of frozen features): frozen backbone; features extracted once in
eval mode (no augmentation) and standardised, then a linear layer trained with seeded mini-batch SGD and
a cosine schedule for a fixed number of epochs (`linear_probe`); or, slower, on fresh
flip + random-crop views every epoch (`linear_probe_augmented`). Reports top-1 and top-5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from kith.data.augment import BatchAugment, ViewConfig, clean_view
from kith.data.images import ImageData, materialise
from kith.data.loader import iter_images
from kith.data.sources import load_splits
from kith.data.spec import ImageSpec, image_spec
from kith.evaluation.readers import load_eval_target
from kith.memory import chunked_topk
from kith.utils import distributed
from kith.utils.device import cpu_threads, resolve_device
from kith.utils.errors import UserError
from kith.utils.progress import show_progress


@dataclass(frozen=True)
class KnnSettings:
    """How a weighted kNN evaluation runs: its k values, the vote temperature T, the batch size of
    the feature passes and whether they show a progress bar."""

    ks: tuple[int, ...] = (20, 200)
    temperature: float = 0.07
    batch_size: int = 512
    progress: bool = False

    @classmethod
    def of(cls, eval_cfg: Any, ks: Sequence[int] | None = None, progress: bool = False) -> KnnSettings:
        """From an `eval` config section: its knn_temperature, batch_size and `ks` (default: its knn_k)."""
        ks = eval_cfg.knn_k if ks is None else ks
        return cls(tuple(int(k) for k in ks), eval_cfg.knn_temperature, eval_cfg.batch_size, progress)


@dataclass(frozen=True)
class LinearSettings:
    """How a linear probe trains: SGD (momentum 0.9, nesterov) with a cosine schedule over `epochs`,
    mini-batches in the order of a generator seeded with `seed`."""

    epochs: int = 100
    seed: int = 0
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 256
    progress: bool = False


@torch.no_grad()
def extract_features(backbone: nn.Module, data: ImageData, spec: ImageSpec, device: torch.device,
                     batch_size: int = 512, progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Backbone features (N, F) of the clean (un-augmented) images of `data` as `spec` sizes and
    normalises them, in eval mode, float32 on `device`."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total = -(-len(data) // batch_size)
    for batch in tqdm(iter_images(data, batch_size, device, spec.size), total=total, desc=desc,
                      disable=not show_progress(progress), leave=False):
        x = clean_view(batch.images, spec)
        with autocast:
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats)


def weighted_votes(neighbour_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class scores (M, C): Σ_j weights[:, j] · onehot(neighbour_labels[:, j]); both inputs (M, k)."""
    votes = torch.zeros(len(weights), num_classes, device=weights.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20, 200), temperature: float = 0.07
                 ) -> dict[int, float]:
    """Top-1 accuracy (percent) for each k. Items with label -1 are left out of bank and queries.

    The neighbours are searched once for the largest k; each smaller k uses the nearest
    k of them (sorted nearest first), which gives the same votes as a search per k.
    """
    device = train_features.device
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    bank = train_labels >= 0
    queries = test_labels >= 0
    if not bank.any() or not queries.any() or not ks:
        return {}
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank_f, bank_y = F.normalize(train_features[bank], dim=1), train_labels[bank]
    query_f, query_y = F.normalize(test_features[queries], dim=1), test_labels[queries]
    k_max = min(max(int(k) for k in ks), len(bank_f))
    correct = {int(k): 0 for k in ks}
    for q, y in zip(query_f.split(1024), query_y.split(1024)):
        sims, idx = chunked_topk(q, bank_f, k_max)
        weights = (sims / temperature).exp()
        neighbour_y = bank_y[idx]
        for k in correct:
            kk = min(k, k_max)
            votes = weighted_votes(neighbour_y[:, :kk], weights[:, :kk], num_classes)
            correct[k] += int((votes.argmax(1) == y).sum())
    return {k: 100.0 * c / len(query_y) for k, c in correct.items()}


def rank_shard(data: ImageData, rank: int, world: int) -> ImageData:
    """Rank `rank`'s contiguous share of `data`: ceil(N / world) images (fewer, or none, on the last
    ranks), as views of the split's images or files."""
    n = len(data)
    per = -(-n // world)
    start, stop = min(rank * per, n), min((rank + 1) * per, n)
    return replace(data, labels=data.labels[start:stop],
                   images=None if data.images is None else data.images[start:stop],
                   files=None if data.files is None else data.files[start:stop])


def sharded_features(backbone: nn.Module, data: ImageData, spec: ImageSpec, device: torch.device,
                     batch_size: int = 512, progress: bool = False, desc: str = "features") -> torch.Tensor:
    """`extract_features` of the whole split, each rank of torch.distributed embedding its share
    (`rank_shard`), all-gathered: every rank gets the (N, F) features in dataset order. Every rank
    must call it, and each works for 1/world of the time: none waits idle in a collective (NCCL's
    timeout is 10 minutes) while another embeds a large dataset."""
    world = distributed.world_size()
    if world == 1:
        return extract_features(backbone, data, spec, device, batch_size, progress, desc)
    rank, n = distributed.rank(), len(data)
    shard = rank_shard(data, rank, world)
    # a rank left without images (N < world) embeds one, dropped, for the feature width
    own = extract_features(backbone, shard if len(shard) else rank_shard(data, 0, n), spec, device,
                           batch_size, progress and rank == 0, desc)[: len(shard)]
    padded = own.new_zeros(-(-n // world), own.shape[1])
    padded[: len(own)] = own
    return distributed.gather(padded)[:n]  # the padding rows all follow the last image's


def backbone_knn(backbone: nn.Module, train: ImageData, test: ImageData, spec: ImageSpec,
                 device: torch.device, settings: KnnSettings = KnnSettings()) -> dict[int, float]:
    """Extract clean features of both splits and run weighted kNN for each of `settings.ks`. Under
    torch.distributed every rank calls it: each embeds its share (`sharded_features`), and every rank
    gets the same accuracies."""
    bs, progress = settings.batch_size, settings.progress
    train_f = sharded_features(backbone, train, spec, device, bs, progress, "train features")
    test_f = sharded_features(backbone, test, spec, device, bs, progress, "test features")
    return knn_accuracy(train_f, train.labels, test_f, test.labels, settings.ks, settings.temperature)


# ---- linear probe ---------------------------------------------------------------------------
LINEAR_EPOCHS = LinearSettings.epochs


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hit.float().mean().item()


def _standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of (N, F) features (std floored so constant dims stay finite)."""
    return features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)


def _train_linear(batches, in_dim: int, num_classes: int, steps_per_epoch: int, settings: LinearSettings,
                  device: torch.device) -> nn.Linear:
    """SGD (momentum 0.9, nesterov) with a per-step cosine schedule over `settings.epochs`;
    zero-initialised layer.

    `batches(epoch)` yields `(x (B, F) standardised float, y (B,))` pairs for one epoch.
    """
    head = nn.Linear(in_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    lr, epochs = settings.lr, settings.epochs
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=settings.weight_decay)
    total = max(epochs * steps_per_epoch, 1)
    step = 0
    shown = show_progress(settings.progress)
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not shown, leave=False):
        for x, y in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, settings: LinearSettings = LinearSettings(),
                 num_classes: int | None = None) -> dict[str, float]:
    """Linear classifier on frozen, cached features; returns `{"top1": %, "top5": %}` on the test features.

    Features (N, F) are standardised with the training features' per-dimension mean and
    std, then a zero-initialised `nn.Linear` is trained with mini-batch SGD (momentum 0.9,
    nesterov, `settings.weight_decay`) and a cosine learning-rate schedule for a fixed number of
    `settings.epochs`; the batch order comes from a `torch.Generator` seeded with `settings.seed`,
    so the result is reproducible. Items with label -1 are left out. top-5 becomes top-C when
    there are fewer than 5 classes.
    """
    device = train_features.device
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    keep, keep_test = train_labels >= 0, test_labels >= 0
    if not keep.any() or not keep_test.any():
        return {}
    x_train, y_train = train_features[keep].float(), train_labels[keep]
    x_test, y_test = test_features[keep_test].float(), test_labels[keep_test]
    mu, sigma = _standardiser(x_train)
    x_train, x_test = (x_train - mu) / sigma, (x_test - mu) / sigma
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    n = len(x_train)
    batch_size = min(settings.batch_size, n)
    steps = -(-n // batch_size)
    gen = torch.Generator().manual_seed(settings.seed)

    def batches(epoch):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield x_train[idx], y_train[idx]

    # one intra-op thread on CPU: a (256 x F) @ (F x C) step is far too small to share,
    # and on a busy machine the thread hand-off costs ~30x the arithmetic
    with torch.enable_grad(), cpu_threads(1 if device.type == "cpu" else None):
        head = _train_linear(batches, x_train.shape[1], num_classes, steps, settings, device)
    with torch.no_grad():
        logits = head(x_test)
    return {"top1": _topk_accuracy(logits, y_test, 1), "top5": _topk_accuracy(logits, y_test, 5)}


def probe_view_config(min_scale: float = 0.08, flip_prob: float = 0.5) -> ViewConfig:
    """The linear probe's training augmentation: RandomResizedCrop(scale min_scale-1) + horizontal flip,
    nothing else."""
    return ViewConfig(min_scale=min_scale, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
                      flip_prob=flip_prob)


def linear_probe_augmented(backbone: nn.Module, train: ImageData, test: ImageData, spec: ImageSpec,
                           device: torch.device, settings: LinearSettings = LinearSettings(),
                           view: ViewConfig | None = None,
                           features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Linear probe trained on fresh augmented views of the training images every epoch.

    The backbone stays frozen in eval mode; each epoch runs it over every training image
    (so this costs `settings.epochs` forward passes over the training set). Views: `view`, by
    default `probe_view_config()` (RandomResizedCrop of scale 0.08-1, as solo-learn's linear eval,
    and a horizontal flip). Standardisation uses the clean training features (`features`: those
    of train and test when already extracted); the test set is evaluated on clean features.
    """
    if features is None:
        features = tuple(extract_features(backbone, split, spec, device) for split in (train, test))
    train_features, test_features = features
    keep = (train.labels >= 0).nonzero().squeeze(1)
    keep_test = test.labels.to(device) >= 0
    if len(keep) == 0 or not keep_test.any():
        return {}
    data = materialise(train.subset(keep), spec.size, skip_bad=True, progress=settings.progress)
    images, labels = data.images, data.labels.to(device)
    y_test = test.labels.to(device)[keep_test]
    mu, sigma = _standardiser(train_features[keep.to(train_features.device)].float())
    num_classes = int(max(labels.max(), y_test.max())) + 1
    augment = BatchAugment(view or probe_view_config(), spec)
    n = len(images)
    batch_size = min(settings.batch_size, n)
    steps = -(-n // batch_size)
    gen = torch.Generator().manual_seed(settings.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()

    def batches(epoch):
        order = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            views = augment(images[idx].to(device, non_blocking=True), gen)
            with torch.no_grad(), autocast:
                feats = backbone(views).float()
            yield (feats - mu) / sigma, labels[idx.to(device)]

    with torch.enable_grad():
        head = _train_linear(batches, train_features.shape[1], num_classes, steps, settings, device)
    backbone.train(was_training)
    with torch.no_grad():
        logits = head((test_features[keep_test].float() - mu) / sigma)
    return {"top1": _topk_accuracy(logits, y_test, 1), "top5": _topk_accuracy(logits, y_test, 5)}


DEFAULT_EVAL_K = (10, 20, 100, 200)  # `kith eval` / `probe_run` default kNN k values


def probe_backbone(backbone: torch.nn.Module, cfg: DictConfig, ks: list[int] | None = None,
                      linear: bool = True, linear_epochs: int | None = None, linear_augment: bool = False,
                      device: str = "auto", seed: int = 0, progress: bool = False, splits=None) -> dict:
    """kNN (each k) and, with `linear`, a linear probe of a frozen backbone on `cfg.data`.

    `splits`: the `(train, test)` ImageData of `cfg.data` when already loaded (else loaded here).

    Returns `{"knn": {k: top1 %}, "linear": {"top1", "top5"} or {}, "num_train", "num_test",
    "feature_dim", "time_s"}`. Features are extracted once (eval mode, clean images) and
    shared by kNN and the probe.
    """
    tic = time.perf_counter()
    dev = resolve_device(device)
    train, test = splits if splits is not None else load_splits(cfg.data, cfg.seed)
    if not test.has_labels or not train.has_labels:
        raise UserError(f"data '{cfg.data.name}' has no labels in both splits; kNN and linear evaluation "
                        "need labelled train and test images")
    spec, knn_settings = image_spec(cfg.data), KnnSettings.of(cfg.eval, ks or DEFAULT_EVAL_K, progress)
    bs = knn_settings.batch_size
    backbone = backbone.to(dev).eval()
    train_f = extract_features(backbone, train, spec, dev, bs, progress, "train features")
    test_f = extract_features(backbone, test, spec, dev, bs, progress, "test features")
    knn = knn_accuracy(train_f, train.labels, test_f, test.labels, knn_settings.ks, knn_settings.temperature)
    out: dict = {"knn": knn,
                 "linear": {}, "num_train": len(train), "num_test": len(test),
                 "feature_dim": int(train_f.shape[1])}
    if linear:
        settings = LinearSettings(epochs=linear_epochs or LINEAR_EPOCHS, seed=seed, progress=progress)
        num_classes = max(train.num_classes, test.num_classes)
        if linear_augment:
            # flip as the run's own strong recipe does (the digits demo turns flips off)
            flip = float(cfg.augment.strong.flip_prob) if "strong" in cfg.augment else 0.5
            out["linear"] = linear_probe_augmented(backbone, train, test, spec, dev, settings,
                                                   probe_view_config(flip_prob=flip), (train_f, test_f))
        else:
            out["linear"] = linear_probe(train_f, train.labels, test_f, test.labels, settings, num_classes)
        out["linear_epochs"] = settings.epochs
        out["linear_augment"] = linear_augment
    out["time_s"] = time.perf_counter() - tic
    return out


def probe_run(path: str | Path, ks: list[int] | None = None, linear: bool = True,
                 linear_epochs: int | None = None, linear_augment: bool = False, device: str = "auto",
                 seed: int = 0, overrides: list[str] | None = None, progress: bool = False) -> dict:
    """`probe_backbone` for a run folder or checkpoint/backbone file (see `load_eval_target`)."""
    backbone, cfg, info = load_eval_target(path, overrides)
    out = probe_backbone(backbone, cfg, ks, linear, linear_epochs, linear_augment, device, seed, progress)
    out.update({k: info[k] for k in ("step", "epoch") if k in info})
    out.update(method=info.get("method") or "exported backbone", data=cfg.data.name,
               backbone=info.get("backbone", cfg.backbone.name), image_size=cfg.data.size)
    return out
