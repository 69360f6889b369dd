"""Datasets as uint8 tensors (N, 3, H, W) with labels (-1 when unknown), or as file lists to stream.

Sources: `digits` (scikit-learn's bundled 8x8 handwritten digits upscaled to 32x32 RGB; the
embedded default, no network), CIFAR-10/100 (python-format folders, read directly so
re-encoded copies with other checksums work), STL-10 (binary folder), an image folder
(class subfolders give labels, a flat folder is unlabeled; ImageNet-style `train/` and `val/`
(or `test/`) class folders), a `filelist` (text lines `relative/path.jpg label`) and `.npz`
(`x` uint8 NxHxWxC, optional `y`, optional `x_test`/`y_test`; or keras' `x_train`/`y_train` for
`x`/`y`; an optional string array `classes` names the classes).

Listing a million-file folder is one `os.scandir` walk; lists of large trees are cached (see
`cached_listing`) and reused only while no directory of the tree has changed.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kith.data.images import IMAGE_SUFFIXES, _hwc_to_tensor, bad_images_error, list_image_folder, open_rgb
from kith.utils.errors import UserError, did_you_mean

SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder", "filelist", "npz")


@dataclass
class ImageData:
    """One split. Either `images` (resident uint8 tensor) or `files` (streamed, decoded on the fly)."""

    labels: torch.Tensor  # (N,) long, -1 when unknown
    classes: list[str]
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8
    files: list[str] | None = None
    size: int = 32
    name: str = ""
    # set by loaders of folders / .npz files: this split was absent (an empty placeholder), or this
    # train split has no test counterpart; either way load_splits holds out a test split from train
    missing_split: bool = False
    needs_holdout: bool = False
    num_workers: int = 0  # decode workers for streamed clean passes (`iter_images`)
    skipped: list[str] = field(default_factory=list)  # undecodable files left out (data.skip_bad_images=true)
    skip_bad: bool = False  # data.skip_bad_images: what a streamed file that fails to decode does

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), int(self.labels.max()) + 1 if len(self.labels) else 0)

    def subset(self, index: torch.Tensor) -> ImageData:
        return ImageData(
            labels=self.labels[index],
            classes=self.classes,
            images=self.images[index] if self.images is not None else None,
            files=[self.files[i] for i in index.tolist()] if self.files is not None else None,
            size=self.size,
            name=self.name,
            num_workers=self.num_workers,
            skip_bad=self.skip_bad,
        )


def _labels(y: np.ndarray | list | None, n: int) -> torch.Tensor:
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    return torch.as_tensor(np.asarray(y), dtype=torch.long).reshape(-1)


def load_digits_split(split: str) -> ImageData:
    """scikit-learn's 1,797 8x8 digits as 32x32 RGB; a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8)
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    idx = idx_train if split == "train" else idx_test
    small = torch.from_numpy(x[idx])[:, None].float()
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return ImageData(labels=_labels(digits.target[idx], len(idx)), classes=[str(i) for i in range(10)],
                     images=images, size=32, name="digits")


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found at '{path}'; {hint}")
    return path


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a crafted CIFAR file cannot run code."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, not only arrays and plain types, and "
                                         "unpickling it could run code")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle with str keys and str class names, whether its keys were written as str
    (the official Python-2 files read with latin1) or as bytes (copies re-pickled from Python 3)."""
    with open(path, "rb") as fh:
        try:
            entry = _ArrayUnpickler(fh, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise UserError(f"refusing to load '{path}': {exc}") from None
    if not isinstance(entry, dict):
        raise UserError(f"'{path}' is not a CIFAR python-format pickle")
    entry = {_text(k): v for k, v in entry.items()}
    for key in ("label_names", "fine_label_names"):
        if key in entry:
            entry[key] = [_text(n) for n in entry[key]]
    return entry


def load_cifar_split(name: str, root: str | None, split: str, download: bool) -> ImageData:
    """CIFAR-10/100 from the python-format folder (cifar-10-batches-py / cifar-100-python)."""
    root_path = Path(root or "data").expanduser()
    folder = root_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.exists() and ((root_path / "data_batch_1").exists() or (root_path / "train").is_file()):
        folder = root_path  # the user pointed at the inner folder itself
    if not folder.exists() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root_path), train=split == "train", download=True)
    _require_dir(folder, f"{name} python-format folder",
                 "set data.path to the folder that holds it, or data.download=true when online")
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
        meta = folder / "batches.meta"
        classes = _unpickle(meta)["label_names"] if meta.exists() else []
    else:
        files = ["train" if split == "train" else "test"]
        label_key = "fine_labels"
        classes = _unpickle(folder / "meta")["fine_label_names"] if (folder / "meta").exists() else []
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        if not path.exists():
            raise UserError(f"{name}: missing file '{path}'; the folder looks incomplete")
        entry = _unpickle(path)
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry[label_key])
    images = torch.from_numpy(np.concatenate(xs))
    return ImageData(labels=_labels(ys, len(images)), classes=list(classes), images=images, size=32,
                     name=name)


def load_stl10_split(root: str | None, split: str, download: bool) -> ImageData:
    """STL-10 binary folder; split `train` for pretraining = unlabeled + train, `test` = test."""
    root_path = Path(root or "data").expanduser()
    folder = root_path / "stl10_binary" if (root_path / "stl10_binary").exists() else root_path
    if not (folder / "test_X.bin").exists() and download:
        import torchvision

        torchvision.datasets.STL10(str(root_path), split="test", download=True)
        folder = root_path / "stl10_binary"
    _require_dir(folder / "test_X.bin", "STL-10 binary files",
                 "set data.path to the folder holding stl10_binary")

    def read(prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.fromfile(folder / f"{prefix}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2))  # stored column-major
        y_path = folder / f"{prefix}_y.bin"
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1 if y_path.exists() else None
        return x, y

    parts = ["unlabeled", "train"] if split == "train" else ["test"]
    xs, ys = [], []
    for prefix in parts:
        if not (folder / f"{prefix}_X.bin").exists():
            continue
        x, y = read(prefix)
        xs.append(x)
        ys.append(y if y is not None else np.full(len(x), -1))
    classes_file = folder / "class_names.txt"
    classes = classes_file.read_text().split() if classes_file.exists() else []
    images = torch.from_numpy(np.concatenate(xs))
    return ImageData(labels=_labels(np.concatenate(ys), len(images)), classes=classes, images=images,
                     size=96, name="stl10")


TEST_SPLIT_NAMES = ("test", "val")  # the held-out split's folder or list name, first found wins


def _split_path(root: Path, split: str, suffix: str = "") -> Path | None:
    names = (split,) if split == "train" else TEST_SPLIT_NAMES
    for name in names:
        path = root / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def _empty_split(name: str, size: int) -> ImageData:
    return ImageData(labels=torch.empty(0, dtype=torch.long), classes=[], images=None, files=[],
                     size=size, name=name, missing_split=True)


def load_folder_split(root: str | None, split: str, size: int) -> ImageData:
    """A folder of images; with `train/` and `val/` (or `test/`) subfolders, those are the splits, and the
    held-out split's class folders are labelled by the training split's class names."""
    if not root:
        raise UserError("data.name=folder needs data.path=/path/to/images")
    root_path = _require_dir(Path(root).expanduser(), "image folder", "check data.path")
    if not root_path.is_dir():
        raise UserError(f"data.path '{root_path}' is not a folder")
    has_splits = (root_path / "train").is_dir()
    if has_splits:
        folder = _split_path(root_path, split)
        if folder is None or not folder.is_dir():
            return _empty_split("folder", size)
    else:
        folder = root_path
    files, labels, classes = list_image_folder(folder)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{folder}'")
    if has_splits and split != "train" and classes:
        train_classes = sorted(e.name for e in os.scandir(root_path / "train") if e.is_dir())
        index = {name: i for i, name in enumerate(train_classes)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UserError(f"'{folder}' has class folder '{unknown[0]}' that '{root_path / 'train'}' lacks; "
                            "both splits need the same class names")
        labels = [index[classes[y]] for y in labels]
        classes = train_classes
    return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=size,
                     name="folder", needs_holdout=not has_splits)


def read_file_list(path: Path, class_index: dict[str, int] | None = None
                   ) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and class names of a list file: one image per line, `relative/path.jpg label`.

    Paths are relative to the list file's folder (absolute paths are kept); the label is the last
    whitespace-separated field: an integer class index, or a class name (names are numbered in
    sorted order, or by `class_index` for the held-out split); a line with one field is unlabelled
    (-1). Blank lines and lines starting with # are skipped.
    """
    base = path.parent
    files, raw = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        files.append(str(base / parts[0]))
        raw.append(parts[1] if len(parts) == 2 else None)
    if not files:
        raise UserError(f"file list '{path}' lists no images")
    named = [r for r in raw if r is not None and not r.lstrip("-").isdigit()]
    if named:
        classes = sorted(class_index) if class_index else sorted(set(named))
        index = class_index or {c: i for i, c in enumerate(classes)}
        missing = [r for r in raw if r is not None and r not in index]
        if missing:
            raise UserError(f"file list '{path}': label '{missing[0]}' is not a class of the training list; "
                            "use the same class names (or integer labels) in every list")
        labels = [index[r] if r is not None else -1 for r in raw]
        return files, labels, list(classes)
    labels = [int(r) if r is not None else -1 for r in raw]
    top = max(labels)
    return files, labels, [str(i) for i in range(top + 1)] if top >= 0 else []


def load_filelist_split(root: str | None, split: str, size: int) -> ImageData:
    """`data.name=filelist`: data.path is one list file (the training split; a test split is held out), or a
    folder with `train.txt` and `val.txt` (or `test.txt`)."""
    if not root:
        raise UserError("data.name=filelist needs data.path=/path/to/train.txt "
                        "(or a folder with train.txt, val.txt)")
    path = _require_dir(Path(root).expanduser(), "file list", "check data.path")
    if path.is_file():
        if split != "train":
            return _empty_split("filelist", size)
        files, labels, classes = read_file_list(path)
        return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=size,
                         name="filelist", needs_holdout=True)
    train_list = path / "train.txt"
    if not train_list.is_file():
        raise UserError(f"'{path}' has no train.txt; "
                        "data.path must be a list file or a folder with train.txt")
    list_file = _split_path(path, split, ".txt")
    if list_file is None:
        return _empty_split("filelist", size)
    class_index = None
    if split != "train":
        _, _, train_classes = read_file_list(train_list)
        class_index = {c: i for i, c in enumerate(train_classes)} if train_classes else None
    files, labels, classes = read_file_list(list_file, class_index)
    return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=size,
                     name="filelist")


def load_npz_split(path: str | None, split: str) -> ImageData:
    if not path:
        raise UserError("data.name=npz needs data.path=/path/to/file.npz")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"npz file not found at '{file}'; check data.path")
    with np.load(file, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        if {"x", "x_train"} <= keys:
            raise UserError(f"'{file}' has both 'x' and 'x_train'; keep one name for the training images")
        # keras' naming, or kith's own
        train_x, train_y = ("x_train", "y_train") if "x_train" in keys else ("x", "y")
        x_key, y_key = (train_x, train_y) if split == "train" else ("x_test", "y_test")
        if train_x not in keys:
            raise UserError(f"'{file}' has no array 'x' or 'x_train' (N x H x W x C uint8); "
                            f"it has {sorted(keys)}")
        if x_key not in keys:
            return ImageData(labels=torch.empty(0, dtype=torch.long), classes=[], images=None,
                             name="npz", missing_split=True)
        images = _hwc_to_tensor(arrays[x_key])
        labels = _labels(arrays[y_key] if y_key in keys else None, len(images))
        named = "classes" in keys and arrays["classes"].dtype.kind in "US"
        names = [str(c) for c in arrays["classes"]] if named else []
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"npz images are {images.shape[-2]}x{images.shape[-1]}; kith needs square images "
                        "(centre-crop them first)")
    classes = names or ([str(i) for i in range(int(labels.max()) + 1)] if (labels >= 0).any() else [])
    return ImageData(labels=labels, classes=classes, images=images, size=images.shape[-1], name="npz",
                     needs_holdout=split == "train" and "x_test" not in keys)


def load_raw_split(data_cfg: Any, split: str, seed: int = 0) -> ImageData:
    name = data_cfg.name
    if name == "digits":
        return load_digits_split(split)
    if name in ("cifar10", "cifar100"):
        return load_cifar_split(name, data_cfg.path, split, data_cfg.download)
    if name == "stl10":
        return load_stl10_split(data_cfg.path, split, data_cfg.download)
    if name == "folder":
        return load_folder_split(data_cfg.path, split, data_cfg.size)
    if name == "filelist":
        return load_filelist_split(data_cfg.path, split, data_cfg.size)
    if name == "npz":
        return load_npz_split(data_cfg.path, split)
    raise UserError(f"unknown data.name '{name}'{did_you_mean(name, SOURCES)}; one of {', '.join(SOURCES)}")


def balanced_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of `count` items, as class-balanced as the labels allow (random when unlabeled)."""
    gen = torch.Generator().manual_seed(seed)
    if count >= len(labels):
        return torch.arange(len(labels))
    if not (labels >= 0).any():
        return torch.randperm(len(labels), generator=gen)[:count].sort().values
    order = torch.randperm(len(labels), generator=gen)
    shuffled = labels[order]
    # rank of each item within its class, in shuffled order; take lowest ranks first
    rank = torch.zeros_like(shuffled)
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    pick = order[torch.argsort(rank * len(labels) + torch.arange(len(labels)), stable=True)[:count]]
    return pick.sort().values


def holdout_split(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    gen = torch.Generator().manual_seed(seed + 1234)
    order = torch.randperm(len(data), generator=gen)
    n_test = max(1, round(len(data) * fraction))
    return data.subset(order[n_test:].sort().values), data.subset(order[:n_test].sort().values)


def load_splits(data_cfg: Any, seed: int = 0, list_dir: str | Path | None = None
                ) -> tuple[ImageData, ImageData]:
    """(train, test) for a DataConfig, with subsets and a held-out test split when the source has none.

    A test split of files is decoded once here (`screen_files`: bad files stop or are skipped, as in a
    resident training split); `list_dir` receives the list of many bad files (see `bad_images_error`).
    """
    train = load_raw_split(data_cfg, "train", seed)
    if len(train) == 0:
        raise UserError(f"data source '{data_cfg.name}' has no training images; check data.path")
    test = load_raw_split(data_cfg, "test", seed)
    if train.needs_holdout or test.missing_split:
        train, test = holdout_split(train, data_cfg.holdout, seed)
    if data_cfg.train_subset:
        train = train.subset(balanced_subset(train.labels, data_cfg.train_subset, seed))
    if data_cfg.test_subset:
        test = test.subset(balanced_subset(test.labels, data_cfg.test_subset, seed))
    for split in (train, test):
        split.num_workers = data_cfg.num_workers if split.files is not None else 0
        split.skip_bad = data_cfg.skip_bad_images
    test = screen_files(test, data_cfg.skip_bad_images, list_dir)
    return train, test


def screen_files(data: ImageData, skip_bad: bool, list_dir: str | Path | None = None) -> ImageData:
    """A file split checked by decoding every file once: the files that fail stop the run
    (`bad_images_error`) or, with data.skip_bad_images=true, are dropped and listed in `skipped`.
    The same rule as the decode of a resident training split (`kith.data.loader.decode_files`)."""
    if data.files is None or not len(data):
        return data
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        good = list(pool.map(lambda f: open_rgb(f) is not None, data.files, chunksize=64))
    bad = [f for f, ok in zip(data.files, good) if not ok]
    if not bad:
        return data
    if not skip_bad:
        raise bad_images_error(bad, list_dir)
    if not any(good):
        raise UserError(f"none of the {len(bad)} image files could be decoded")
    kept = data.subset(torch.tensor([i for i, ok in enumerate(good) if ok], dtype=torch.long))
    kept.skipped = bad
    return kept
