"""NNCLR (Dwibedi et al., 2021): contrast the other view's prediction with the nearest neighbour
of this view's projection in a support queue (follows solo-learn's NNCLR).

    z_v  = projector(f(x_v)),  p_v = predictor(z_v)                    # v = 1, 2
    nn_v = queue[argmax(normalize(z_v) @ queueᵀ)]                      # no gradient
    L    = ½ nnclr_loss(nn_1, p_2, T) + ½ nnclr_loss(nn_2, p_1, T)
    push normalize(z_1) (+ labels, dataset indices) at after_step, after the optimizer step

Multi-crop (`method.extra_views`) is kith's design, no reference defines it: each extra crop's
prediction (one forward per crop size) is contrasted with the nearest neighbours of both global views,
`nnclr_loss(nn_v, p_crop)` for v = 1, 2; the loss is the mean over all terms (with no extra crops, the
two-term mean above). Neighbours are looked up for the global views only and the queue is fed by view 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kith.losses import nnclr_loss
from kith.memory import Queue
from kith.methods.base import Method, MethodConfig, embedding_std, label_agreement, register
from kith.nn.heads import mlp
from kith.utils.keys import count, positive


@dataclass
class NNCLRConfig(MethodConfig):
    name: str = "nnclr"
    proj_hidden_dim: int = count(2048)  # projector's hidden width
    proj_output_dim: int = count(256)  # embedding width of the projections in the queue
    pred_hidden_dim: int = count(4096)  # predictor's hidden width
    temperature: float = positive(0.2)  # contrastive temperature
    queue_size: int = count(65536)  # projections in the support queue the neighbours come from


@register
class NNCLR(Method):
    summary = "nearest neighbour of one view in a support queue vs the other view's prediction"
    Config = NNCLRConfig
    extra_views_refusal = ""  # kith's design: extra queries against the global views' neighbours

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, layers=3,
                             last_bn=True)
        self.predictor = mlp(config.proj_output_dim, config.pred_hidden_dim, config.proj_output_dim)
        self.queue = Queue(config.queue_size, config.proj_output_dim, seed=info.seed)

    @torch.no_grad()
    def find_nn(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest queue entry of each row of ``z (B, D)`` by cosine similarity.

        Returns ``(idx (B,), nn (B, D))`` with ``nn = queue[argmax(normalize(z) @ queueᵀ)]``
        (already normalised, no gradient).
        """
        _, idx = self.queue.neighbours(z, 1)
        idx = idx[:, 0]
        return idx, self.queue.data[idx]

    def training_step(self, views, batch, step):
        z = [self.projector(self.backbone(v)) for v in views[:2]]
        p = [self.predictor(zi) for zi in z]
        idx1, nn1 = self.find_nn(z[0])
        _, nn2 = self.find_nn(z[1])
        t = self.config.temperature
        loss = 0.5 * (nnclr_loss(nn1, p[1], t) + nnclr_loss(nn2, p[0], t))
        if len(views) > 2:  # multi-crop: every extra crop against both global views' neighbours
            extra = [self.predictor(self.projector(self.backbone(x))) for x in views[2:]]
            terms = [nnclr_loss(nn, pc, t) for pe in extra for pc in self.crops(pe, nn1.shape[0])
                     for nn in (nn1, nn2)]
            loss = (2 * loss + sum(terms)) / (2 + len(terms))
        nn_acc = label_agreement(batch.labels, self.queue.labels[idx1])
        self.enqueue(self.queue, F.normalize(z[0].detach(), dim=-1), batch.labels, batch.indices)
        return loss, {"nn_acc": nn_acc, "z_std": embedding_std(z[0])}
