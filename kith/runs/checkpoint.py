"""Training checkpoints: `checkpoints/last.pt` written atomically and only with finite state (the
checkpoint it replaces is kept as `checkpoints/prev.pt`, the fallback when last.pt is damaged),
read back in one place, and upgraded from older kith versions."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

from kith.runs.files import _save_temp, atomic_save, check_archive_size, load_file
from kith.utils.errors import UserError, first_line
from kith.utils.files import check_no_symlink
from kith.utils.rng import plain_rng_state

CHECKPOINT = "checkpoints/last.pt"  # relative to the run folder
PREV_CHECKPOINT = "checkpoints/prev.pt"  # the checkpoint last.pt replaced (a fallback if last.pt is damaged)


def upgrade_checkpoint(path: str | Path) -> Path:
    """Rewrite a checkpoint of an older kith (numpy's RNG state pickled) in the weights-only form.

    This unpickles the file in full, which runs any code a crafted file holds: only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'")
    check_archive_size(path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("rng"), dict):
        obj["rng"] = plain_rng_state(obj["rng"])
    atomic_save(obj, path)
    load_file(path)  # what remains is weights-only, or the one-line refusal says what is not
    return path


def _is_write_failure(exc: BaseException) -> bool:
    """A full disk (or quota, or file-size limit) as torch.save reports it: an OSError, or the
    RuntimeError of its zip writer (`[enforce fail at inline_container.cc] ... unexpected pos` /
    `file write failed`)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text
                                              or "basic_ios::clear" in text)


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """Write checkpoints/last.pt atomically; the checkpoint it replaces becomes checkpoints/prev.pt.

    A failed write (disk full) leaves both previous files as they were, removes the temp file and
    stops with a one-line UserError. Callers check the state is finite first (`non_finite_keys`).
    """
    last, prev = run_dir / CHECKPOINT, run_dir / PREV_CHECKPOINT
    check_no_symlink(last, run_dir)
    check_no_symlink(prev, run_dir)
    try:
        tmp = _save_temp(state, last)
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        reason = first_line(exc)
        raise UserError(f"disk full while writing the checkpoint to '{last}' ({reason}); the previous "
                        "checkpoint is kept: free some space and resume with --resume RUN_DIR") from None
    staged = prev.with_name(prev.name + ".tmp")
    try:
        if last.is_file():
            # a hard link puts the old checkpoint at prev.pt while last.pt still exists, so a crash between
            # the renames never leaves the folder without last.pt; without links, a rename
            staged.unlink(missing_ok=True)
            try:
                os.link(last, staged)
                os.replace(staged, prev)
            except OSError:
                os.replace(last, prev)
        os.replace(tmp, last)
    except BaseException:  # a signal between the renames: no temp file stays behind
        tmp.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
        raise


def _floating_tensors(obj: Any, prefix: str = ""):
    """(dotted name, tensor) of every floating-point tensor in nested dicts / lists / tuples."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def non_finite_keys(state: Any) -> list[str]:
    """Names of the floating tensors in `state` (a checkpoint's nested dicts) holding NaN or inf.

    One fused L2 norm per tensor (`_foreach_norm`: NaN and inf propagate) and one host sync when all are
    finite; only a non-finite norm (or a finite tensor so large its norm overflows) pays for the exact
    per-tensor pass, which names the culprits. The max-|x| norm would never overflow but is ~50x
    slower on CPU (ResNet-50 weights + momentum: 3.2 s against 0.06 s on the 2-core dev machine).
    """
    named = list(_floating_tensors(state))
    if not named:
        return []
    tensors = [t.detach() for _, t in named]
    device = tensors[0].device
    norms = torch.stack([n.float().to(device) for n in torch._foreach_norm(tensors)])
    if bool(torch.isfinite(norms).all()):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


def load_checkpoint(run_dir: Path, map_location: Any) -> dict:
    """The checkpoint a run resumes from (see `kith.train.state` for its keys); a damaged file (truncated,
    overwritten, not a kith checkpoint) is a one-line UserError that offers prev.pt."""
    path, prev = run_dir / CHECKPOINT, run_dir / PREV_CHECKPOINT
    offer = (f"the previous one is at '{prev}': mv it to '{path}' and resume again" if prev.is_file()
             else "no previous checkpoint is kept; start the run again")
    try:
        ckpt = load_file(path, map_location)
        reason = None if isinstance(ckpt, dict) and {"method", "optimizer", "epoch", "step"} <= ckpt.keys() \
            else "not a kith training checkpoint"
    except UserError as exc:  # refused by load_file (not weights-only): its reason, and the way back
        raise UserError(f"{exc}; {offer}" if prev.is_file() else str(exc)) from None
    except Exception as exc:  # noqa: BLE001  (PytorchStreamReader RuntimeError, EOFError, UnpicklingError, ...)
        reason = first_line(exc, limit=160)
    if reason is None:
        return ckpt
    raise UserError(f"checkpoint '{path}' is corrupt ({reason}); {offer}")


