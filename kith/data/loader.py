"""Batches of uint8 images, their labels and dataset indices.

`ResidentLoader` keeps the whole split as one uint8 tensor on the training device and slices
batches from a seeded permutation (no decode, no host-device copies per step). For file lists
that do not fit, `StreamingLoader` decodes in DataLoader workers and resizes to a fixed size.
Both give every rank its own shard and the same epoch order for the same (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kith.data.sources import ImageData, decode_image, resize_uint8
from kith.errors import UserError


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8 on the training device
    labels: torch.Tensor  # (B,) long, -1 when unknown
    indices: torch.Tensor  # (B,) long dataset indices


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def shard_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int
                  ) -> list[torch.Tensor]:
    """Per-step index tensors of this rank for one epoch (drop_last over the global batch)."""
    if batch_size % world:
        raise UserError(f"train.batch_size={batch_size} is not divisible by the {world} processes")
    steps = n // batch_size
    perm = epoch_permutation(n, seed, epoch)[: steps * batch_size].view(steps, world, batch_size // world)
    return list(perm[:, rank])


def decode_files(files: list[str], size: int, skip_bad: bool, progress: bool = True
                 ) -> tuple[torch.Tensor, list[int]]:
    """Decode image files into one (N, 3, size, size) uint8 tensor; returns it and the kept positions."""
    arrays: list[np.ndarray | None] = [None] * len(files)
    with ThreadPoolExecutor(max_workers=8) as pool:
        it = pool.map(lambda f: decode_image(f, size), files, chunksize=64)
        for i, arr in enumerate(tqdm(it, total=len(files), desc="decode", disable=not progress, leave=False)):
            arrays[i] = arr
    bad = [files[i] for i, a in enumerate(arrays) if a is None]
    if bad and not skip_bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"cannot decode image '{bad[0]}'{more} (empty or corrupt); remove it or set "
                        "data.skip_bad_images=true")
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise UserError("none of the image files could be decoded")
    stacked = np.stack([arrays[i] for i in keep])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), keep


def materialise(data: ImageData, size: int, skip_bad: bool, progress: bool = True) -> ImageData:
    """Return `data` with `images` as a (N, 3, size, size) uint8 tensor (decoding files if needed)."""
    if data.images is None:
        images, keep = decode_files(data.files, size, skip_bad, progress)
        labels = data.labels[torch.as_tensor(keep, dtype=torch.long)]
        return ImageData(labels=labels, classes=data.classes, images=images, size=size, name=data.name)
    if data.images.shape[-1] != size or data.images.shape[-2] != size:
        return ImageData(labels=data.labels, classes=data.classes, images=resize_uint8(data.images, size),
                         size=size, name=data.name)
    return data


def fits_resident(data: ImageData, size: int, max_gb: float) -> bool:
    return len(data) * 3 * size * size / 1e9 <= max_gb


class ResidentLoader:
    """Slices batches from one uint8 tensor kept on `device`."""

    def __init__(self, data: ImageData, batch_size: int, device: torch.device, seed: int,
                 rank: int = 0, world: int = 1):
        if len(data) < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {len(data)} training images; "
                            "lower train.batch_size")
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_samples = len(data)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for idx in shard_indices(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world):
            idx = idx.to(self.images.device)
            yield Batch(self.images[idx], self.labels[idx], idx)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[str], labels: torch.Tensor, size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        arr = decode_image(self.files[i], self.size)
        if arr is None:  # a file that broke after listing: a black image keeps the batch shape
            arr = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1), self.labels[i], i


class StreamingLoader:
    """Decodes files in DataLoader workers; same batch order and sharding as ResidentLoader."""

    def __init__(self, data: ImageData, batch_size: int, device: torch.device, seed: int, size: int,
                 num_workers: int = 4, rank: int = 0, world: int = 1):
        if len(data) < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {len(data)} training images")
        self.dataset = _FileDataset(data.files, data.labels, size)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device, self.num_workers = device, num_workers
        self.num_samples = len(data)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def epoch(self, epoch: int) -> Iterator[Batch]:
        batches = [idx.tolist() for idx in shard_indices(self.num_samples, self.batch_size, self.seed, epoch,
                                                          self.rank, self.world)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False)
        for images, labels, idx in loader:
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device),
                        idx.to(self.device))


def make_train_loader(data: ImageData, cfg, device: torch.device, seed: int, rank: int, world: int):
    """Resident when the (decoded) split fits in `data.resident_max_gb` (or data.resident=true)."""
    resident = cfg.data.resident
    if resident is None:
        resident = data.images is not None or fits_resident(data, cfg.data.size, cfg.data.resident_max_gb)
    if resident:
        data = materialise(data, cfg.data.size, cfg.data.skip_bad_images, cfg.train.progress)
        return ResidentLoader(data, cfg.train.batch_size, device, seed, rank, world), data
    return StreamingLoader(data, cfg.train.batch_size, device, seed, cfg.data.size, cfg.data.num_workers,
                           rank, world), data


def iter_images(data: ImageData, batch_size: int, device: torch.device, size: int
                ) -> Iterator[Batch]:
    """The whole split in dataset-index order, un-augmented (uint8 on `device`), for clean passes."""
    n = len(data)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        if data.images is not None:
            images = resize_uint8(data.images[start:start + batch_size], size)
        else:
            arrays = [decode_image(data.files[i], size) for i in idx.tolist()]
            arrays = [a if a is not None else np.zeros((size, size, 3), np.uint8) for a in arrays]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        yield Batch(images.to(device, non_blocking=True), data.labels[idx].to(device), idx.to(device))
