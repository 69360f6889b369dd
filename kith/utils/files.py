"""The one way kith writes a file: `atomic_write` (a temp file in the same folder, fsync, rename; the
temp removed on any failure) and `append_line` for the one append-only log, neither following a
symlink inside the folder it was told to stay in (`inside`)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kith.utils.errors import UserError


def cache_dir() -> Path:
    """`KITH_CACHE_DIR`, else ~/.cache/kith: caches any run may reuse (file listings, random-init
    baselines), never inside a run folder."""
    return Path(os.environ.get("KITH_CACHE_DIR") or Path.home() / ".cache" / "kith")


def check_no_symlink(path: Path, inside: Path | None) -> None:
    """UserError when `path`, or a folder between `inside` and it, is a symlink: a write there would
    land outside the folder (a run folder's `metrics.jsonl` linked to a user's file). Nothing is
    checked without `inside` (a file the user named: the link is theirs to follow)."""
    if inside is None:
        return
    inside, path = Path(inside), Path(path)
    try:
        parts = path.relative_to(inside).parts
    except ValueError:
        raise UserError(f"'{path}' is outside the folder '{inside}' kith writes to; choose a path inside "
                        "it") from None
    current = inside
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UserError(f"'{current}' is a symlink; kith never writes through a link inside "
                            f"'{inside}' (it could change a file elsewhere): remove the link")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], inside: Path | None = None,
                 fsync: bool = True) -> Path:
    """Write `path` through `write(fh)` (a binary file handle) into a temp file next to it, fsync it,
    then rename it over `path`: `path` holds the old content or the new, never half a file. Any failure
    (disk full, Ctrl-C) removes the temp file and re-raises. `inside`: see `check_no_symlink`."""
    path = Path(path)
    check_no_symlink(path, inside)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise with_path(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def with_path(exc: OSError, path: Path) -> OSError:
    """`exc` with the file it was writing named, when it names none (a full disk as a file handle's
    write reports it), so the error boundary can say which file."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


def atomic_write_bytes(path: str | Path, data: bytes, inside: Path | None = None) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), inside)


def atomic_write_text(path: str | Path, text: str, inside: Path | None = None) -> Path:
    """`text` as UTF-8; a name that is not valid UTF-8 (a file name in bad_images.txt) is written as
    its bytes (surrogateescape), never a crash."""
    return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"), inside)


def atomic_save(obj: Any, path: str | Path, inside: Path | None = None) -> Path:
    """torch.save through `atomic_write`."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh), inside)


def temp_path_for(path: Path) -> Path:
    """A fresh temp name next to `path` for writers that need a file name, not a handle (TorchScript,
    ONNX); pair it with `replace_from_temp`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def replace_from_temp(tmp: Path, path: Path, inside: Path | None = None) -> None:
    """fsync `tmp`, rename it over `path` (the second half of `temp_path_for`); removes `tmp` on failure."""
    try:
        check_no_symlink(path, inside)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: str | Path, line: str, inside: Path | None = None) -> None:
    """Append `line` (one JSONL row, with its newline) to `path`, never through a symlink: the one
    write that is not a rename (a log rewritten per row would cost the square of its length)."""
    path = Path(path)
    check_no_symlink(path, inside)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"'{path}' is a symlink; kith appends only to a regular file: remove the link") \
                from None
        raise
    with os.fdopen(fd, "ab") as fh:
        fh.write(line.encode("utf-8", "surrogateescape"))
