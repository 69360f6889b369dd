"""Array-format datasets read whole into uint8 tensors: scikit-learn's digits (the embedded default),
CIFAR-10/100 python pickles (read with a restricted unpickler), STL-10 binaries and `.npz` files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kith.data.images import (
    ImageData,
    _hwc_to_tensor,
    as_labels,
    require_dir,
)
from kith.utils.errors import UserError, first_line


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
    return ImageData(labels=as_labels(digits.target[idx], len(idx)), classes=[str(i) for i in range(10)],
                     images=images, size=32, name="digits")


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
    require_dir(folder, f"{name} python-format folder",
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
        x, y = _cifar_batch(path, _unpickle(path), label_key)
        xs.append(x)
        ys.extend(y)
    images = torch.from_numpy(np.concatenate(xs))
    return ImageData(labels=as_labels(ys, len(images), f"{name} labels in '{folder}'"), classes=list(classes),
                     images=images, size=32, name=name)


def _cifar_batch(path: Path, entry: dict, label_key: str) -> tuple[np.ndarray, list]:
    """A batch file's images (N, 3, 32, 32) and labels, checked: both keys, N x 3072 uint8, N labels."""
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise UserError(f"'{path}' is not a CIFAR batch: it lacks '{missing[0]}' (has {sorted(entry)[:5]}); "
                        "replace the file with the dataset's own")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not len(data):
        raise UserError(f"'{path}' holds data of shape {data.shape} ({data.dtype}); a CIFAR batch is "
                        "N x 3072 uint8 with N > 0: replace the file with the dataset's own")
    labels = list(entry[label_key])
    if len(labels) != len(data):
        raise UserError(f"'{path}' has {len(data)} images and {len(labels)} labels: the file is damaged")
    return data.reshape(-1, 3, 32, 32), labels


def load_stl10_split(root: str | None, split: str, download: bool) -> ImageData:
    """STL-10 binary folder; split `train` for pretraining = unlabeled + train, `test` = test."""
    root_path = Path(root or "data").expanduser()
    folder = root_path / "stl10_binary" if (root_path / "stl10_binary").exists() else root_path
    if not (folder / "test_X.bin").exists() and download:
        import torchvision

        torchvision.datasets.STL10(str(root_path), split="test", download=True)
        folder = root_path / "stl10_binary"
    require_dir(folder / "test_X.bin", "STL-10 binary files",
                 "set data.path to the folder holding stl10_binary")

    def read(prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
        x_path, y_path = folder / f"{prefix}_X.bin", folder / f"{prefix}_y.bin"
        image_bytes = 3 * 96 * 96
        if x_path.stat().st_size % image_bytes or not x_path.stat().st_size:
            raise UserError(f"'{x_path}' is {x_path.stat().st_size} bytes, not a whole number of 96x96 RGB "
                            f"images ({image_bytes} bytes each): the file is truncated; download it again")
        x = np.fromfile(x_path, dtype=np.uint8).reshape(-1, 3, 96, 96)
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2))  # stored column-major
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1 if y_path.exists() else None
        if y is not None and len(y) != len(x):
            raise UserError(f"'{y_path}' has {len(y)} labels for the {len(x)} images of '{x_path}': one of "
                            "them is truncated; download them again")
        if y is not None and len(y) and (y.min() < 0 or y.max() > 9):
            raise UserError(f"'{y_path}' holds labels outside 1..10: it is not STL-10's label file")
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
    return ImageData(labels=as_labels(np.concatenate(ys), len(images)), classes=classes, images=images,
                     size=96, name="stl10")


def load_npz_split(path: str | None, split: str) -> ImageData:
    if not path:
        raise UserError("data.name=npz needs data.path=/path/to/file.npz")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"npz file not found at '{file}'; check data.path")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, truncated, pickled
        raise UserError(f"'{file}' is not a readable .npz ({first_line(exc, 120)}): save it with "
                        "np.savez(path, x=images, y=labels)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"'{file}' is a single .npy array, not an .npz archive: save it with "
                        "np.savez(path, x=images, y=labels)")
    try:
        return _npz_split(file, loaded, split)
    except ValueError as exc:  # an object (pickled) array inside, refused by allow_pickle=False
        raise UserError(f"'{file}' holds an array kith cannot read ({first_line(exc, 120)}): store plain "
                        "uint8 images and integer labels") from None
    finally:
        loaded.close()


def _npz_split(file: Path, arrays: np.lib.npyio.NpzFile, split: str) -> ImageData:
    """One split of an open .npz: `x`/`y` (or keras' `x_train`/`y_train`), `x_test`/`y_test`."""
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
    labels = as_labels(arrays[y_key] if y_key in keys else None, len(images), f"'{y_key}' of '{file}'")
    named = "classes" in keys and arrays["classes"].dtype.kind in "US"
    names = [str(c) for c in arrays["classes"]] if named else []
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"npz images are {images.shape[-2]}x{images.shape[-1]}; kith needs square images "
                        "(centre-crop them first)")
    classes = names or ([str(i) for i in range(int(labels.max()) + 1)] if (labels >= 0).any() else [])
    return ImageData(labels=labels, classes=classes, images=images, size=images.shape[-1], name="npz",
                     needs_holdout=split == "train" and "x_test" not in keys)
