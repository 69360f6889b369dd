"""Batches of uint8 images, their labels and dataset indices.

`ResidentLoader` keeps the whole split as one uint8 tensor on the training device and slices
batches from a seeded permutation (no decode, no host-device copies per step). For file lists
that do not fit, `StreamingLoader` decodes in DataLoader workers and cuts each view's random
crop from the full image there; `augment_views` then runs the photometric part on the device.
Both give every rank its own shard and the same epoch order for the same (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kith.data.augment import ViewConfig, sample_crop_boxes
from kith.data.device_decode import crop_views, decode_jpegs
from kith.data.images import (
    MAX_PIXELS,
    ImageData,
    bad_images_error,
    decode_image,
    materialise,
    open_rgb,
    resize_uint8,
)
from kith.data.prefetch import prefetch
from kith.utils import rng
from kith.utils.errors import UserError


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8 on the training device
    labels: torch.Tensor  # (B,) long, -1 when unknown
    indices: torch.Tensor  # (B,) long dataset indices
    # streamed batches: each method view's (B, 3, S, S) uint8 crops in `method.views` order, cut in the
    # workers (`images` is the first); a recipe named twice (SimCLR's [strong, strong]) is cut twice
    views: list[torch.Tensor] | None = None
    # streamed batches with extra views: each extra crop's (B, 3, s, s) uint8, in method.extra_views order
    extra: list[torch.Tensor] | None = None


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=rng.generator("epoch", seed, epoch))


def shard_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int,
                  world: int) -> list[torch.Tensor]:
    """Per-step index tensors of this rank for one epoch (drop_last over the global batch)."""
    if batch_size % world:
        raise UserError(f"train.batch_size={batch_size} is not divisible by the {world} processes")
    steps = n // batch_size
    perm = epoch_permutation(n, seed, epoch)[: steps * batch_size].view(steps, world, batch_size // world)
    return list(perm[:, rank])


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

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from its step `start` on (mid-epoch resume)."""
        shards = shard_indices(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world)
        if start >= len(shards):
            return
        # One copy of the epoch's order to the device: a copy per step would block the host every step
        # (a pageable host-to-device copy waits), so the CPU could never queue work ahead of the GPU.
        order = torch.stack(shards[start:]).to(self.images.device)
        for idx in order:
            yield Batch(self.images[idx], self.labels[idx], idx)


# ---- streaming: geometric part per sample in workers ---------------------------------------------
def crop_params(height: int, width: int, view: ViewConfig, seed: int) -> tuple[list[int], bool]:
    """(top, left, h, w) of a random-resized crop of the full `height x width` image, and the flip,
    drawn as `BatchAugment` draws them (torchvision's RandomResizedCrop rule)."""
    gen = torch.Generator().manual_seed(seed)
    box = sample_crop_boxes(1, height, width, (view.min_scale, view.max_scale),
                            (view.min_ratio, view.max_ratio), gen)[0]
    flip = bool(torch.rand(1, generator=gen)[0] < view.flip_prob)
    return [int(v) for v in box.tolist()], flip


def crop_resize(image: torch.Tensor, box: list[int], flip: bool, size: int) -> torch.Tensor:
    """Crop (3, H, W) uint8 to `box` (top, left, h, w), resize to size x size (bilinear, antialiased),
    mirror if `flip`; on any device (the CPU workers and the CUDA decode path share it)."""
    top, left, h, w = box
    x = image[None, :, top:top + h, left:left + w]
    if x.device.type == "cpu":  # uint8 has a fast antialiased kernel on CPU only
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x[0]
    return x.flip(-1) if flip else x


def _view_crops(image: torch.Tensor, views: list[ViewConfig], step_seed: int, position: int, size: int
                ) -> list[torch.Tensor]:
    """Every view's crop of one full image, each at its recipe's size (else `size`), seeded per view."""
    h, w = image.shape[-2:]
    return [crop_resize(image, *crop_params(h, w, v, rng.view_seed(step_seed, position, i)), v.size or size)
            for i, v in enumerate(views)]


def _read_rgb(path: str, max_pixels: int) -> torch.Tensor | None:
    img = open_rgb(path, max_pixels)
    return None if img is None else torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header, without decoding; None when the bytes are not a JPEG."""
    from PIL import Image, UnidentifiedImageError

    if data[:2] != b"\xff\xd8":
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.height, img.width) if img.format == "JPEG" and img.mode in ("RGB", "L") else None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Key:
    """One batch for the workers: dataset indices, and the step's augmentation seed (None: a clean pass)."""
    indices: tuple[int, ...]
    step_seed: int | None = None


class _Keys(torch.utils.data.Sampler):
    """The batch keys of the current epoch; replaced each epoch, so one DataLoader (and its persistent
    workers) serves every epoch."""

    def __init__(self):
        self.keys: list[_Key] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


UNDECODABLE = -2  # label a worker gives a file it could not decode (-1 is "unlabelled")


def check_decoded(labels: torch.Tensor, idx: torch.Tensor, files: list[str], skip_bad: bool,
                  max_pixels: int) -> torch.Tensor:
    """A streamed batch's CPU labels: a file that failed in a worker (it broke after the start, or a
    streamed training split is not decoded in advance) stops the run with its path, as a bad file found
    at the start does; with data.skip_bad_images=true its black stand-in is kept, unlabelled."""
    bad = labels == UNDECODABLE
    if not bad.any():
        return labels
    if not skip_bad:
        raise bad_images_error([files[i] for i in idx[bad].tolist()], max_pixels=max_pixels)
    return labels.masked_fill(bad, -1)


class _StreamDataset(torch.utils.data.Dataset):
    """Whole batches decoded in a worker: a training key gives each view's crops from the full image
    (or, with `gpu`, the JPEG bytes and the crop boxes), a clean key the centre-resized images. A file
    with more than `max_pixels` pixels by its header (data.max_pixels) is never decoded: it fails."""

    def __init__(self, files: list[str], labels: torch.Tensor, size: int, views: list[ViewConfig],
                 gpu: bool = False, max_pixels: int = MAX_PIXELS):
        self.files, self.labels, self.size, self.views, self.gpu = files, labels, size, views, gpu
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: _Key):
        idx = torch.tensor(key.indices, dtype=torch.long)
        self._failed: list[int] = []  # batch positions whose file did not decode (black stand-ins)
        if key.step_seed is None:
            out = self._clean(key.indices)
        elif self.gpu:
            out = self._gpu_parts(key)
        else:
            crops = [self._crops(i, key.step_seed, pos) for pos, i in enumerate(key.indices)]
            out = [torch.stack(v) for v in zip(*crops)]
        labels = self.labels[idx]
        labels[self._failed] = UNDECODABLE  # the main process sees the flag without a device sync
        return out, labels, idx

    def _crops(self, i: int, step_seed: int, position: int) -> list[torch.Tensor]:
        image = _read_rgb(self.files[i], self.max_pixels)
        if image is None:  # a file that broke after listing: black crops keep the batch shape
            self._failed.append(position)
            return [torch.zeros(3, v.size or self.size, v.size or self.size, dtype=torch.uint8)
                    for v in self.views]
        return _view_crops(image, self.views, step_seed, position, self.size)

    def _clean(self, indices: tuple[int, ...]) -> torch.Tensor:
        arrays = [decode_image(self.files[i], self.size, self.max_pixels) for i in indices]
        self._failed.extend(pos for pos, a in enumerate(arrays) if a is None)
        arrays = [a if a is not None else np.zeros((self.size, self.size, 3), np.uint8) for a in arrays]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def _gpu_parts(self, key: _Key) -> dict:
        """JPEG bytes for the device to decode (other files decoded here), with every view's crop drawn
        from the header's image size, by the same rule as the CPU path."""
        payload, boxes, flips = [], [], []
        for pos, i in enumerate(key.indices):
            with open(self.files[i], "rb") as fh:
                data = fh.read()
            hw = _jpeg_size(data)
            if hw is not None and hw[0] * hw[1] > self.max_pixels:
                hw = None  # too large to decode on the device: _read_rgb refuses it from its header too
            if hw is None:
                image = _read_rgb(self.files[i], self.max_pixels)
                if image is None:
                    self._failed.append(pos)
                    image = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
                hw = tuple(image.shape[-2:])
            else:
                image = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            params = [crop_params(*hw, v, rng.view_seed(key.step_seed, pos, j))
                      for j, v in enumerate(self.views)]
            payload.append(image)
            boxes.append([b for b, _ in params])
            flips.append([f for _, f in params])
        return {"payload": payload, "boxes": boxes, "flips": flips}


def decode_crop_batch(parts: dict, size: int | list[int], device: torch.device, batched: bool | None = None
                      ) -> list[torch.Tensor]:
    """Per view, (B, 3, S, S) uint8 crops on `device` from `_gpu_parts` (S: `size`, or each view's from
    a list): the JPEGs decoded in one batched call on `device` (`kith.data.device_decode`), then cut
    by batched products (`batched`, the default on CUDA: no per-image launches) or per image by
    `crop_resize`, the CPU workers' own crops bit for bit (the default elsewhere)."""
    payload = parts["payload"]
    jpeg = [i for i, p in enumerate(payload) if p.dim() == 1]
    images = [p.to(device, non_blocking=True) if p.dim() == 3 else None for p in payload]
    if jpeg:
        for i, img in zip(jpeg, decode_jpegs([payload[i] for i in jpeg], device)):
            images[i] = img
    num_views = len(parts["boxes"][0])
    sizes = size if isinstance(size, list) else [size] * num_views
    if device.type == "cuda" if batched is None else batched:
        return crop_views(images, parts["boxes"], parts["flips"], sizes)
    return [torch.stack([crop_resize(img, parts["boxes"][b][v], parts["flips"][b][v], sizes[v])
                         for b, img in enumerate(images)]) for v in range(num_views)]


def _loader(dataset, sampler, num_workers: int, device: torch.device, persistent: bool):
    """Batch-per-key DataLoader: pinned memory for CUDA, deep prefetch, optionally persistent workers.

    Its own generator: the workers draw nothing at random (crops are seeded per sample), and a
    DataLoader otherwise draws each new iterator's base seed from torch's global RNG, which a resumed
    run does at another step than the uninterrupted one (All4One's dropout would then differ)."""
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        collate_fn=_no_collate, generator=torch.Generator().manual_seed(0))


def _no_collate(item):
    return item


class StreamingLoader:
    """Decodes files in DataLoader workers; same batch order and sharding as ResidentLoader.

    Each batch comes with the method's views already cut: a worker decodes each full image and
    applies each view's geometric part (random-resized crop with the view's scale/ratio, flip) at
    `size`, seeded per sample by `view_seed`; the photometric part runs batched on the device
    (`augment_views`). `decode="gpu"` moves the JPEG decode and the crops to the CUDA device (the
    workers read bytes and draw the crops), each batch made in a background thread while the step
    before it runs (`background`, default with decode=gpu). Workers persist across epochs.
    """

    def __init__(self, data: ImageData, batch_size: int, device: torch.device, seed: int, size: int,
                 views: list[ViewConfig], num_workers: int = 4, rank: int = 0, world: int = 1,
                 decode: str = "cpu", extra_views: list[ViewConfig] = (), background: bool | None = None):
        if len(data) < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the {len(data)} training images")
        if decode == "gpu" and device.type != "cuda":
            raise UserError("data.decode=gpu needs a CUDA device (batched nvjpeg decode); "
                            "use data.decode=cpu")
        self.num_views = len(views)  # then the extra (multi-crop) views, each cut at its own size
        cut = [*views, *extra_views]
        self.sizes = [v.size or size for v in cut]
        self.dataset = _StreamDataset(data.files, data.labels, size, cut, gpu=decode == "gpu",
                                      max_pixels=data.max_pixels)
        self.skip_bad = data.skip_bad
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device, self.num_workers, self.size = device, num_workers, size
        self.num_samples = len(data)
        self._keys = _Keys()
        self._loader = _loader(self.dataset, self._keys, num_workers, device, persistent=True)
        # each batch made on the device (decode=gpu) in a background thread, one ahead (kith.data.prefetch)
        self.background = self.dataset.gpu if background is None else background

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from its step `start` on (mid-epoch resume)."""
        shards = shard_indices(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world)
        first = epoch * len(shards)
        self._keys.keys = [_Key(tuple(idx.tolist()),
                                rng.derive_seed("augment", self.seed, first + k, self.rank))
                           for k, idx in enumerate(shards) if k >= start]
        if self.background:
            yield from prefetch(self._loader, self._batch, self.device)
        else:
            yield from map(self._batch, self._loader)

    def _batch(self, item: tuple) -> Batch:
        """A worker's `(views, labels, indices)` as a `Batch` on the device (decode=gpu: decoded and cut
        there)."""
        views, labels, idx = item
        labels = check_decoded(labels, idx, self.dataset.files, self.skip_bad, self.dataset.max_pixels)
        to = self.device
        if self.dataset.gpu:
            views = decode_crop_batch(views, self.sizes, to)
        else:
            views = [v.to(to, non_blocking=True) for v in views]
        return Batch(views[0], labels.to(to, non_blocking=True), idx.to(to, non_blocking=True),
                     views[:self.num_views], views[self.num_views:] or None)


def augment_views(batch: Batch, augments: dict, names: list[str], generator: torch.Generator
                  ) -> list[torch.Tensor]:
    """The method's normalised views of a batch: the full `BatchAugment` of each named recipe on resident
    images, or only its photometric part on the crops a streaming loader already cut (view i's crops for
    the i-th name)."""
    if batch.views is None:
        return [augments[name](batch.images, generator) for name in names]
    return [augments[name](crops, generator, crop=False) for name, crops in zip(names, batch.views)]


def is_resident(data: ImageData, data_cfg) -> bool:
    """Whether the training split is held as one tensor: data.resident, or when unset, when it is already
    in memory or its decoded uint8 images fit in `data.resident_max_gb`."""
    if data_cfg.resident is not None:
        return bool(data_cfg.resident)
    return data.images is not None or fits_resident(data, data_cfg.size, data_cfg.resident_max_gb)


def make_train_loader(data: ImageData, cfg, device: torch.device, seed: int, rank: int, world: int):
    """Resident when the (decoded) split fits in `data.resident_max_gb` (or data.resident=true)."""
    if is_resident(data, cfg.data):
        data = materialise(data, cfg.data.size, cfg.data.skip_bad_images, cfg.train.progress, cfg.out_dir)
        return ResidentLoader(data, cfg.train.batch_size, device, seed, rank, world), data
    views = [OmegaConf.to_object(cfg.augment[name]) for name in cfg.method.views]
    extra = [OmegaConf.to_object(cfg.augment[name]) for name in cfg.method.extra_views]
    return StreamingLoader(data, cfg.train.batch_size, device, seed, cfg.data.size, views,
                           cfg.data.num_workers, rank, world, cfg.data.decode, extra), data


def iter_images(data: ImageData, batch_size: int, device: torch.device, size: int,
                num_workers: int | None = None) -> Iterator[Batch]:
    """The whole split in dataset-index order, un-augmented (uint8 on `device`), for clean passes.

    Files are decoded (shorter side resized, centre crop) by a DataLoader worker pool of
    `num_workers` (default: the split's `num_workers`, from data.num_workers), batches in order.
    """
    n = len(data)
    if data.images is not None:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            images = resize_uint8(data.images[start:start + batch_size], size)
            yield Batch(images.to(device, non_blocking=True), data.labels[idx].to(device), idx.to(device))
        return
    workers = data.num_workers if num_workers is None else num_workers
    keys = _Keys()
    keys.keys = [_Key(tuple(range(s, min(s + batch_size, n)))) for s in range(0, n, batch_size)]
    dataset = _StreamDataset(data.files, data.labels, size, [], max_pixels=data.max_pixels)
    for images, labels, idx in _loader(dataset, keys, min(workers, len(keys)), device, persistent=False):
        labels = check_decoded(labels, idx, data.files, data.skip_bad, data.max_pixels)
        yield Batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                    idx.to(device, non_blocking=True))
