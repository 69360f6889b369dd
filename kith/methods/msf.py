"""MSF, mean shift for self-supervised learning (Koohpayegani et al., 2021; follows the official
code): the online query regresses the k nearest neighbours of the EMA target in a memory bank.

    query  = normalize(predictor(projector(f_o(strong(x)))))     # (B, D)
    target = normalize(projector_t(f_t(weak(x))))                # EMA teacher, no grad, (B, D)
    bank.push(gather(target))                                    # BEFORE the lookup (official order)
    nn     = topk(target @ bankᵀ, k)                             # by the TARGET's similarity
    L      = mean_i mean_{j in nn_i} (2 - 2 query_i · bank_j)    # kith.losses.mean_shift_loss

Since the bank already holds the current target, each target's nearest neighbour is itself
(the image's other view): with `k=1` the loss is BYOL's `2 - 2 cos(query, target)`. So the
push cannot wait for `after_step` as every other queue's does: it goes through
`Method.push_before_lookup`, the named exception to `Method.enqueue`.

Heads follow the code's rule from the backbone width F (each `None` key is derived):
projector `F → 2F (BN, ReLU) → F/4`, predictor `F/4 → 2F (BN, ReLU) → F/4`
(ResNet-18: 512-1024-128). EMA teacher (backbone + projector) with constant τ = 0.99; the
official code updates the teacher before its forward, kith after each optimizer step (the
same sequence of updates). The bank is a FIFO `Queue` of `bank_size` normalised targets that
also keeps their labels (-1 when unknown) and dataset indices; it is part of the checkpoint.

`symmetric=true` (not in the official code) adds the swapped direction (weak → query,
strong → target): both views' targets are pushed first, then each direction looks up its own
neighbours, and the loss is the mean of the two.

Multi-crop (`method.extra_views`) is kith's design, no reference defines it: each extra crop's query
(online network, one forward per crop size) regresses the neighbours of each target MSF computes (the
weak view's; both views' with `symmetric`), looked up once per target. The teacher and the bank see
the global views only. The terms are AVERAGED, each (crop, target) one term: MSF's loss is a mean
(over its directions already), and its SGD lr (0.05, no LARS trust ratio to absorb a larger scale) was
tuned for that mean; with no extra crops it is exactly the loss above. `purity` stays the global views'.

Metrics: `purity`, the fraction of the k neighbours (the sample's own target included, as it
is one of the k) whose bank label equals the sample's label, over samples with a known label
(None when no label is known); `z_std` of the online projection.

Presets: the official bank of 128,000 exceeds the training set on CIFAR (50k) and STL-10 (105k) and
nearly fills it on ImageNet-100 (~126k), so kith's presets keep `bank_size` below the dataset size;
the weak view blurs with p=0.5 only at ImageNet size, as the official code (which has no CIFAR
recipe) does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kith.losses import mean_shift_loss
from kith.memory import Queue
from kith.methods.base import Method, MomentumConfig, embedding_std, label_agreement, register
from kith.nn.heads import mlp
from kith.utils.errors import UserError
from kith.utils.keys import count, fraction


@dataclass
class MSFConfig(MomentumConfig):
    name: str = "msf"
    views: list[str] = field(default_factory=lambda: ["strong", "weak"])  # query, target
    proj_hidden_dim: int | None = count(None)  # None = 2F
    proj_output_dim: int | None = count(None)  # None = F/4
    pred_hidden_dim: int | None = count(None)  # None = 2F
    bank_size: int = count(32768)  # past targets in the bank the neighbours come from
    # neighbours per target (the paper's 5; the repository's example command uses 10)
    k: int = count(5, at_most="bank_size")
    symmetric: bool = False  # also the swapped direction (weak-view query, strong-view target)
    tau_base: float = fraction(0.99)
    tau_final: float = fraction(0.99)


@register
class MSF(Method):
    summary = "query regresses the k nearest bank neighbours of the EMA target (mean shift)"
    Config = MSFConfig
    extra_views_refusal = ""  # kith's design: extra queries against the targets' neighbours

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        if not 1 <= config.k <= config.bank_size:
            raise UserError(f"method.k={config.k} must be between 1 and method.bank_size={config.bank_size}")
        hidden = config.proj_hidden_dim or 2 * feature_dim
        out = config.proj_output_dim or max(feature_dim // 4, 1)
        pred_hidden = config.pred_hidden_dim or 2 * feature_dim
        self.projector = mlp(feature_dim, hidden, out)
        self.predictor = mlp(out, pred_hidden, out)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")
        self.bank = Queue(config.bank_size, out, seed=info.seed)

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(z, query)`: online projection and normalize(predictor(z)), (B, D)."""
        z = self.projector(self.backbone(x))
        return z, F.normalize(self.predictor(z), dim=-1)

    def training_step(self, views, batch, step):
        k = self.config.k
        pairs = [(0, 1), (1, 0)] if self.config.symmetric else [(0, 1)]  # (query view, target view)
        targets = {t: self.momentum_embedding(views[t]) for _, t in pairs}
        for _, t in pairs:  # the official order: each target is among its own neighbours
            self.push_before_lookup(self.bank, targets[t], batch.labels, batch.indices)
        bank = self.bank.data
        losses, nn_labels, z0, found = [], [], None, {}
        for qv, t in pairs:
            z, query = self.query(views[qv])
            z0 = z if z0 is None else z0
            _, nn_idx = found[t] = self.bank.neighbours(targets[t], k)  # (B, k), by the target's similarity
            losses.append(mean_shift_loss(query, targets[t], bank, k, nn_idx=nn_idx))  # float32 inside
            nn_labels.append(self.bank.labels[nn_idx])
        for x in views[2:]:  # multi-crop: every extra crop regresses every target's neighbours
            for qc in self.crops(self.query(x)[1], views[0].shape[0]):
                losses += [mean_shift_loss(qc, targets[t], bank, k, nn_idx=found[t][1]) for t in found]
        loss = torch.stack(losses).mean()
        labels = batch.labels.to(self.bank.labels.device)
        purity = label_agreement(torch.cat([labels] * len(pairs)), torch.cat(nn_labels))
        return loss, {"purity": purity, "z_std": embedding_std(z0)}
