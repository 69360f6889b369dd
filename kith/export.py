"""Export a trained backbone: a plain state_dict (torchvision keys for ResNets), TorchScript or ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from kith.api import load_eval_target
from kith.errors import UserError

FORMATS = ("state_dict", "torchscript", "onnx")


def export_backbone(source: str | Path, output: str | Path, fmt: str = "state_dict") -> Path:
    """Write the online backbone of a run folder / checkpoint to `output`.

    - `state_dict`: `{"state_dict": ..., "backbone": name, "cifar_stem": bool, "feature_dim": F}`;
      the ResNet keys are torchvision's (without `fc.*`), so
      `torchvision.models.resnet18().load_state_dict(sd, strict=False)` accepts them
      (after swapping conv1 for the CIFAR stem when `cifar_stem`).
    - `torchscript`: `torch.jit.trace` on a (1, 3, S, S) input.
    - `onnx`: `torch.onnx.export` with a dynamic batch axis (needs the `onnx` extra).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; one of {', '.join(FORMATS)}")
    backbone, cfg, _ = load_eval_target(source)  # reads the checkpoint once
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, cfg.data.size, cfg.data.size)
    with torch.no_grad():
        feature_dim = backbone(example).shape[1]
    tmp = output.with_name(output.name + ".tmp")
    if fmt == "state_dict":
        torch.save({"state_dict": backbone.state_dict(), "backbone": cfg.backbone.name,
                    "cifar_stem": cfg.backbone.cifar_stem, "width": cfg.backbone.width,
                    "feature_dim": feature_dim, "image_size": cfg.data.size}, tmp)
    elif fmt == "torchscript":
        torch.jit.trace(backbone, example).save(str(tmp))
    else:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError("ONNX export needs onnx: pip install 'kith-ssl[onnx]'") from None
        torch.onnx.export(backbone, example, str(tmp), input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    tmp.replace(output)
    return output
