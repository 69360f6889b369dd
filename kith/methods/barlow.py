"""Barlow Twins (Zbontar et al., 2021): make the cross-correlation of the two views' batch-normalised
projections the identity.

    z_v = projector(f(x_v))                                 # 512-2048-2048-2048, no last BN
    L   = barlow_twins_loss(z_1, z_2, λ, scale)             # scale * (Σ(1-c_ii)² + λ Σ_{i≠j} c_ij²)

c is computed over the global batch (all-reduced once, divided by the global N: no world-size
factor in the gradients, unlike lightly bug #1977). λ = 0.0051 and scale 0.1 as solo-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

from kith.losses import barlow_twins_loss
from kith.methods.base import Method, MethodConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.keys import count, positive


@dataclass
class BarlowTwinsConfig(MethodConfig):
    name: str = "barlow_twins"
    proj_hidden_dim: int = count(2048)  # projector's hidden width (both hidden layers)
    proj_output_dim: int = count(2048)  # embedding width D: the cross-correlation is D x D
    lambd: float = 0.0051  # weight of the off-diagonal (redundancy) term
    scale: float = positive(0.1)  # overall loss scale


@register
class BarlowTwins(Method):
    summary = "cross-correlation of the two views' batch-normalised projections driven to the identity"
    Config = BarlowTwinsConfig
    extra_views_refusal = ("its cross-correlation is defined between exactly two views and no published "
                           "recipe adds small crops")

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, layers=3)

    def training_step(self, views, batch, step):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        loss = barlow_twins_loss(z1, z2, self.config.lambd, self.config.scale)
        return loss, {"z_std": embedding_std(z1)}
