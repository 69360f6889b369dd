"""Export a trained backbone: a plain state_dict (torchvision keys for ResNets), a `torch.export` archive,
TorchScript or ONNX."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from kith.evaluation.readers import METADATA_FILE, load_eval_target
from kith.runs.manifest import run_owning
from kith.utils.errors import UserError
from kith.utils.files import atomic_save, replace_from_temp, temp_path_for

FORMATS = ("state_dict", "export", "torchscript", "onnx")


def export_backbone(source: str | Path, output: str | Path, fmt: str = "state_dict") -> Path:
    """Write the online backbone of a run folder / checkpoint to `output`.

    - `state_dict`: `{"state_dict": ..., "backbone": name, "cifar_stem": bool, "feature_dim": F}`;
      the ResNet keys are torchvision's (without `fc.*`), so
      `torchvision.models.resnet18().load_state_dict(sd, strict=False)` accepts them
      (after swapping conv1 for the CIFAR stem when `cifar_stem`).
    - `export`: `torch.export` with a dynamic batch axis (a `.pt2` archive, PyTorch's successor of
      TorchScript); `torch.export.load(f).module()` runs it without kith, and the metadata rides along as
      the extra file `kith.json`.
    - `torchscript`: `torch.jit.trace` on a (1, 3, S, S) input; the state_dict format's metadata
      (backbone name, stem, width, feature_dim, image_size) rides along as the extra file `kith.json`,
      so `kith eval --checkpoint b.ts` evaluates at the trained size.
    - `onnx`: `torch.onnx.export` with a dynamic batch axis, weights inside the one `.onnx` file (a
      copied file loads on its own), the same metadata as `metadata_props` (needs the `onnx` extra).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; one of {', '.join(FORMATS)}")
    output = Path(output)
    _check_output(Path(source), output)
    backbone, cfg, _ = load_eval_target(source)  # reads the checkpoint once
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, cfg.data.size, cfg.data.size)
    with torch.no_grad():
        feature_dim = backbone(example).shape[1]
    meta = {"backbone": cfg.backbone.name, "cifar_stem": cfg.backbone.cifar_stem, "width": cfg.backbone.width,
            "feature_dim": feature_dim, "image_size": cfg.data.size}
    if fmt == "state_dict":
        return atomic_save({"state_dict": backbone.state_dict(), **meta}, output)
    tmp = temp_path_for(output)  # the other formats write to a name, not a handle
    try:
        if fmt == "export":
            # batch 2: an example batch of 1 lets the exporter specialise the batch axis to a constant
            program = torch.export.export(backbone, (example.expand(2, -1, -1, -1),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
            with open(tmp, "wb") as handle:  # a handle: torch.export warns about a path not ending in .pt2
                torch.export.save(program, handle, extra_files={METADATA_FILE: json.dumps(meta)})
        elif fmt == "torchscript":
            with warnings.catch_warnings():  # torch deprecates TorchScript in favour of torch.export (above)
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(backbone, example)
            traced.save(str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
        else:
            _export_onnx(backbone, cfg.data.size, tmp, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_from_temp(tmp, output)
    return output


def _check_output(source: Path, output: Path) -> None:
    """An export never replaces its source, nor a file a run folder owns (its checkpoints, config...)."""
    if output.is_dir():
        raise UserError(f"'{output}' is a folder: give the export a file name "
                        f"(e.g. {output / 'backbone.pt'})")
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise UserError(f"refusing to export over the source '{source}': choose another output file")
    owner = run_owning(output)
    if owner is not None:
        raise UserError(f"refusing to write '{output}': it is a file of the run in '{owner}' (its "
                        f"checkpoint, config or log); export elsewhere, e.g. "
                        f"{owner / 'export' / output.name}")


def _export_onnx(backbone: torch.nn.Module, size: int, path: Path, meta: dict) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript "
                        "(the onnx extra)") from None
    # batch 2: an example batch of 1 lets the exporter specialise the batch axis to a constant
    example = torch.randn(2, 3, size, size)
    torch.onnx.export(backbone, (example,), str(path), input_names=["images"], output_names=["features"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    model = onnx.load(str(path))
    for key, value in meta.items():
        model.metadata_props.add(key=f"kith.{key}", value=json.dumps(value))
    onnx.save(model, str(path))
