"""Memory estimates for the config keys whose size drives an allocation (a queue's rows, the tiny net's
width, the image size of the batches and of the resident split), checked at setup against what the
training device can hold, so that `method.queue_size=1e10` is one line with its estimate instead of a
death in the allocator. The estimates are lower bounds: weights, queues and uint8/float32 image tensors,
not activations."""

from __future__ import annotations

from typing import Any

import torch

from kith.nn.backbones import LIGHT_FEATURE_DIM, RESNET_FEATURE_DIM, VIT_S16
from kith.utils.capacity import Need, check_fits

QUEUE_KEYS = ("queue_size", "bank_size")  # the method keys that size a `kith.memory.Queue`
# weights, their gradients, the optimizer's state and a momentum (EMA) copy: 4 float32 values a weight
WEIGHT_COPIES = 4


def feature_dim(backbone: Any) -> int | None:
    """The backbone's feature dimension from its config alone (None for timm models: known once built)."""
    name = backbone.name
    if name == "tiny":
        return 8 * backbone.width
    if name == VIT_S16:
        return 384
    return {**RESNET_FEATURE_DIM, **LIGHT_FEATURE_DIM}.get(name)


def tiny_weights(width: int) -> int:
    """The number of weights of `TinyConvNet(width)`: four 3x3 convolutions 3 -> w -> 2w -> 4w -> 8w
    and their BatchNorm scales and shifts."""
    chans = [3, width, 2 * width, 4 * width, 8 * width]
    return sum(9 * a * b + 2 * b for a, b in zip(chans, chans[1:]))


def training_needs(cfg: Any, num_images: int, resident: bool, world: int = 1) -> list[Need]:
    """What the sizes a user set cost on one training device (pure: reads config values only).

    cfg: the root config (`backbone`, `method`, `augment`, `data.size`, `train.batch_size`);
    num_images: the training split's size; resident: whether it is held as one uint8 tensor there.
    """
    needs = []
    dim = feature_dim(cfg.backbone)
    if cfg.backbone.name == "tiny":
        n = tiny_weights(cfg.backbone.width)
        needs.append(Need("backbone.width", cfg.backbone.width, n * 4 * WEIGHT_COPIES,
                          f"the tiny net's {n:.3g} weights (4 bytes each, x {WEIGHT_COPIES} for gradients, "
                          "optimizer state and a momentum copy)"))
    for name in QUEUE_KEYS:
        rows = cfg.method.get(name)
        if rows is None:
            continue
        width = cfg.method.get("proj_output_dim") or max((dim or 2048) // 4, 1)  # MSF's None: F/4
        needs.append(Need(f"method.{name}", rows, rows * (width * 4 + 16),
                          f"the queue ({width} x 4 bytes each, and a label and an index)"))
    size, batch = cfg.data.size, max(cfg.train.batch_size // world, 1)
    views = [cfg.augment[v].get("size") or size for v in [*cfg.method.views, *cfg.method.extra_views]]
    needs.append(Need("data.size", size, sum(batch * 3 * s * s * 4 for s in views),
                      f"a batch's views ({batch} images x {len(views)} views of up to {max(views)} x "
                      f"{max(views)} x 3 x 4 bytes)"))
    if resident:
        needs.append(Need("data.size", size, num_images * 3 * size * size,
                          f"the resident images ({num_images} x 3 x {size} x {size} bytes)",
                          "lower data.size, or set data.resident=false to stream the images"))
    return needs


def check_training_memory(cfg: Any, device: torch.device, num_images: int, resident: bool,
                          world: int = 1) -> None:
    """Refuse (one line, with the estimate) sizes the training device cannot hold."""
    check_fits(training_needs(cfg, num_images, resident, world), device)
