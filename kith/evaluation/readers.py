"""Reading a backbone from any file kith accepts: a run folder, a training checkpoint, an export
(state_dict with metadata, TorchScript, ONNX metadata), or a bare state_dict, as one dispatch
(`load_eval_target`) over one small reader per kind."""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.nn.backbones import build_backbone
from kith.runs.files import check_archive_size, is_torchscript, load_file
from kith.utils.errors import UserError, first_line


def is_exported_program(path: str | Path) -> bool:
    """Whether `path` is a `torch.export` archive (`kith export --format export`, a `.pt2` file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/models/model.json") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_onnx(file: Path) -> bool:
    return file.suffix.lower() == ".onnx"


class ExportedBackbone(torch.nn.Module):
    """A `torch.export` module as a backbone. It was exported from a backbone in eval mode, so its graph
    already computes eval-mode BatchNorm; an exported module refuses `.train()`/`.eval()`, so this wrapper
    records the mode and leaves the graph as it is."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.exported = module

    def train(self, mode: bool = True) -> ExportedBackbone:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exported(x)


def _read_exported_program(file: Path) -> tuple[torch.nn.Module, dict]:
    """The backbone and `kith export` metadata of a `torch.export` archive."""
    extra = {METADATA_FILE: ""}
    check_archive_size(file)
    try:
        program = torch.export.load(str(file), extra_files=extra)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read torch.export archive '{file}': {first_line(exc)}") from None
    return ExportedBackbone(program.module()), json.loads(extra[METADATA_FILE] or "{}")


def _read_file(file: Path, explicit: bool):
    """A checkpoint or backbone file, loaded weights-only (`kith.runs.files.load_file`: a crafted file cannot
    run code). A TorchScript archive only when the user named the file itself (`explicit`), never out of a
    run folder: loading one runs the code it holds. A `torch.export` archive is returned as
    `(module, metadata)`, also only when named."""
    if _is_onnx(file):
        raise UserError(f"'{file}' is an ONNX file, which runs in onnxruntime, not in PyTorch; evaluate the "
                        "run folder it came from, or export it with --format state_dict or --format export")
    if explicit and is_exported_program(file):
        return _read_exported_program(file)
    if explicit and is_torchscript(file):
        check_archive_size(file)
        print(f"kith: note: '{file}' is a TorchScript archive; loading it runs the code it holds, so "
              "load only files you trust (`kith export --format export` writes the torch.export format "
              "instead)", file=sys.stderr)
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; the note above says what to use
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(file), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read TorchScript archive '{file}': {first_line(exc)}") from None
    try:
        return load_file(file)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (truncated or foreign)
        raise UserError(f"cannot read checkpoint '{file}': {first_line(exc)}") from None



def _checkpoint_file(path: Path) -> Path:
    file = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        what = "a kith run folder" if (path / "config.yaml").is_file() else "not a kith run folder"
        raise UserError(f"no checkpoint at '{file}' ('{path}' is {what}); pass a run folder or a .pt file")
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a run folder or a checkpoint (.pt) file")
    if not file.is_file():
        raise UserError(f"no checkpoint at '{file}'; pass a run folder or a .pt file")
    return file


def _export_metadata(file: Path) -> dict:
    """The `kith export` metadata (backbone name, image_size, ...) of a TorchScript file; {} if none."""
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(file), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_FILE] or "{}")
    except (RuntimeError, ValueError):
        return {}


def backbone_state(method_state: dict) -> dict:
    """The online backbone's weights out of a method state_dict."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_weights(backbone: torch.nn.Module, state: dict, cfg: DictConfig, file: Path) -> None:
    state = _strip_prefix(_strip_prefix(dict(state), "module."), "backbone.")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # a torchvision head, if any
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"the weights in '{file}' do not fit backbone.name={cfg.backbone.name} "
                        f"(width {cfg.backbone.width}); set backbone.* to the trained network "
                        f"({detail[:120]})"
                        ) from None


def load_eval_target(path: str | Path, overrides: list[str] | None = None, need_data: bool = True
                     ) -> tuple[torch.nn.Module, DictConfig, dict]:
    """(backbone in eval mode on the CPU, resolved config, info) for evaluating a run folder or a file.

    Accepted: a run folder (its checkpoints/last.pt); a kith training checkpoint (`method`
    and `config` inside); a dict with `config` and a `backbone` (or `state_dict`)
    state_dict; a `kith export` state_dict file (`state_dict` plus the backbone's name,
    stem, width and image size, but no data: `overrides` must name `data.*` or a preset);
    a bare backbone state_dict (`overrides` name `backbone.*` and `data.*`) or a
    TorchScript or `torch.export` backbone (`overrides` name `data.*`).
    `need_data=False` (loading a backbone, not evaluating it) asks no `data.*` of a file that has no config.
    `overrides` (`key=value`) also apply on top of a saved config (e.g. a moved `data.path`).
    info: `file`; `method`, `step` and `epoch` when the file records them.
    """
    file = _checkpoint_file(Path(path))
    obj = _read_file(file, explicit=not Path(path).is_dir())
    source = _Source(file, list(overrides or []), {"file": str(file)}, need_data)
    if isinstance(obj, tuple):  # a torch.export archive: (module, metadata)
        module, meta = obj
        source.info["backbone"] = meta.get("backbone", "exported backbone")
        known = [f"data.size={meta['image_size']}"] if "image_size" in meta else []
        return module, source.config(known), source.info
    if isinstance(obj, torch.nn.Module):  # TorchScript or a pickled module
        return obj.eval(), _torchscript_config(source), source.info
    if not isinstance(obj, dict):
        raise UserError(f"'{file}' holds a {type(obj).__name__}, not a kith checkpoint or backbone "
                        "state_dict")
    reader = next((read for matches, read in _STATE_READERS if matches(obj)), None)
    if reader is None:
        raise UserError(f"'{file}' is not a kith checkpoint (no config inside)")
    cfg = reader(obj, source)
    backbone, _ = build_backbone(cfg.backbone)
    _load_weights(backbone, _backbone_weights(obj), cfg, file)
    source.info.update({k: obj[k] for k in ("step", "epoch") if isinstance(obj.get(k), int)})
    return backbone.eval(), cfg, source.info


@dataclass
class _Source:
    """The file being read, the user's overrides and what is learnt about it on the way."""

    file: Path
    overrides: list[str]
    info: dict
    need_data: bool = True

    def config(self, known: list[str]) -> DictConfig:
        """The config of a file that holds none: the user names the data (for a bare state_dict, the
        network too); `known` is what the file itself records."""
        if self.need_data and not any(o.startswith(("data.", "preset=")) for o in self.overrides):
            raise UserError(f"'{self.file}' holds no run config; say which data to evaluate on with "
                            "data.name=... data.path=... (or preset=...)")
        return build_config(known + self.overrides)


def _torchscript_config(source: _Source) -> DictConfig:
    meta = _export_metadata(source.file)
    if (source.need_data and "image_size" not in meta
            and not any(o.startswith("data.size=") for o in source.overrides)):
        raise UserError(f"'{source.file}' records no input size (exported before kith stored it); say the "
                        "size it was trained at with data.size=...")
    source.info["backbone"] = meta.get("backbone", "TorchScript backbone")
    return source.config([f"data.size={meta['image_size']}"] if "image_size" in meta else [])


def _with_config(obj: dict, source: _Source) -> DictConfig:
    """A training checkpoint, or any dict carrying its run's config."""
    cfg = build_config(source.overrides, base=OmegaConf.create(obj["config"]))
    source.info["method"] = cfg.method.name
    return cfg


def _kith_export(obj: dict, source: _Source) -> DictConfig:
    """A `kith export` state_dict file: the network is recorded, the data is not."""
    known = [f"backbone.name={obj['backbone']}"]
    known += [f"backbone.{k}={obj[k]}" for k in ("cifar_stem", "width") if k in obj]
    if "image_size" in obj:
        known.append(f"data.size={obj['image_size']}")
    return source.config(known)


def _bare_state_dict(obj: dict, source: _Source) -> DictConfig:
    if not any(o.startswith("backbone.") for o in source.overrides):
        raise UserError(f"'{source.file}' is a bare state_dict without a config; say which network it is "
                        "with backbone.name=... (and data.* for the data to evaluate on)")
    return source.config([])


# (does this dict look like it, read its config), first match wins
_STATE_READERS = (
    (lambda obj: "config" in obj, _with_config),
    (lambda obj: isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("backbone"), str),
     _kith_export),
    (lambda obj: bool(obj) and all(torch.is_tensor(v) for v in obj.values()), _bare_state_dict),
)


def _backbone_weights(obj: dict) -> dict:
    """The backbone's state_dict inside any of the accepted dicts."""
    if "method" in obj:
        return backbone_state(obj["method"])
    if isinstance(obj.get("backbone"), dict):
        return obj["backbone"]
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


METADATA_FILE = "kith.json"  # TorchScript `_extra_files` entry (and ONNX metadata_props keys) of an export
