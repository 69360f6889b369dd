"""Datasets as uint8 tensors (N, 3, H, W) with labels (-1 when unknown), or as file lists to stream.

Sources: `digits` (scikit-learn's bundled 8x8 handwritten digits upscaled to 32x32 RGB; the
embedded default, no network), CIFAR-10/100 (python-format folders, read directly so
re-encoded copies with other checksums work), STL-10 (binary folder), an image folder
(class subfolders give labels, a flat folder is unlabeled; ImageNet-style `train/` and `val/`
(or `test/`) class folders), a `filelist` (text lines `relative/path.jpg label`) and `.npz`
(`x` uint8 NxHxWxC, optional `y`, optional `x_test`/`y_test`).

Listing a million-file folder is one `os.scandir` walk; lists of large trees are cached (see
`cached_listing`) and reused only while no directory of the tree has changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kith.errors import UserError, did_you_mean

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SOURCES = ("digits", "cifar10", "cifar100", "stl10", "folder", "filelist", "npz")
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "digits": ((0.2, 0.2, 0.2), (0.3, 0.3, 0.3)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
        )


def _hwc_to_tensor(x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {x.dtype}; convert with (x * 255).astype(np.uint8)")
    if x.ndim == 3:  # grayscale N x H x W
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise UserError(f"images must be N x H x W x C with C in 1, 3, 4; got shape {tuple(x.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t[:, :3].contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (N, 3, H, W) to size x size (bilinear, antialiased), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for chunk in images.split(4096):
        y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


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


CACHE_MIN_FILES = 20_000  # trees with fewer files are listed afresh: a walk costs less than a cache check
# a directory changed this close to the listing is not trusted (coarse clocks)
_MTIME_SLACK_NS = 2_000_000_000


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk(root: str, dirs: dict[str, int]) -> list[str]:
    """Image files under `root`, recursively, as paths relative to `root` (one scandir per directory);
    records every directory's mtime in `dirs`."""
    found, stack = [], [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        dirs[rel] = os.stat(path).st_mtime_ns
        with os.scandir(path) as entries:
            for entry in entries:
                child = os.path.join(rel, entry.name) if rel else entry.name
                if entry.is_dir():
                    stack.append(child)
                elif _is_image(entry.name):
                    found.append(child)
    return found


def _scan_folder(root: str) -> tuple[dict, dict[str, int]]:
    """{"files", "labels", "classes"} of a folder: class subfolders (recursive), or a flat folder
    (labels -1)."""
    dirs: dict[str, int] = {}
    dirs[""] = os.stat(root).st_mtime_ns
    with os.scandir(root) as entries:
        top = list(entries)
    classes = sorted(e.name for e in top if e.is_dir())
    files, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            sub_dirs: dict[str, int] = {}
            rels = sorted(_walk(os.path.join(root, name), sub_dirs))
            dirs.update({os.path.join(name, d) if d else name: m for d, m in sub_dirs.items()})
            files.extend(os.path.join(name, r) for r in rels)
            labels.extend([label] * len(rels))
    else:
        files = sorted(e.name for e in top if not e.is_dir() and _is_image(e.name))
        labels = [-1] * len(files)
    return {"files": files, "labels": labels, "classes": classes}, dirs


def _cache_dir() -> Path:
    return Path(os.environ.get("KITH_CACHE_DIR") or Path.home() / ".cache" / "kith") / "filelists"


def cached_listing(root: str, scan) -> dict:
    """`scan(root)` -> (listing, {relative dir: mtime_ns}), cached for large trees.

    The cache file is keyed by the folder's absolute path and stores the mtime of every directory
    of the tree. Adding, removing or renaming an entry changes its directory's mtime, so the cache
    is reused only when all recorded directories still have their recorded mtimes (a stat per
    directory, not a walk over the files); directories modified within a couple of seconds of the
    listing are never trusted, as some file systems keep mtimes in whole seconds. Edits to a file's
    contents do not change the list and need no re-listing. Location: $KITH_CACHE_DIR/filelists
    (default ~/.cache/kith/filelists).
    """
    root = os.path.abspath(root)
    cache = _cache_dir() / (hashlib.sha1(root.encode()).hexdigest()[:20] + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached.get("root") == root and all(
                os.stat(os.path.join(root, d)).st_mtime_ns == m for d, m in cached["dirs"].items()):
            return cached["listing"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    listing, dirs = scan(root)
    fresh = time.time_ns() - max(dirs.values(), default=0) > _MTIME_SLACK_NS
    if len(listing["files"]) >= CACHE_MIN_FILES and fresh:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"root": root, "dirs": dirs, "listing": listing}))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the next run a walk
    return listing


def list_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and class names of a folder: class subfolders, or a flat folder (labels -1)."""
    listing = cached_listing(str(root), _scan_folder)
    base = os.path.abspath(root)
    return [os.path.join(base, f) for f in listing["files"]], listing["labels"], listing["classes"]


def open_rgb(path: str):
    """The file as an RGB PIL image, or None if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_image(path: str, size: int) -> np.ndarray | None:
    """Decode one file to a size x size x 3 uint8 array (shorter side resized, centre crop);
    None if unreadable."""
    from PIL import Image

    img = open_rgb(path)
    if img is None:
        return None
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


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


def load_folder_split(root: str | None, split: str, cfg) -> ImageData:
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
            return _empty_split("folder", cfg.size)
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
    return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=cfg.size,
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


def load_filelist_split(root: str | None, split: str, cfg) -> ImageData:
    """`data.name=filelist`: data.path is one list file (the training split; a test split is held out), or a
    folder with `train.txt` and `val.txt` (or `test.txt`)."""
    if not root:
        raise UserError("data.name=filelist needs data.path=/path/to/train.txt "
                        "(or a folder with train.txt, val.txt)")
    path = _require_dir(Path(root).expanduser(), "file list", "check data.path")
    if path.is_file():
        if split != "train":
            return _empty_split("filelist", cfg.size)
        files, labels, classes = read_file_list(path)
        return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=cfg.size,
                         name="filelist", needs_holdout=True)
    train_list = path / "train.txt"
    if not train_list.is_file():
        raise UserError(f"'{path}' has no train.txt; "
                        "data.path must be a list file or a folder with train.txt")
    list_file = _split_path(path, split, ".txt")
    if list_file is None:
        return _empty_split("filelist", cfg.size)
    class_index = None
    if split != "train":
        _, _, train_classes = read_file_list(train_list)
        class_index = {c: i for i, c in enumerate(train_classes)} if train_classes else None
    files, labels, classes = read_file_list(list_file, class_index)
    return ImageData(labels=_labels(labels, len(files)), classes=classes, files=files, size=cfg.size,
                     name="filelist")


def load_npz_split(path: str | None, split: str) -> ImageData:
    if not path:
        raise UserError("data.name=npz needs data.path=/path/to/file.npz")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"npz file not found at '{file}'; check data.path")
    with np.load(file, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        x_key, y_key = ("x", "y") if split == "train" else ("x_test", "y_test")
        if "x" not in keys:
            raise UserError(f"'{file}' has no array 'x' (N x H x W x C uint8); it has {sorted(keys)}")
        if x_key not in keys:
            return ImageData(labels=torch.empty(0, dtype=torch.long), classes=[], images=None,
                             name="npz", missing_split=True)
        images = _hwc_to_tensor(arrays[x_key])
        labels = _labels(arrays[y_key] if y_key in keys else None, len(images))
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"npz images are {images.shape[-2]}x{images.shape[-1]}; kith needs square images "
                        "(centre-crop them first)")
    classes = [str(i) for i in range(int(labels.max()) + 1)] if (labels >= 0).any() else []
    return ImageData(labels=labels, classes=classes, images=images, size=images.shape[-1], name="npz",
                     needs_holdout=split == "train" and "x_test" not in keys)


def load_raw_split(cfg, split: str, seed: int = 0) -> ImageData:
    name = cfg.name
    if name == "digits":
        return load_digits_split(split)
    if name in ("cifar10", "cifar100"):
        return load_cifar_split(name, cfg.path, split, cfg.download)
    if name == "stl10":
        return load_stl10_split(cfg.path, split, cfg.download)
    if name == "folder":
        return load_folder_split(cfg.path, split, cfg)
    if name == "filelist":
        return load_filelist_split(cfg.path, split, cfg)
    if name == "npz":
        return load_npz_split(cfg.path, split)
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


def normalisation_stats(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = KNOWN_STATS.get(cfg.name, IMAGENET_STATS)
    if cfg.mean is not None:
        mean = tuple(cfg.mean)
    if cfg.std is not None:
        std = tuple(cfg.std)
    return tuple(mean), tuple(std)


def load_splits(cfg, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, test) for a DataConfig, with subsets and a held-out test split when the source has none."""
    train = load_raw_split(cfg, "train", seed)
    if len(train) == 0:
        raise UserError(f"data source '{cfg.name}' has no training images; check data.path")
    test = load_raw_split(cfg, "test", seed)
    if train.needs_holdout or test.missing_split:
        train, test = holdout_split(train, cfg.holdout, seed)
    if cfg.train_subset:
        train = train.subset(balanced_subset(train.labels, cfg.train_subset, seed))
    if cfg.test_subset:
        test = test.subset(balanced_subset(test.labels, cfg.test_subset, seed))
    for split in (train, test):
        split.num_workers = cfg.num_workers if split.files is not None else 0
    return train, test
