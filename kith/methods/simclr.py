"""SimCLR (Chen et al., 2020): NT-Xent between two views over the whole gathered batch."""

from __future__ import annotations

from dataclasses import dataclass

from kith.losses import nt_xent
from kith.methods.base import Method, MethodConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.keys import count, positive


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    proj_hidden_dim: int = count(2048)
    proj_output_dim: int = count(256)
    temperature: float = positive(0.2)
    proj_bn: bool = False  # solo-learn's SimCLR projector: Linear, ReLU, Linear


@register
class SimCLR(Method):
    summary = "NT-Xent contrast of two views against all other images in the batch"
    Config = SimCLRConfig

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, bn=config.proj_bn)

    def training_step(self, views, batch, step):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        loss = nt_xent(z1, z2, self.config.temperature)
        return loss, {"z_std": embedding_std(z1)}
