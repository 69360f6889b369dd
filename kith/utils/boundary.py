"""The error boundary of the `kith` command and the public API: a failure caused by the user's input
or environment (a file kith cannot read or write, a full disk, a name too long, text or an image that
does not decode, a config that does not parse, memory a set size cannot have) becomes one
`UserError` line naming the file or key and the fix. Anything else is a bug and keeps its traceback.
`KITH_DEBUG=1` prints the traceback of a translated error too."""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from kith.utils.errors import UserError, first_line

DEBUG_ENV = "KITH_DEBUG"

# keys whose values size an allocation: what an out-of-memory message suggests lowering
SIZE_KEYS = ("train.batch_size", "data.size", "backbone.width", "the method's queue_size / bank_size",
             "eval.batch_size")

_OS_FIX = {
    errno.ENOSPC: "the disk is full: free some space (an interrupted run resumes with --resume RUN_DIR)",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EFBIG: "the file is larger than this file system allows",
    errno.EACCES: "permission denied: fix the permissions or choose another folder (out_dir=..., --run-dir)",
    errno.EPERM: "not permitted: fix the permissions or choose another folder (out_dir=..., --run-dir)",
    errno.EROFS: "the file system is read-only: choose a writable folder (out_dir=..., --run-dir)",
    errno.ENAMETOOLONG: "the name is too long for the file system: shorten run_name, out_dir or the path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path (--run-dir must be a folder)",
    errno.EISDIR: "it is a folder where a file is expected: check the path",
    errno.ELOOP: "too many levels of symlinks (a symlink loop): remove the loop",
    errno.EEXIST: "it exists already: remove it or choose another name",
    errno.EIO: "the device reported an I/O error: check the disk",
}


def _os_error(exc: OSError) -> UserError:
    path = exc.filename if exc.filename is not None else None
    fix = _OS_FIX.get(exc.errno) if exc.errno is not None else None
    fix = fix or f"{exc.strerror or first_line(exc)}: check the path and its permissions"
    if path is None:
        return UserError(f"{fix} ({first_line(exc, 160)})")
    shown = str(path) if len(str(path)) <= 200 else str(path)[:120] + "..." + str(path)[-40:]
    return UserError(f"cannot use '{shown}': {fix}")


def _memory_error(exc: BaseException) -> UserError:
    wanted = re.search(r"allocate (\d+) bytes", str(exc))
    size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB in one allocation)" if wanted else ""
    return UserError(f"out of memory{size}: lower the setting that sizes it ({', '.join(SIZE_KEYS)}), "
                     f"or use a machine with more memory")


def _is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
        or "not enough memory" in text or "CUDA out of memory" in text)


def _is_zip_write_failure(exc: BaseException) -> bool:
    """torch.save's zip writer failing on a full disk (`inline_container.cc ... unexpected pos`,
    `file write failed`, `basic_ios::clear`)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "inline_container" in text or "file write failed" in text or "basic_ios::clear" in text)


def _parse_error(exc: BaseException) -> UserError | None:
    """YAML, OmegaConf and image-decoding errors: the user's file or value does not parse."""
    module = type(exc).__module__ or ""
    if module.startswith("yaml"):
        return UserError(f"cannot parse YAML ({first_line(exc, 200)}): kith reads plain YAML only (no "
                         "python tags): fix the file")
    if module.startswith("omegaconf"):
        key = getattr(exc, "full_key", None)
        where = f" at '{key}'" if key else ""
        return UserError(f"bad config value{where}: {first_line(exc, 200)}; config values are plain "
                         "values (interpolations such as ${...} are not supported): fix the value")
    if module.startswith("PIL"):
        return UserError(f"cannot decode an image ({first_line(exc, 200)}): remove the file, or set "
                         "data.skip_bad_images=true")
    return None


def as_user_error(exc: BaseException) -> UserError | None:
    """The one-line UserError for a failure caused by the user's input or environment, or None (a bug)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, UnicodeError):
        where = getattr(exc, "object", b"")
        return UserError(f"text that is not valid UTF-8 ({first_line(exc, 160)}; {len(where)} bytes): "
                         "save the file as UTF-8")
    if isinstance(exc, OSError):
        return _os_error(exc)
    if _is_memory_error(exc):
        return _memory_error(exc)
    if _is_zip_write_failure(exc):
        return UserError(f"writing a file failed ({first_line(exc, 120)}), most likely a full disk: free "
                         "some space")
    return _parse_error(exc)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Decorate a public function: the user's and the environment's failures leave it as one-line
    `UserError`s (the original chained as its cause); a bug's exception passes unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            translated = as_user_error(exc)
            if translated is None:
                raise
            raise translated from exc

    return wrapper  # type: ignore[return-value]
