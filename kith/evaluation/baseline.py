"""The random-init baseline: the kNN of the network a run starts from, cached on disk by everything
that decides it (network, seed, data, kNN settings, device type, torch version)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
from omegaconf import DictConfig, OmegaConf

from kith.data.images import ImageData
from kith.data.spec import ImageSpec
from kith.nn.backbones import build_backbone
from kith.runs.files import atomic_write_text
from kith.utils import distributed as dist
from kith.utils.files import cache_dir

# part of every key: raise it when a change to kith alters initial weights or features for the same config
BASELINE_VERSION = 1


def data_fingerprint(data: ImageData) -> str:
    """A digest of a split: its length, labels, image shape and 4,096 evenly spaced pixel values (resident
    data) or its file names (streamed data)."""
    digest = hashlib.sha256(f"{len(data)}:{data.size}".encode())
    digest.update(data.labels.cpu().numpy().tobytes())
    if data.images is not None:
        flat = data.images.reshape(-1)
        count = min(4096, flat.numel())
        # integer steps: float positions round past the last element on tensors of more than 2^24 values
        picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(str(tuple(data.images.shape)).encode())
        digest.update(flat[picks].cpu().numpy().tobytes())
    else:
        digest.update("\n".join(data.files or []).encode())
    return digest.hexdigest()


def baseline_key(cfg: DictConfig, train: ImageData, test: ImageData, spec: ImageSpec, ks, temperature: float,
                 device: torch.device) -> str:
    parts = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "seed": int(cfg.seed),
             "spec": asdict(spec), "ks": [int(k) for k in ks], "temperature": float(temperature),
             "device": device.type, "torch": torch.__version__, "version": BASELINE_VERSION,
             "train": data_fingerprint(train), "test": data_fingerprint(test)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def random_init_knn(cfg: DictConfig, key: str, device: torch.device,
                    knn_of: Callable[[torch.nn.Module], dict[int, float]]) -> dict[int, float]:
    """kNN of the seed's initial weights (`knn_of(network)`), read from the cache when `key` is there.
    Rank 0 decides and every rank follows (all embed, or none), so no rank waits alone in a collective."""
    path = cache_dir() / "random_init" / f"{key}.json"
    cached = None
    if dist.is_main_process():
        try:
            cached = {int(k): float(v) for k, v in json.loads(path.read_text())["knn"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cached = None
    cached = dist.gather_objects(cached)[0]  # rank 0's answer on every rank
    if cached is not None:
        return cached
    torch.manual_seed(cfg.seed)  # the same initial weights the trained backbone started from
    network, _ = build_backbone(cfg.backbone)
    knn = knn_of(network.to(device))
    if dist.is_main_process():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"knn": knn}))
        except OSError:  # a read-only home or a full disk: the baseline is measured again next time
            pass
    return knn
