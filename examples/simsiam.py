"""A new method in one file: SimSiam (Chen & He, 2021), registered with kith and trained from its CLI.

    python examples/simsiam.py pretrain method=simsiam train.epochs=5     # the demo data, as `kith pretrain`
    python examples/simsiam.py methods                                    # simsiam is listed

Importing this file registers the method; every `kith` command then knows `method.name=simsiam`, its
keys (`method.pred_hidden_dim=...`) and their ranges, and trains, checkpoints, resumes and evaluates
it like the built-in methods.
"""

import sys
from dataclasses import dataclass

import torch.nn.functional as F

from kith.cli import main
from kith.methods import Method, MethodConfig, register
from kith.nn.heads import mlp
from kith.utils.keys import count


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_dim: int = count(2048)  # projector width (hidden and output)
    pred_hidden_dim: int = count(512)  # the predictor's bottleneck


@register
class SimSiam(Method):
    summary = "predict the other view's projection, with a stop-gradient instead of a momentum network"
    Config = SimSiamConfig

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_dim, config.proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(config.proj_dim, config.pred_hidden_dim, config.proj_dim)

    def training_step(self, views, batch, step):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # D(p, z) = -cos(p, sg(z)), symmetrised
        cos = F.cosine_similarity
        loss = -0.5 * (cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean())
        return loss, {}


if __name__ == "__main__":
    sys.exit(main())
