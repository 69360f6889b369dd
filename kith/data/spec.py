"""What a network is fed of an image: its side length and the per-channel normalisation, one value
for the augmentations, the clean evaluation views and the feature extraction to share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# per-channel (mean, std) of each known dataset's training images; ImageNet's for any other source
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "digits": ((0.2, 0.2, 0.2), (0.3, 0.3, 0.3)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ImageSpec:
    """Images are `size x size` pixels and normalised per channel as `(x - mean) / std`."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> ImageSpec:
        """From any sequences (lists, a ListConfig), stored as tuples of floats: hashable, safe to share."""
        return cls(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def image_spec(data_cfg: Any) -> ImageSpec:
    """The spec of a `data` config section: its `size`, and its `mean`/`std` where set, else the
    dataset's known statistics (ImageNet's for an unknown source)."""
    mean, std = KNOWN_STATS.get(data_cfg.name, IMAGENET_STATS)
    if data_cfg.mean is not None:
        mean = data_cfg.mean
    if data_cfg.std is not None:
        std = data_cfg.std
    return ImageSpec.of(data_cfg.size, mean, std)
