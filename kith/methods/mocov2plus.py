"""MoCo v2+ (Chen et al., 2020; solo-learn's symmetric variant): InfoNCE of the online query
against the momentum key of the other view (positive) and a queue of past keys (negatives).

    q_v = projector(f_o(view_v))                          # online, (B, D)
    k_v = normalize(momentum_projector(f_t(view_v)))      # momentum, no grad, (B, D)
    L   = ½ [info_nce(q_1, k_2, queue_2, T) + info_nce(q_2, k_1, queue_1, T)]
    then push k_1 into queue_1 and k_2 into queue_2 (all-gathered under DDP)

Queue choice (MoCo pushes the momentum keys k_t): with the symmetric loss, solo-learn's MoCo v2+ — the code
behind the reported CIFAR/ImageNet-100 numbers — keeps one queue *per view*, each
`queue_size` long: the view-1 query is contrasted with view-2 keys and the queue of past
view-2 keys, and both views' keys are pushed, each to its own queue. kith does the same
(`self.queues[0]` holds view-1 keys, `self.queues[1]` view-2 keys). Both queues are pushed
*after* the loss, so the current keys are never their own negatives: `enqueue` applies them at
`after_step` (after backward, which reads the queues), so no step copies the queues.

Projector: `F → proj_hidden_dim → proj_output_dim` (512-2048-256), `Linear → ReLU → Linear`
without BatchNorm as in the official MoCo v2 code and solo-learn (`proj_bn=true` adds the
hidden BN of kith's generic `mlp`). The momentum update happens after each optimizer step
(the official code updates before the key forward: the same sequence of updates).
The InfoNCE logits are computed in float32 even under autocast (as every kith loss).

Multi-crop (`method.extra_views`) is kith's design, no reference defines it: each extra crop (online
network, one forward per crop size) is one more query against the momentum key of each global view,
with that view's queue as negatives; the loss is the mean over all (query, key) terms (with no extra
crops, the two-term mean above). The momentum network and both queues see the global views only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kith.losses import info_nce
from kith.memory import Queue
from kith.methods.base import Method, MomentumConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.keys import count, fraction, positive


@dataclass
class MoCoV2PlusConfig(MomentumConfig):
    name: str = "mocov2plus"
    views: list[str] = field(default_factory=lambda: ["strong", "strong_solarize"])
    proj_hidden_dim: int = count(2048)  # projector's hidden width
    proj_output_dim: int = count(256)  # width of queries and keys
    proj_bn: bool = False  # the official code and solo-learn have no BN in the projector
    temperature: float = positive(0.2)  # InfoNCE temperature
    queue_size: int = count(32768)  # per view
    tau_base: float = fraction(0.99)
    tau_final: float = fraction(0.999)


@register
class MoCoV2Plus(Method):
    summary = "InfoNCE of the query vs the other view's momentum key, negatives from a queue of past keys"
    Config = MoCoV2PlusConfig
    extra_views_refusal = ""  # kith's design: extra queries against the global keys

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, bn=config.proj_bn)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")
        # queues[v]: past momentum keys of view v (v = 0, 1)
        self.queues = nn.ModuleList(
            [Queue(config.queue_size, config.proj_output_dim, seed=info.seed + v) for v in range(2)])

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Online projection (B, D), un-normalised."""
        return self.projector(self.backbone(x))

    def training_step(self, views, batch, step):
        q = [self.query(v) for v in views[:2]]
        k = [self.momentum_embedding(v) for v in views[:2]]
        negatives = [queue.data for queue in self.queues]
        t = self.config.temperature
        loss = 0.5 * (info_nce(q[0], k[1], negatives[1], t) + info_nce(q[1], k[0], negatives[0], t))
        if len(views) > 2:  # multi-crop: every extra crop queries both global keys
            extra = [qc for x in views[2:] for qc in self.crops(self.query(x), views[0].shape[0])]
            terms = [info_nce(qc, k[v], negatives[v], t) for qc in extra for v in (0, 1)]
            loss = (2 * loss + sum(terms)) / (2 + len(terms))
        for queue, key in zip(self.queues, k):
            self.enqueue(queue, key, batch.labels, batch.indices)
        return loss, {"z_std": embedding_std(q[0])}
