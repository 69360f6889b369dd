"""The setup sequence shared by the training loop, `kith bench` and the GPU benchmark: device,
precision, data, method, optimiser and step, built once from the root config."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kith.methods import get_method_class
from kith.methods.base import Method
from kith.methods.context import TrainInfo
from kith.nn.backbones import build_backbone


# ---- helpers --------------------------------------------------------------------------------
def build_method(cfg: DictConfig, info: TrainInfo) -> Method:
    backbone, feature_dim = build_backbone(cfg.backbone)
    # the method's own Config dataclass, not the DictConfig: plain attributes are constants to torch.compile
    # (tracing OmegaConf's __getattr__ breaks the graph) and cheaper to read every step
    method_cfg = OmegaConf.to_object(cfg.method)
    return get_method_class(cfg.method.name)(method_cfg, backbone, feature_dim, info)
