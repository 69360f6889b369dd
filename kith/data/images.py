"""Images: the `ImageData` container every source returns, decoding and resizing one image, the
cached listing of a folder tree, and the one-line error that names undecodable files."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kith.utils.errors import UserError
from kith.utils.files import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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
            atomic_write_text(cache, json.dumps({"root": root, "dirs": dirs, "listing": listing},
                                                ensure_ascii=False))
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
            if img.mode.startswith("I"):  # 16-bit grey (I;16*, or I from a 16-bit PNG): PIL clips at 255
                values = np.asarray(img, dtype=np.float32)
                if img.mode.startswith("I;16") or values.max() > 255:
                    values = values / 257.0
                return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


SHOWN_BAD_FILES = 10  # undecodable files named in the error; all of them go to a list file


def bad_images_error(bad: list[str], list_dir: str | Path | None = None) -> UserError:
    """The one-line error for undecodable files: up to 10 named, and with more, all of them written to
    `<list_dir>/bad_images-<time>.txt` (list_dir: the config's out_dir, never a run folder, so a failed
    start leaves no run folder behind)."""
    shown = ", ".join(f"'{p}'" for p in bad[:SHOWN_BAD_FILES])
    text = (f"cannot decode image {shown} (empty or corrupt)" if len(bad) == 1
            else f"{len(bad)} image files cannot be decoded (empty or corrupt): {shown}")
    if len(bad) > SHOWN_BAD_FILES:
        text += f" and {len(bad) - SHOWN_BAD_FILES} more"
        if list_dir is not None:
            listing = Path(list_dir) / f"bad_images-{time.strftime('%Y%m%d-%H%M%S')}.txt"
            atomic_write_text(listing, "".join(f"{p}\n" for p in bad))
            text += f" (all of them in '{listing}')"
    return UserError(f"{text}; remove them or set data.skip_bad_images=true to skip them")


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


def as_labels(y: np.ndarray | list | None, n: int) -> torch.Tensor:
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    return torch.as_tensor(np.asarray(y), dtype=torch.long).reshape(-1)


def require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found at '{path}'; {hint}")
    return path
