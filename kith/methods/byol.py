"""BYOL (Grill et al., 2020): predict the EMA target's projection of the other view.

The loss sums the two directions, L(a→b) + L(b→a), as the paper (its L + L̃) and solo-learn do;
solo-learn's LARS lr of 1.0 was tuned for that scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kith.losses import byol_loss
from kith.methods.base import Method, MomentumConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.keys import count


@dataclass
class BYOLConfig(MomentumConfig):
    name: str = "byol"
    proj_hidden_dim: int = count(4096)
    proj_output_dim: int = count(256)
    pred_hidden_dim: int = count(4096)


@register
class BYOL(Method):
    summary = "online predictor regresses the momentum target of the other view, 2 - 2cos"
    Config = BYOLConfig

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim)
        self.predictor = mlp(config.proj_output_dim, config.pred_hidden_dim, config.proj_output_dim)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")

    def training_step(self, views, batch, step):
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        with torch.no_grad():
            zt = [self.momentum_projector(self.momentum_backbone(v)) for v in views]
        # the sum of both directions, as solo-learn: its LARS lr 1.0 was tuned for this scale
        loss = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
        return loss, {"z_std": embedding_std(z[0])}
