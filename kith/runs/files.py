"""Safe file I/O: atomic writes (temp file + rename), the one `torch.load` (weights-only, with a
one-line refusal that says why and how to go on), and a tolerant JSONL reader."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

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


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """The one torch.load of kith: run checkpoints (resume) and files handed to the API (eval, export).

    `weights_only=True`: only tensors and plain types are unpickled, so a crafted file cannot run
    code; anything else is a one-line UserError (see `upgrade_checkpoint` for older kith files).
    """
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
