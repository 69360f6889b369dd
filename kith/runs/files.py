"""Safe file I/O: atomic writes (temp file + rename), the one `torch.load` (weights-only, with a
one-line refusal that says why and how to go on, after a check of the archive's uncompressed size), and a
tolerant JSONL reader."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from kith.utils.capacity import format_bytes, host_memory_bytes
from kith.utils.errors import UserError
from kith.utils.files import (  # noqa: F401  (re-exported)
    append_line,
    atomic_save,
    atomic_write,
    atomic_write_text,
    temp_path_for,
    with_path,
)

# ---- files ----------------------------------------------------------------------------------
# every write goes through kith.utils.files (temp file in the same folder, fsync, rename), whose names
# stay importable from here


def _save_temp(obj: Any, path: Path) -> Path:
    """torch.save to a fresh temp file next to `path`, fsynced; a failed write (a full disk, Ctrl-C)
    removes the temp file before re-raising. The caller renames it (`save_checkpoint` links the old
    file to prev.pt first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with compiled code), which `torch.jit.load` runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _refusal(path: Path, exc: Exception) -> UserError | None:
    """The one-line error for a file that `torch.load(weights_only=True)` refused, or None for other
    errors."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"GLOBAL (\S+)", text)
    name = match.group(1) if match else "a Python object"
    if name.startswith("numpy"):
        return UserError(f"refusing to load '{path}': it pickles numpy objects, as checkpoints of an older "
                         f"kith do (numpy's RNG state), and kith unpickles only tensors and plain types; if "
                         f"you trust the file, convert it once with `kith upgrade-checkpoint {path}`")
    return UserError(f"refusing to load '{path}': it contains {name}, which is neither a tensor nor a plain "
                     "type, and unpickling it could run code; kith loads only weights-only files")


MAX_CHECKPOINT_ENV = "KITH_MAX_CHECKPOINT_GB"  # the largest uncompressed checkpoint kith loads; default: RAM
# torch.save stores every member uncompressed, so a checkpoint holds about its file size; one whose members
# inflate to more than this many times the file (and to more than INFLATION_FLOOR bytes) is a zip bomb
MAX_INFLATION = 4
INFLATION_FLOOR = 64 * 2**20


def _checkpoint_limit() -> int | None:
    """The byte limit on a checkpoint's uncompressed size: $KITH_MAX_CHECKPOINT_GB, else the machine's RAM."""
    text = os.environ.get(MAX_CHECKPOINT_ENV)
    if not text:
        return host_memory_bytes()
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise UserError(f"{MAX_CHECKPOINT_ENV}={text!r} is not a positive number of GB: set it to e.g. 64")
    return int(gb * 1e9)


def check_archive_size(path: str | Path) -> None:
    """Refuse a zip archive (a .pt checkpoint, a TorchScript or torch.export file) whose members, by the
    zip directory, inflate past the limit or to an absurd multiple of the file's size, before torch
    allocates them (its reader allocates each member at the directory's size). A file that is not a zip
    (legacy torch.save, a truncated file) is left to the reader and its own error."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
        on_disk = path.stat().st_size
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    limit = _checkpoint_limit()
    if limit is not None and total > limit:
        raise UserError(f"'{path}' holds {format_bytes(total)} uncompressed, more than the "
                        f"{format_bytes(limit)} kith loads ({MAX_CHECKPOINT_ENV}, default this machine's "
                        f"memory): if the machine can hold it, set "
                        f"{MAX_CHECKPOINT_ENV}={math.ceil(total / 1e9)}")
    if total > INFLATION_FLOOR and total > MAX_INFLATION * on_disk:
        raise UserError(f"'{path}' ({format_bytes(on_disk)}) inflates to {format_bytes(total)}, "
                        f"{total / max(on_disk, 1):.0f} times its size: torch.save writes checkpoints "
                        "uncompressed, so this is a zip bomb or a re-compressed file; if you trust it, unzip "
                        "it and zip it again without compression (zip -0)")


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """The one torch.load of kith: run checkpoints (resume) and files handed to the API (eval, export).

    `weights_only=True`: only tensors and plain types are unpickled, so a crafted file cannot run
    code; anything else is a one-line UserError (see `upgrade_checkpoint` for older kith files). Its
    uncompressed size is checked first (`check_archive_size`).
    """
    check_archive_size(path)
    if is_torchscript(path):
        raise UserError(f"'{path}' is a TorchScript archive, not a checkpoint; kith runs TorchScript "
                        "code only from a file named explicitly to `kith eval --checkpoint` or "
                        "`kith.load_backbone`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = _refusal(Path(path), exc)
        if refusal is None:
            raise
        raise refusal from None


# ---- metrics --------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file ([] when it does not exist). A line that does not parse (the half-written
    last line of a killed run) is dropped instead of failing the whole read."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
