"""BYOL (Grill et al., 2020): predict the EMA target's projection of the other view.

The loss sums the two directions, L(a→b) + L(b→a), as the paper (its L + L̃) and solo-learn do;
solo-learn's LARS lr of 1.0 was tuned for that scale.

Multi-crop (`method.extra_views`), as solo-learn's BYOL: every crop (global or extra) predicts the
momentum target of each global crop other than itself; the momentum network sees the global crops
only, the extra crops go through the online network, one forward per crop size. The terms are SUMMED
over the (target, crop) pairs, as solo-learn does: with no extra crops this is exactly the two-view
sum above, and LARS (the presets' optimiser) scales each layer's update by its trust ratio
||w|| / ||grad||, so the larger sum changes the weights' step size little (biases and norms, which LARS
leaves out, do see it)."""

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
    proj_hidden_dim: int = count(4096)  # projector's hidden width
    proj_output_dim: int = count(256)  # embedding width the predictor maps back to
    pred_hidden_dim: int = count(4096)  # predictor's hidden width


@register
class BYOL(Method):
    summary = "online predictor regresses the momentum target of the other view, 2 - 2cos"
    Config = BYOLConfig
    extra_views_refusal = ""  # each crop predicts each other global crop's target (solo-learn)

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim)
        self.predictor = mlp(config.proj_output_dim, config.pred_hidden_dim, config.proj_output_dim)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")

    def training_step(self, views, batch, step):
        z = [self.projector(self.backbone(v)) for v in views[:2]]
        p = [self.predictor(zi) for zi in z]
        with torch.no_grad():
            zt = [self.momentum_projector(self.momentum_backbone(v)) for v in views[:2]]
        # the sum of both directions, as solo-learn: its LARS lr 1.0 was tuned for this scale
        loss = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
        b = views[0].shape[0]
        for x in views[2:]:  # multi-crop: one forward per extra crop size, a term per (crop, target)
            for pc in self.crops(self.predictor(self.projector(self.backbone(x))), b):
                loss = loss + byol_loss(pc, zt[0]) + byol_loss(pc, zt[1])
        return loss, {"z_std": embedding_std(z[0])}
