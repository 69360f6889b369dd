"""Images: the `ImageData` container every source returns, decoding and resizing one image, the
cached listing of a folder tree, and the one-line error that names undecodable files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kith.data.budget import map_bounded
from kith.utils.errors import UserError
from kith.utils.files import atomic_write_text, cache_dir
from kith.utils.progress import show_progress

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


_LISTING_VERSION = 2  # 2: hidden entries and non-regular files left out; older caches are listed again
CACHE_MIN_FILES = 20_000  # trees with fewer files are listed afresh: a walk costs less than a cache check
# a directory changed this close to the listing is not trusted (coarse clocks)
_MTIME_SLACK_NS = 2_000_000_000


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def visible_entries(path: str) -> list[os.DirEntry]:
    """The visible entries of folder `path` (hidden ones, `.ipynb_checkpoints/`, `.DS_Store`, editors'
    `._x.jpg`, are never data); an unreadable folder is a one-line UserError naming it."""
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except PermissionError:
        raise UserError(f"cannot read folder '{path}' (permission denied): give kith read access "
                        f"(chmod -R u+rX '{path}') or move the folder out of data.path") from None


def _is_image_file(entry: os.DirEntry) -> bool:
    """A regular file (or a link to one) with an image suffix: a FIFO, socket or device named `x.png`
    is never opened (reading a FIFO blocks forever)."""
    return _is_image(entry.name) and entry.is_file()


def _walk(root: str, dirs: dict[str, int], seen: dict[tuple[int, int], str] | None = None) -> list[str]:
    """Image files under `root`, recursively, as paths relative to `root` (one scandir per directory);
    records every directory's mtime in `dirs`. A folder reached twice (a symlink loop, or two links
    to one folder) is a one-line UserError naming both paths."""
    found, stack = [], [""]
    seen = {} if seen is None else seen
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        info = os.stat(path)
        first = seen.setdefault((info.st_dev, info.st_ino), path)
        if first != path:
            raise UserError(f"'{path}' leads back to '{first}' (a symlink loop or a second link to one "
                            "folder): remove the link, kith would read those images twice or forever")
        dirs[rel] = info.st_mtime_ns
        for entry in visible_entries(path):
            child = os.path.join(rel, entry.name) if rel else entry.name
            if entry.is_dir():
                stack.append(child)
            elif _is_image_file(entry):
                found.append(child)
    return found


def _scan_folder(root: str) -> tuple[dict, dict[str, int]]:
    """{"files", "labels", "classes"} of a folder: class subfolders (recursive), or a flat folder
    (labels -1)."""
    dirs: dict[str, int] = {}
    info = os.stat(root)
    dirs[""], seen = info.st_mtime_ns, {(info.st_dev, info.st_ino): root}
    top = visible_entries(root)
    classes = sorted(e.name for e in top if e.is_dir())
    files, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            sub_dirs: dict[str, int] = {}
            rels = sorted(_walk(os.path.join(root, name), sub_dirs, seen))
            dirs.update({os.path.join(name, d) if d else name: m for d, m in sub_dirs.items()})
            files.extend(os.path.join(name, r) for r in rels)
            labels.extend([label] * len(rels))
    else:
        files = sorted(e.name for e in top if not e.is_dir() and _is_image_file(e))
        labels = [-1] * len(files)
    return {"files": files, "labels": labels, "classes": classes}, dirs


def _cache_dir() -> Path:
    return cache_dir() / "filelists"


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
        if cached.get("root") == root and cached.get("version") == _LISTING_VERSION and all(
                os.stat(os.path.join(root, d)).st_mtime_ns == m for d, m in cached["dirs"].items()):
            return cached["listing"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    listing, dirs = scan(root)
    fresh = time.time_ns() - max(dirs.values(), default=0) > _MTIME_SLACK_NS
    if len(listing["files"]) >= CACHE_MIN_FILES and fresh:
        try:
            record = {"root": root, "version": _LISTING_VERSION, "dirs": dirs, "listing": listing}
            atomic_write_text(cache, json.dumps(record))
        except OSError:
            pass  # a read-only home only costs the next run a walk
    return listing


def list_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and class names of a folder: class subfolders, or a flat folder (labels -1)."""
    listing = cached_listing(str(root), _scan_folder)
    base = os.path.abspath(root)
    return [os.path.join(base, f) for f in listing["files"]], listing["labels"], listing["classes"]


# the default of data.max_pixels: an image with more pixels (by its header) is a bad image. 40 Mpixel is
# ~120 MB decoded as RGB, well below PIL's bomb warning (89 Mpixel) and its error (179 Mpixel)
MAX_PIXELS = 40_000_000


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file from its header, without decoding; None when it is not a
    regular file or not an image PIL can open."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            return None
        with Image.open(path) as img:
            return img.width, img.height
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None


def header_pixels(path: str) -> int:
    """width x height by the header; 0 when unreadable (such a file fails at once, costing nothing)."""
    w, h = header_size(path) or (0, 0)
    return w * h


def _grey_levels(img) -> np.ndarray:
    """uint8 levels of a 16-bit or float grey image, which PIL's convert would clip at 255 (a 16-bit
    mid-grey turns white, a float image in [0, 1] black): 16-bit (I;16*, or I above 255) divided by 257;
    float in [0, 1] times 255, in [0, 255] as it is, any other range stretched from its min..max;
    NaN is 0."""
    values = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            values = values * 255
        elif low < 0 or high > 255:
            values = (values - low) * (255 / max(high - low, 1e-12))
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    elif img.mode.startswith("I;16") or values.max() > 255:
        values = values / 257.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def open_rgb(path: str, max_pixels: int = MAX_PIXELS):
    """The file as an RGB PIL image, or None if it cannot be decoded or its header says it has more than
    `max_pixels` pixels (data.max_pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            return None
        with Image.open(path) as img:  # reads the header only
            if img.width * img.height > max_pixels:  # before decoding: a 20 KB PNG can inflate to GBs
                return None
            if img.mode.startswith("I") or img.mode == "F":  # PIL's convert clips these at 255
                return Image.fromarray(_grey_levels(img), "L").convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None


SHOWN_BAD_FILES = 10  # undecodable files named in the error; all of them go to a list file


def _oversized(bad: list[str], max_pixels: int) -> dict[str, tuple[int, int]]:
    """{path: (width, height)} of the files in `bad` that failed only for their size (header reads)."""
    sizes = {p: header_size(p) for p in bad}
    return {p: wh for p, wh in sizes.items() if wh is not None and wh[0] * wh[1] > max_pixels}


def _named(paths: list[str], what: str) -> str:
    """`'a.png'` or `N image files ... 'a.png', 'b.png' and K more`, up to SHOWN_BAD_FILES named."""
    shown = ", ".join(f"'{p}'" for p in paths[:SHOWN_BAD_FILES])
    more = f" and {len(paths) - SHOWN_BAD_FILES} more" if len(paths) > SHOWN_BAD_FILES else ""
    return f"image {shown} {what}" if len(paths) == 1 else f"{len(paths)} image files {what}: {shown}{more}"


def bad_images_error(bad: list[str], list_dir: str | Path | None = None,
                     max_pixels: int = MAX_PIXELS) -> UserError:
    """The one-line error for undecodable files: up to 10 named, and with more, all of them written to
    `<list_dir>/bad_images-<time>.txt` (list_dir: the config's out_dir, never a run folder, so a failed
    start leaves no run folder behind). Files refused for their size alone (more pixels than
    `max_pixels` by their header) are named apart, with the data.max_pixels value that reads them."""
    large = _oversized(bad, max_pixels)
    corrupt = [p for p in bad if p not in large]
    parts = []
    if corrupt:
        parts.append(_named(corrupt, "cannot be decoded (empty or corrupt)") if len(corrupt) > 1
                     else f"cannot decode image '{corrupt[0]}' (empty or corrupt)")
    if large:
        biggest = max(large, key=lambda p: large[p][0] * large[p][1])
        w, h = large[biggest]
        verb, them = ("has", "it") if len(large) == 1 else ("have", "them")
        parts.append(f"{_named(list(large), f'{verb} more pixels than data.max_pixels={max_pixels}')} "
                     f"(the largest, '{biggest}', is {w} x {h}, {w * h * 3 / 1e9:.1f} GB decoded): raise the "
                     f"limit to read {them}, e.g. data.max_pixels={w * h}")
    text = "; ".join(parts)
    if len(bad) > SHOWN_BAD_FILES and list_dir is not None:
        listing = Path(list_dir) / f"bad_images-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        atomic_write_text(listing, "".join(f"{p}\n" for p in bad))
        text += f" (all of them in '{listing}')"
    return UserError(f"{text}; remove them or set data.skip_bad_images=true to skip them")


def decode_image(path: str, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """Decode one file to a size x size x 3 uint8 array (shorter side resized, centre crop);
    None if unreadable or larger than `max_pixels`."""
    from PIL import Image

    img = open_rgb(path, max_pixels)
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
    max_pixels: int = MAX_PIXELS  # data.max_pixels: a file with more pixels (by its header) is a bad image

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
            max_pixels=self.max_pixels,
        )


MAX_CLASSES = 1_000_000  # a label above this would make that many class names (and kNN columns)


def as_labels(y: np.ndarray | list | None, n: int, source: str = "the labels") -> torch.Tensor:
    """(n,) long labels, checked: one integer per image, each -1 (unlabelled) or a class index in
    [0, MAX_CLASSES). A one-hot (n, C) array, another length, floats or smaller values are a one-line
    UserError naming `source` (negative values below -1 would collide with the loader's internal
    "undecodable" marker)."""
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:
        raise UserError(f"{source} have shape {y.shape}, one-hot it seems: give one class index per image "
                        "(y.argmax(1))")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{source}: {n} images but labels of shape {tuple(y.shape)}; give one label per "
                        "image")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.isfinite(y))
                                         and np.all(y == np.round(y))):
        raise UserError(f"{source} are {y.dtype}, not integers: give integer class indices")
    if len(y) and (y.min() < -1 or y.max() >= MAX_CLASSES):
        bad = y.min() if y.min() < -1 else y.max()
        raise UserError(f"{source} hold {bad:.0f}: labels are class indices 0..{MAX_CLASSES - 1}, or -1 for "
                        "an unlabelled image")
    return torch.as_tensor(y.astype(np.int64), dtype=torch.long)


def require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found at '{path}'; {hint}")
    return path


def decode_files(files: list[str], size: int, skip_bad: bool, progress: bool = True,
                 list_dir: str | Path | None = None, max_pixels: int = MAX_PIXELS
                 ) -> tuple[torch.Tensor, list[int]]:
    """Decode image files into one (N, 3, size, size) uint8 tensor; returns it and the kept positions.
    Undecodable files (and those over `max_pixels`) stop with `bad_images_error` unless `skip_bad`."""
    arrays: list[np.ndarray | None] = [None] * len(files)
    it = map_bounded(lambda f: decode_image(f, size, max_pixels), files, header_pixels)
    bar = tqdm(it, total=len(files), desc="decode", disable=not show_progress(progress), leave=False)
    for i, arr in enumerate(bar):
        arrays[i] = arr
    bad = [files[i] for i, a in enumerate(arrays) if a is None]
    if bad and not skip_bad:
        raise bad_images_error(bad, list_dir, max_pixels)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise UserError("none of the image files could be decoded")
    stacked = np.stack([arrays[i] for i in keep])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), keep


def materialise(data: ImageData, size: int, skip_bad: bool, progress: bool = True,
                list_dir: str | Path | None = None) -> ImageData:
    """Return `data` with `images` as a (N, 3, size, size) uint8 tensor (decoding files if needed)."""
    if data.images is None:
        images, keep = decode_files(data.files, size, skip_bad, progress, list_dir, data.max_pixels)
        labels = data.labels[torch.as_tensor(keep, dtype=torch.long)]
        kept = set(keep)
        skipped = data.skipped + [f for i, f in enumerate(data.files) if i not in kept]
        return ImageData(labels=labels, classes=data.classes, images=images, size=size, name=data.name,
                         skipped=skipped, max_pixels=data.max_pixels)
    if data.images.shape[-1] != size or data.images.shape[-2] != size:
        return ImageData(labels=data.labels, classes=data.classes, images=resize_uint8(data.images, size),
                         size=size, name=data.name)
    return data
