"""The run manifest, `RUN_DIR/.kith-run.json`: written when a run starts, it lists the entries of the
folder that kith creates there and that did not exist before. `--overwrite` deletes those and nothing
else, and refuses a folder with content but no manifest (a folder kith did not make: a user's
`plots/`, `wandb/` or `tensorboard/` stay theirs). An export never writes over a file a run owns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kith.utils.errors import UserError
from kith.utils.files import atomic_write_text

MANIFEST = ".kith-run.json"  # relative to the run folder
LOCK = ".lock"  # relative to the run folder: {"pid", "host"} of the process writing it
# what a run may create in its folder (plots by `kith plot`, tensorboard/wandb by train.logger)
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "bad_images.txt", "plots",
               "tensorboard", "wandb")
_OWN = (MANIFEST, LOCK)


def read_manifest(run_dir: Path) -> list[str] | None:
    """The entries the run's manifest lists, or None without a (readable) manifest."""
    try:
        entries = json.loads((run_dir / MANIFEST).read_text())["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, str) and e in RUN_ENTRIES]


def write_manifest(run_dir: Path) -> None:
    """At a new run's start (the folder locked, an old run cleared): claim the entries not there yet."""
    created = [name for name in RUN_ENTRIES
               if not (run_dir / name).exists() and not (run_dir / name).is_symlink()]
    atomic_write_text(run_dir / MANIFEST, json.dumps({"kith_run": 1, "created": created}) + "\n",
                      inside=run_dir)


def check_overwrite(run_dir: Path) -> None:
    """`--overwrite` into a folder with content needs the manifest of the run it replaces."""
    if not run_dir.is_dir() or read_manifest(run_dir) is not None:
        return
    if any(p.name not in _OWN for p in run_dir.iterdir()):
        raise UserError(f"--overwrite refused: '{run_dir}' has no kith run manifest ({MANIFEST}), so kith "
                        "cannot tell its files from yours and deletes nothing; choose an empty or new "
                        "--run-dir, or empty this folder yourself")


def clear_run(run_dir: Path) -> None:
    """Delete what the manifest says the old run created (a symlink: the link, never its target)."""
    for name in read_manifest(run_dir) or []:
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def run_owning(path: Path) -> Path | None:
    """The run folder whose own file `path` would be (its checkpoints, config, metrics, summary), or None."""
    path = Path(path).absolute()
    path = path.parent.resolve() / path.name  # the same folder under another name (a link) counts
    for folder in path.parents:
        if (folder / MANIFEST).is_file() or ((folder / "config.yaml").is_file()
                                             and (folder / "checkpoints").is_dir()):
            top = path.relative_to(folder).parts[0]
            return folder if top in RUN_ENTRIES[:5] or top in _OWN else None
    return None
