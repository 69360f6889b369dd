"""ReSSL, TPAMI version (Zheng et al., "Weak Augmentation Guided Relational Self-Supervised
Learning"): the student's similarity distribution over a queue of teacher embeddings matches
the sharper distribution of an EMA teacher on a weakly augmented view.

    q = normalize(predictor(projector(f_o(strong(x)))))     # student, (B, D)
    k = normalize(projector_t(f_t(weak(x))))                 # EMA teacher, no grad, (B, D)
    L = relation_loss(q, k, queue, t_student=0.1, t_teacher=0.04)
    then queue.push(gather(k))                               # AFTER the loss (at after_step)

What follows the official (NeurIPS) code and solo-learn:
- the relation loss itself: softmax of `k·queueᵀ / 0.04` (teacher, sharper) as the target of
  `log_softmax(q·queueᵀ / 0.1)` (student), in float32 (`kith.losses.relation_loss`);
- one direction only (strong view → student, weak view → teacher), not symmetrised;
- the push order: the current batch's teacher keys enter the queue only after the loss, so an
  image's own key is never in its relation;
- the projector `Linear(F, 4096) → ReLU → Linear(4096, 512)` without BatchNorm, shared by the
  student and its EMA copy; the EMA teacher (backbone + projector) with a constant τ = 0.99
  (the official code updates the teacher before its forward, kith after each optimizer step:
  the same sequence of updates);
- the CIFAR defaults (queue 4096, SGD lr 0.06, wd 5e-4, weak/strong recipes) in the presets.

kith's reconstruction of the TPAMI additions (the paper's body and code are not public; every
choice is a config key):
- an asymmetric predictor `mlp(D, pred_hidden_dim, D)` with BN on the student only
  (`predictor=false` gives NeurIPS ReSSL: q = normalize(projector(f_o(strong(x)))));
- an InfoNCE warm-up: while `epoch_progress < warmup_epochs` the loss is
  `info_nce(q, k, queue, T=warmup_temperature)` (positive: the teacher key of the same image,
  negatives: the same queue as the relation loss, also taken before the push), then
  `relation_loss`. `warmup_mode=switch` changes abruptly; `blend` uses
  `w·InfoNCE + (1-w)·relation` with `w = 1 - epoch_progress / warmup_epochs` falling linearly
  from 1 to 0 over the warm-up. The metric `warmup_weight` is `w`, the InfoNCE weight.

Multi-crop (`method.extra_views`), as the official `ressl_multi.py` (mingkai-zheng/ReSSL, formerly
KyleZheng1997/ReSSL, @4d67daa): the teacher sees ONE weak global crop k (B, D); the student sees the
strong global crop and every extra crop, each crop size through the encoder in its own forward (so
BatchNorm statistics are per size, as the official per-crop forwards; crops of one size share a forward),
and q = cat over the crops (n B, D). The teacher's relation of image b is the target of each of its
student crops (`logits_k.repeat(n, 1)`) and the loss is the plain mean over all n B rows
(`kith.losses.relation_loss` with q of n B rows). Only k is enqueued. The InfoNCE warm-up extends the
same way: every student crop's positive is its image's teacher key, the mean over all n B rows.
The official 5-crop recipe (224/192/160/128/96) is the `imagenet/ressl-multicrop` preset.

Metrics: `loss_relation` (always computed), `loss_infonce` (while its weight is positive; in a compiled
step, every step when `warmup_epochs > 0`: there both terms are computed and weighted on the device,
so the step is one graph over the whole run, at the cost of one more (B, queue) similarity product
after the warm-up), `warmup_weight`, `z_std` (of the student projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kith.losses import info_nce, relation_loss
from kith.memory import Queue
from kith.methods.base import Method, MomentumConfig, embedding_std, register
from kith.nn.heads import mlp
from kith.utils.device import to_device
from kith.utils.errors import check_choice
from kith.utils.keys import count, fraction, positive

WARMUP_MODES = ("switch", "blend")


@dataclass
class ReSSLConfig(MomentumConfig):
    name: str = "ressl"
    views: list[str] = field(default_factory=lambda: ["strong", "weak"])  # student, teacher
    proj_hidden_dim: int = count(4096)  # projector's hidden width
    proj_output_dim: int = count(512)  # embedding width of student, teacher and queue
    predictor: bool = True  # TPAMI asymmetric student predictor; false = NeurIPS ReSSL
    pred_hidden_dim: int = count(4096)  # student predictor's hidden width (with `predictor`)
    queue_size: int = count(4096)  # teacher embeddings in the relation queue
    t_student: float = positive(0.1)  # temperature of the student's relation
    t_teacher: float = positive(0.04)  # temperature of the teacher's relation (the sharper one)
    warmup_epochs: float = 5.0  # InfoNCE warm-up length in epochs (0 = off)
    warmup_mode: str = "switch"  # switch | blend
    warmup_temperature: float = positive(0.2)  # InfoNCE temperature during the warm-up
    tau_base: float = fraction(0.99)
    tau_final: float = fraction(0.99)


@register
class ReSSL(Method):
    summary = "student's relation to a queue (strong view) matches a sharper EMA teacher's (weak view)"
    Config = ReSSLConfig
    extra_views_refusal = ""  # extra crops are student crops (ressl_multi.py)

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        check_choice("method.warmup_mode", config.warmup_mode, WARMUP_MODES)
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim, bn=False)
        self.predictor = (mlp(config.proj_output_dim, config.pred_hidden_dim, config.proj_output_dim)
                          if config.predictor else None)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")
        self.queue = Queue(config.queue_size, config.proj_output_dim, seed=info.seed)

    def student(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(z, q)`: the student projection and q = normalize(predictor(z)) (or of z without predictor)."""
        z = self.projector(self.backbone(x))
        p = self.predictor(z) if self.predictor is not None else z
        return z, F.normalize(p, dim=-1)

    def infonce_weight(self, epoch_progress: float) -> float:
        """Weight of the InfoNCE warm-up term at a fractional epoch (1 - weight goes to the relation loss)."""
        warmup = self.config.warmup_epochs
        if warmup <= 0 or epoch_progress >= warmup:
            return 0.0
        if self.config.warmup_mode == "switch":
            return 1.0
        return 1.0 - epoch_progress / warmup

    def step_inputs(self, batch, step):
        """The warm-up's weights `(w, 1 - w)` as a float32 tensor on the queue's device, made before the
        step: a compiled step that read the step number would recompile when it changes, and one that
        branched on `w` would compile a second graph when the warm-up ends."""
        if self.config.warmup_epochs <= 0:
            return {}
        w = self.infonce_weight(step.epoch_progress)
        return {"infonce_weights": to_device(torch.tensor([w, 1.0 - w]), self.queue.data.device)}

    def _weighted_on_host(self, q, k, queue, w: float):
        """Eager: only the terms with a positive weight (no relation gradient in InfoNCE-only steps)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and w < 1):  # only logged in InfoNCE-only steps
            rel = relation_loss(q, k, queue, self.config.t_student, self.config.t_teacher)
        metrics = {"loss_relation": rel.detach(), "warmup_weight": w}
        if w <= 0:
            return rel, metrics
        nce = info_nce(q, k, queue, self.config.warmup_temperature)
        metrics["loss_infonce"] = nce.detach()
        return (nce if w == 1.0 else w * nce + (1 - w) * rel), metrics

    def _weighted_on_device(self, q, k, queue, batch, step):
        """Compiled: both terms every step, weighted by the device tensor `step_inputs` made, so the graph
        branches on no step number. w = 1 gives InfoNCE alone and w = 0 the relation alone exactly
        (x * 1 + y * 0 == x for finite y): the eager path's values."""
        rel = relation_loss(q, k, queue, self.config.t_student, self.config.t_teacher)
        metrics = {"loss_relation": rel.detach()}
        if self.config.warmup_epochs <= 0:
            return rel, {**metrics, "warmup_weight": 0.0}
        weights = step.inputs.get("infonce_weights")
        if weights is None:  # called outside the train step (which makes them first)
            weights = self.step_inputs(batch, step)["infonce_weights"]
        nce = info_nce(q, k, queue, self.config.warmup_temperature)
        return weights[0] * nce + weights[1] * rel, {**metrics, "loss_infonce": nce.detach(),
                                                      "warmup_weight": weights[0]}

    def training_step(self, views, batch, step):
        z, q = self.student(views[0])
        k = self.momentum_embedding(views[1])  # the teacher: one weak global crop
        if len(views) > 2:  # multi-crop: every extra crop is a student crop, one forward per crop size
            q = torch.cat([q, *(self.student(x)[1] for x in views[2:])])  # (n B, D), crop-major
        queue = self.queue.data
        if torch.compiler.is_compiling() or step.graphed:
            loss, metrics = self._weighted_on_device(q, k, queue, batch, step)
        else:
            loss, metrics = self._weighted_on_host(q, k, queue, self.infonce_weight(step.epoch_progress))
        metrics["z_std"] = embedding_std(z)
        self.enqueue(self.queue, k, batch.labels, batch.indices)  # after the loss: the official order
        return loss, metrics
