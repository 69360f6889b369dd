"""SimCLR (Chen et al., 2020): NT-Xent between two views over the whole gathered batch.

Multi-crop (`method.extra_views`), as solo-learn's SimCLR: the embeddings of all crops (the two global
views and the extra crops, one forward per crop size) enter one multi-positive InfoNCE in which every
other crop of the same image is a positive (`kith.losses.multi_positive_nt_xent`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kith.losses import multi_positive_nt_xent, nt_xent
from kith.methods.base import Method, MethodConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.keys import count, positive


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    proj_hidden_dim: int = count(2048)  # projector's hidden width
    proj_output_dim: int = count(256)  # embedding width
    temperature: float = positive(0.2)  # NT-Xent temperature
    proj_bn: bool = False  # solo-learn's SimCLR projector: Linear, ReLU, Linear


@register
class SimCLR(Method):
    summary = "NT-Xent contrast of two views against all other images in the batch"
    Config = SimCLRConfig
    extra_views_refusal = ""  # all crops in one multi-positive InfoNCE (solo-learn)

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, bn=config.proj_bn)

    def training_step(self, views, batch, step):
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        if len(views) == 2:
            loss = nt_xent(z1, z2, self.config.temperature)
        else:  # multi-crop: one forward per extra crop size, all crops in one loss
            z = torch.cat([z1, z2, *(self.projector(self.backbone(x)) for x in views[2:])])
            loss = multi_positive_nt_xent(z, z.shape[0] // z1.shape[0], self.config.temperature)
        return loss, {"z_std": embedding_std(z1)}
