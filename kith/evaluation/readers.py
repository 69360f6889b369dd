"""Reading a backbone from any file kith accepts: a run folder, a training checkpoint, an export
(state_dict with metadata, TorchScript, ONNX metadata), or a bare state_dict, as one dispatch
(`load_eval_target`) over one small reader per kind."""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kith.config import build_config
from kith.nn.backbones import build_backbone
from kith.runs.files import is_torchscript, load_file
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
    overrides = list(overrides or [])
    info: dict = {"file": str(file)}

    def config_from_overrides(known: list[str]) -> DictConfig:
        """A file without a config: the user names the data (and, for a bare state_dict, the network)."""
        if need_data and not any(o.startswith(("data.", "preset=")) for o in overrides):
            raise UserError(f"'{file}' holds no run config; say which data to evaluate on with "
                            "data.name=... data.path=... (or preset=...)")
        return build_config(known + overrides)

    if isinstance(obj, tuple):  # a torch.export archive: (module, metadata)
        module, meta = obj
        info["backbone"] = meta.get("backbone", "exported backbone")
        known = [f"data.size={meta['image_size']}"] if "image_size" in meta else []
        return module, config_from_overrides(known), info
    if isinstance(obj, torch.nn.Module):  # TorchScript or a pickled module
        meta = _export_metadata(file)
        if need_data and "image_size" not in meta and not any(o.startswith("data.size=") for o in overrides):
            raise UserError(f"'{file}' records no input size (exported before kith stored it); say the "
                            "size it was trained at with data.size=...")
        info["backbone"] = meta.get("backbone", "TorchScript backbone")
        known = [f"data.size={meta['image_size']}"] if "image_size" in meta else []
        return obj.eval(), config_from_overrides(known), info
    if not isinstance(obj, dict):
        raise UserError(f"'{file}' holds a {type(obj).__name__}, not a kith checkpoint or backbone "
                        "state_dict")
    if "config" in obj:
        cfg = build_config(overrides, base=OmegaConf.create(obj["config"]))
        info["method"] = cfg.method.name
    elif isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("backbone"), str):  # `kith export`
        known = [f"backbone.name={obj['backbone']}"]
        known += [f"backbone.{k}={obj[k]}" for k in ("cifar_stem", "width") if k in obj]
        if "image_size" in obj:
            known.append(f"data.size={obj['image_size']}")
        cfg = config_from_overrides(known)
    elif obj and all(torch.is_tensor(v) for v in obj.values()):
        if not any(o.startswith("backbone.") for o in overrides):
            raise UserError(f"'{file}' is a bare state_dict without a config; say which network it is "
                            "with backbone.name=... (and data.* for the data to evaluate on)")
        cfg = config_from_overrides([])
    else:
        raise UserError(f"'{file}' is not a kith checkpoint (no config inside)")
    if "method" in obj:
        state = backbone_state(obj["method"])
    elif isinstance(obj.get("backbone"), dict):
        state = obj["backbone"]
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    backbone, _ = build_backbone(cfg.backbone)
    _load_weights(backbone, state, cfg, file)
    for key in ("step", "epoch"):
        if isinstance(obj.get(key), int):
            info[key] = obj[key]
    return backbone.eval(), cfg, info


METADATA_FILE = "kith.json"  # TorchScript `_extra_files` entry (and ONNX metadata_props keys) of an export
