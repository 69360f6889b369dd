"""Datasets as uint8 tensors (N, 3, H, W) with labels (-1 when unknown), or as file lists to stream.

Sources: `digits` (scikit-learn's bundled 8x8 handwritten digits upscaled to 32x32 RGB; the
embedded default, no network), CIFAR-10/100 (python-format folders, read directly so
re-encoded copies with other checksums work), STL-10 (binary folder), an image folder
(class subfolders give labels, a flat folder is unlabeled; ImageNet-style `train/` and `val/`
(or `test/`) class folders), a `filelist` (text lines `relative/path.jpg label`) and `.npz`
(`x` uint8 NxHxWxC, optional `y`, optional `x_test`/`y_test`; or keras' `x_train`/`y_train` for
`x`/`y`; an optional string array `classes` names the classes).

Listing a million-file folder is one `os.scandir` walk; lists of large trees are cached (see
`kith.data.images.cached_listing`) and reused only while no directory of the tree has changed. The
array formats are read in `kith.data.arrays`; this module picks the source and makes the splits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from kith.data.arrays import load_cifar_split, load_digits_split, load_npz_split, load_stl10_split
from kith.data.budget import map_bounded
from kith.data.images import (
    IMAGE_SUFFIXES,
    ImageData,
    as_labels,
    bad_images_error,
    header_pixels,
    list_image_folder,
    open_rgb,
    require_dir,
    visible_entries,
)
from kith.utils.errors import UserError, did_you_mean

SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder", "filelist", "npz")


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
    root_path = require_dir(Path(root).expanduser(), "image folder", "check data.path")
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
        # the training split's classes as its listing has them (hidden folders are no class)
        train_classes = sorted(e.name for e in visible_entries(str(root_path / "train")) if e.is_dir())
        index = {name: i for i, name in enumerate(train_classes)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UserError(f"'{folder}' has class folder '{unknown[0]}' that '{root_path / 'train'}' lacks; "
                            "both splits need the same class names")
        labels = [index[classes[y]] for y in labels]
        classes = train_classes
    return ImageData(labels=as_labels(labels, len(files)), classes=classes, files=files, size=size,
                     name="folder", needs_holdout=not has_splits)


_INTEGER = re.compile(r"-?[0-9]+")  # an integer label; anything else (`--5`, `1e10`, `²`) is a class name


def _list_text(path: Path) -> str:
    """A list file's text: UTF-8, a leading byte-order mark dropped (else the first path would start with
    an invisible U+FEFF); other encodings are a one-line error that says how to convert."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"file list '{path}' is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}): "
                        f"convert it, e.g. iconv -f latin1 -t utf-8 '{path}' > list-utf8.txt") from None


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
    for number, line in enumerate(_list_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        files.append(str(base / parts[0]))
        raw.append(parts[1] if len(parts) == 2 else None)
    if not files:
        raise UserError(f"file list '{path}' lists no images")
    named = [r for r in raw if r is not None and not _INTEGER.fullmatch(r)]
    if named:
        classes = sorted(class_index) if class_index else sorted(set(named))
        index = class_index or {c: i for i, c in enumerate(classes)}
        missing = [r for r in raw if r is not None and r not in index]
        if missing:
            raise UserError(f"file list '{path}': label '{missing[0]}' is not a class of the training list; "
                            "use the same class names (or integer labels) in every list")
        labels = [index[r] if r is not None else -1 for r in raw]
        return files, labels, list(classes)
    labels = as_labels([int(r) if r is not None else -1 for r in raw], len(raw),
                       f"labels of file list '{path}'").tolist()
    top = max(labels)
    return files, labels, [str(i) for i in range(top + 1)] if top >= 0 else []


def load_filelist_split(root: str | None, split: str, size: int) -> ImageData:
    """`data.name=filelist`: data.path is one list file (the training split; a test split is held out), or a
    folder with `train.txt` and `val.txt` (or `test.txt`)."""
    if not root:
        raise UserError("data.name=filelist needs data.path=/path/to/train.txt "
                        "(or a folder with train.txt, val.txt)")
    path = require_dir(Path(root).expanduser(), "file list", "check data.path")
    if path.is_file():
        if split != "train":
            return _empty_split("filelist", size)
        files, labels, classes = read_file_list(path)
        return ImageData(labels=as_labels(labels, len(files)), classes=classes, files=files, size=size,
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
    return ImageData(labels=as_labels(labels, len(files)), classes=classes, files=files, size=size,
                     name="filelist")


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
        split.max_pixels = data_cfg.max_pixels
    test = screen_files(test, data_cfg.skip_bad_images, list_dir)
    return train, test


def screen_files(data: ImageData, skip_bad: bool, list_dir: str | Path | None = None) -> ImageData:
    """A file split checked by decoding every file once: the files that fail stop the run
    (`bad_images_error`) or, with data.skip_bad_images=true, are dropped and listed in `skipped`.
    The same rule as the decode of a resident training split (`kith.data.images.decode_files`)."""
    if data.files is None or not len(data):
        return data
    good = list(map_bounded(lambda f: open_rgb(f, data.max_pixels) is not None, data.files, header_pixels))
    bad = [f for f, ok in zip(data.files, good) if not ok]
    if not bad:
        return data
    if not skip_bad:
        raise bad_images_error(bad, list_dir, data.max_pixels)
    if not any(good):
        raise UserError(f"none of the {len(bad)} image files could be decoded")
    kept = data.subset(torch.tensor([i for i, ok in enumerate(good) if ok], dtype=torch.long))
    kept.skipped = bad
    return kept
