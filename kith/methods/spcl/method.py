"""SPCL, Siamese Prototypical Contrastive Learning (Mo et al., 2022, arXiv 2208.08819):
kith's RECONSTRUCTION from the abstract.

Only the abstract is public: a contrastive framework that avoids false negatives with a
"siamese-style metric loss to match intra-prototype features while increasing the distance
between inter-prototype features". There is no code and no method text, so everything below
is kith's own reading of that sentence, not the authors' method, and every
choice is a config key:

    p_v  = predictor(projector(f_o(view_v)))                     # siamese online branch, v = 1, 2
    zt_v = normalize(projector_t(f_t(view_v)))                   # EMA target (τ 0.99→1), no grad
    L_inst  = byol_loss(p_1, zt_2) + byol_loss(p_2, zt_1)        # instance term (BYOL's sum)
    L_intra = mean over K, sum over v of byol_loss(p_v, bank[partner_K(i)])  # pull to a same-prototype image
    L_inter = mean over K, sum over v of prototype_nce(p_v, a_K(i), C_K, T)  # prototypes: the only negatives
    L = L_inst + lambda_intra L_intra + lambda_inter L_inter     (L = L_inst before the first clustering)

Heads are BYOL's: projector `F-4096-256`, predictor `256-4096-256`; the EMA target is the
momentum backbone + momentum projector.

Prototypes (`kith.methods.spcl.prototypes.PrototypeState`, a submodule, so it is in the checkpoint):
- at the start of epoch e, when `e >= proto_warmup_epochs` and
  `(e - proto_warmup_epochs) % cluster_every == 0`, every training image (clean, un-augmented
  view) is embedded with the target branch (momentum backbone + projector, BatchNorm in eval
  mode, no grad; `embed_precision`), which refreshes the bank of N target embeddings, and
  spherical k-means (`kmeans_iters`, `kmeans_backend`, seed `seed + e`) runs for each K.
  `proto_warmup_epochs: null` means `ceil(proto_warmup_fraction * train.epochs)`
  (kith's default: 10% of the epochs; at least one instance-only epoch whenever the fraction is > 0).
- `num_prototypes`: the list of K (one granularity each). `num_prototypes: null` derives them
  from the training-set size: `K = round(N / r)` for r in `num_prototypes_ratio`
  (default [50, 25, 12.5], PCL's ratios: CIFAR's N=50,000 gives 1000, 2000, 4000). The
  dataclass default is the ratio form, so subsets get proportionate K; the presets write
  the numbers out.
- each step (after the first clustering) the bank rows of the batch's images are
  overwritten by that step's target (`bank_update`: `mean` = normalize(zt_1 + zt_2), the
  default, the lower-variance estimate of the image's target; `view1` / `view2` one view's
  zt; `none` keeps the clean-pass embedding until the next clustering). The overwrite
  happens BEFORE the partner lookup, so a partner in the same batch (and an image alone in
  its prototype, which is its own partner) uses this step's target.
- partner_K(i): a uniformly random other member of i's prototype (itself if alone), one per
  image and granularity, shared by both views; drawn with a CPU `torch.Generator` seeded from
  (seed, step, rank) (`partner_generator`), so resume is exact. The draws are made before the step
  (`step_inputs`), so a compiled step holds no generator.

Under DDP every rank embeds the whole training set in `on_epoch_start` (the same full pass on
each rank, simple though redundant) and `PrototypeState.recluster` broadcasts rank 0's
clusters, so assignments agree; the per-step bank update uses the all-gathered indices and
targets, so every rank's bank is identical.

Metrics per step: `loss_inst`, `loss_intra`, `loss_inter` (None before the first
clustering), `partner_acc` (fraction of sampled partners, over all granularities, whose
label equals the image's; None when unknown or before clustering), `z_std`. Per clustering
(the `epoch_start` row): `cluster/k{K}/...` = nmi, ari, partner_acc (when labels exist),
size_min/median/max, num_singletons, num_reseeded, size_hist (counts of prototypes whose size
lies in [2^b, 2^(b+1)), b = 0, 1, ...), and `cluster/time_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kith.losses import byol_loss, prototype_nce
from kith.methods.base import Method, MomentumConfig, embedding_std, label_agreement, register
from kith.methods.context import EpochContext
from kith.methods.spcl.prototypes import PrototypeState, resolve_num_prototypes, resolve_warmup_epochs
from kith.nn.heads import mlp
from kith.utils import distributed, rng
from kith.utils.errors import UserError, check_choice
from kith.utils.keys import count, fraction, positive

_BANK_UPDATES = ("mean", "view1", "view2", "none")
_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class SPCLConfig(MomentumConfig):
    name: str = "spcl"
    proj_hidden_dim: int = count(4096)  # projector's hidden width
    proj_output_dim: int = count(256)  # embedding width of bank, prototypes and predictions
    pred_hidden_dim: int = count(4096)  # predictor's hidden width
    # prototypes: explicit K per granularity, or null to derive K = round(N / ratio)
    num_prototypes: Optional[list[int]] = count(None)
    num_prototypes_ratio: list[float] = positive([50.0, 25.0, 12.5])  # K = round(N / ratio), one K per ratio
    proto_warmup_fraction: float = fraction(0.1)  # of train.epochs, used when proto_warmup_epochs is null
    proto_warmup_epochs: Optional[int] = None  # absolute override
    cluster_every: int = count(1)  # epochs between clusterings after the warm-up
    kmeans_iters: int = count(10)  # spherical k-means iterations per clustering
    kmeans_backend: str = "auto"  # auto (faiss when installed) | torch | faiss
    kmeans_chunk_size: int = count(65536)  # points per chunk of the k-means assignment (bounds its memory)
    embed_precision: str = "auto"  # clean-pass embedding: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    bank_update: str = "mean"  # per-step bank overwrite: mean | view1 | view2 | none
    lambda_intra: float = 1.0  # weight of the intra-prototype (siamese) term
    lambda_inter: float = 1.0  # weight of the prototype-contrast term
    proto_temperature: float = positive(0.1)  # temperature of the prototype contrast
    tau_base: float = fraction(0.99)
    tau_final: float = fraction(1.0)


@register
class SPCL(Method):
    summary = "BYOL + intra-prototype siamese pull and prototype-only contrast (reconstruction)"
    Config = SPCLConfig
    extra_views_refusal = ("SPCL is kith's reconstruction of an unpublished method, with no multi-crop "
                           "recipe to follow")

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        check_choice("method.bank_update", config.bank_update, _BANK_UPDATES)
        check_choice("method.embed_precision", config.embed_precision, _PRECISIONS)
        if config.cluster_every < 1:
            raise UserError(f"method.cluster_every={config.cluster_every} must be >= 1")
        if config.proto_temperature <= 0:
            raise UserError(f"method.proto_temperature={config.proto_temperature} must be > 0")
        self.projector = mlp(feature_dim, config.proj_hidden_dim, config.proj_output_dim)
        self.predictor = mlp(config.proj_output_dim, config.pred_hidden_dim, config.proj_output_dim)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")
        self.num_prototypes = resolve_num_prototypes(config, info.num_samples)
        self.proto_warmup_epochs = resolve_warmup_epochs(config, info.epochs)
        self.prototypes = PrototypeState(info.num_samples, config.proj_output_dim, self.num_prototypes)
        # labels of every dataset index (-1 unknown), for partner_acc; refreshed from the epoch context
        self.register_buffer("dataset_labels", torch.full((info.num_samples,), -1, dtype=torch.long),
                             persistent=False)

    # ---- branches ------------------------------------------------------------------------
    def partner_generator(self, step: int) -> torch.Generator:
        """CPU generator for the partner draws of global step `step` (a pure function of seed, step, rank)."""
        return rng.generator("partners", self.info.seed, step, distributed.rank())

    def should_cluster(self, epoch: int) -> bool:
        e = epoch - self.proto_warmup_epochs
        return e >= 0 and e % self.config.cluster_every == 0

    # ---- clustering ----------------------------------------------------------------------
    def embed_dataset(self, ctx: EpochContext) -> torch.Tensor:
        """(N, D) clean-view target embeddings in dataset-index order (target branch in eval mode)."""
        device = self.prototypes.bank.device
        precision = self.config.embed_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        return ctx.embed([self.momentum_backbone, self.momentum_projector], self.config.proj_output_dim,
                         device, bf16=precision == "bf16", desc="spcl: embedding for clustering")

    def on_epoch_start(self, epoch: int, ctx: EpochContext) -> dict:
        labels = self._take_labels(ctx)
        if not self.should_cluster(epoch):
            return {}
        tic = time.perf_counter()
        embeddings = self.embed_dataset(ctx)
        metrics = self.prototypes.recluster(
            embeddings, iters=self.config.kmeans_iters, seed=self.info.seed + epoch, labels=labels,
            backend=self.config.kmeans_backend, chunk_size=self.config.kmeans_chunk_size,
        )
        out: dict = {f"cluster/{k}": v for k, v in metrics.items()}
        out["cluster/time_s"] = time.perf_counter() - tic
        return out

    def on_resume_mid_epoch(self, epoch: int, ctx: EpochContext) -> None:
        # the epoch's clustering is in the checkpoint; re-clustering now would see a bank and target
        # network moved on by the steps already taken. The labels are not in the state_dict.
        self._take_labels(ctx)

    def _take_labels(self, ctx: EpochContext) -> torch.Tensor | None:
        labels = ctx.labels
        if labels is not None and labels.numel() == self.info.num_samples:
            self.dataset_labels.copy_(labels.to(self.dataset_labels.device, torch.long))
        return labels

    # ---- one step ------------------------------------------------------------------------
    def graph_key(self) -> tuple:
        """Before the first clustering the step is the instance term alone: a graph of its own."""
        return (self.prototypes.is_clustered,)

    def step_inputs(self, batch, step):
        """The partner draws of this step, `partner_u (G, B)` float64 (one row per granularity, in the
        order `partners` used to draw them), once clustered: made before the step, so the compiled
        step holds no generator and no pinned copy."""
        if not self.prototypes.is_clustered:
            return {}
        generator = self.partner_generator(step.step)
        n, state = batch.indices.shape[0], self.prototypes
        draws = [state.partner_uniforms(n, generator) for _ in range(state.num_granularities)]
        return {"partner_u": torch.stack(draws)}

    def training_step(self, views, batch, step):
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        zt = [self.momentum_embedding(v) for v in views]
        loss_inst = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])  # BYOL's sum of both directions
        metrics = {"loss_inst": loss_inst.detach(), "loss_intra": None, "loss_inter": None,
                   "partner_acc": None, "z_std": embedding_std(z[0])}
        if not self.prototypes.is_clustered:
            return loss_inst, metrics

        state = self.prototypes
        indices = batch.indices.to(state.bank.device, torch.long)
        self.update_bank(indices, zt)
        draws = step.inputs.get("partner_u")
        if draws is None:  # called outside the train step (which makes them first)
            draws = self.step_inputs(batch, step)["partner_u"]
        intra, inter, partner_labels = [], [], []
        for g in range(state.num_granularities):
            partner = state.partners(indices, g, uniforms=draws[g])
            targets = state.bank[partner]
            assignments = state.assignments(g)[indices]
            centroids = state.centroids(g)
            # summed over the views like the instance term, so all three terms share one scale
            intra.append(sum(byol_loss(pv, targets.to(pv.dtype)) for pv in p))
            inter.append(sum(prototype_nce(pv, assignments, centroids, self.config.proto_temperature)
                             for pv in p))
            partner_labels.append(self.dataset_labels[partner])
        loss_intra = torch.stack(intra).mean()
        loss_inter = torch.stack(inter).mean()
        loss = loss_inst + self.config.lambda_intra * loss_intra + self.config.lambda_inter * loss_inter
        own = self.dataset_labels[indices]
        metrics.update(loss_intra=loss_intra.detach(), loss_inter=loss_inter.detach(),
                       partner_acc=label_agreement(own, torch.stack(partner_labels, dim=1)))
        return loss, metrics

    @torch.no_grad()
    def update_bank(self, indices: torch.Tensor, zt: list[torch.Tensor]) -> None:
        """Overwrite the bank rows of this (all-gathered) batch with its targets (`bank_update`)."""
        mode = self.config.bank_update
        if mode == "none":
            return
        if mode == "mean":
            rows = F.normalize(zt[0].float() + zt[1].float(), dim=-1)
        else:
            rows = zt[0 if mode == "view1" else 1].float()
        self.prototypes.update_bank(distributed.gather(indices.to(rows.device)), distributed.gather(rows))
