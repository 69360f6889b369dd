"""All4One (Estepa et al., ICCV 2023): NNCLR's nearest-neighbour contrast plus a transformer
"centroid" of the 5 nearest neighbours and a feature-decorrelation term. Follows the official code
as ported to solo-learn (solo/methods/all4one.py)::

    z_v  = projector(f_o(x_v)),  p_v = predictor(z_v),  p2_v = predictor2(z_v)     # v = 1, 2
    zt_v = normalize(momentum_projector(f_t(x_v)))                                   # no grad
    NN_v = queue[topk(zt_v @ queueᵀ, 5)]                         # (B, 5, D), nearest first
    centroid_v = Transformer(NN_v + PE)[:, 0]
    shifted_v  = Transformer(cat(p2_v[:, None], NN_v[:, :4]) + PE)[:, 0]
    L_centroid  = ½ nnclr(centroid_1, shifted_2, 0.1) + ½ nnclr(centroid_2, shifted_1, 0.1)
    L_neighbour = ½ nnclr(NN_1[:, 0], p_2, T) + ½ nnclr(NN_2[:, 0], p_1, T)
    L_feature   = all4one_feature_loss(zt_1, z_2, zt_2, z_1)
    L = ½ L_centroid + ½ L_neighbour + ½ L_feature
    push zt_1 (+ labels, dataset indices) at after_step, after the optimizer step

Paper vs code (we follow the code):
- the centroid term uses temperature 0.1 (solo-learn's ``nnclr_loss_func`` default), not the
  configured ``temperature`` (0.2), which only the neighbour term uses: ``centroid_temperature``;
- neighbours are looked up with the *momentum* embeddings ``zt`` and the queue holds ``zt_1``;
- PE is ``PositionalEncodingPermute1D(5)``: positions along the embedding dims, the 5 tokens as
  channels (:func:`kith.losses.all4one_positional_encoding`);
- the transformer's parameters train with their own, un-batch-scaled lr 0.1
  (``transformer_lr``), with the same warmup-cosine schedule as the rest.

Multi-crop (`method.extra_views`) is kith's design, no reference defines it: each extra crop's
prediction ``p`` (one online forward per crop size) joins the neighbour term only, contrasted with the
nearest neighbour of both global views, and L_neighbour becomes the mean over all such terms (with no
extra crops, the two-term mean above). The centroid and feature terms, the momentum network and the
queue use the global views only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kith.losses import all4one_feature_loss, all4one_positional_encoding, nnclr_loss
from kith.memory import Queue
from kith.methods.base import Method, MomentumConfig, embedding_std, label_agreement, register
from kith.nn.heads import mlp
from kith.utils.errors import UserError
from kith.utils.keys import Range, count, key, positive


@dataclass
class All4OneConfig(MomentumConfig):
    name: str = "all4one"
    proj_hidden_dim: int = count(2048)  # projector's hidden width
    proj_output_dim: int = count(256)  # also the transformer's d_model
    pred_hidden_dim: int = count(4096)  # hidden width of both predictors
    temperature: float = positive(0.2)  # neighbour term
    centroid_temperature: float = positive(0.1)  # centroid term: the official code's 0.1, not `temperature`
    queue_size: int = count(98304)  # momentum projections in the support queue
    # sequence length: 5 neighbours / own prediction + 4 neighbours
    num_neighbours: int = count(5, at_most="queue_size")
    transformer_layers: int = count(3)  # encoder layers of the centroid transformer
    transformer_heads: int = count(8)  # attention heads per layer
    transformer_ff_dim: int = count(512)  # feed-forward width of each layer
    transformer_dropout: float = key(0.1, range=Range(0, 1, high_open=True))  # dropout inside the transformer
    transformer_lr: float = positive(0.1)  # the transformer param group's own base lr (not batch-scaled)
    centroid_weight: float = 0.5  # weight of the centroid term in the loss
    neighbour_weight: float = 0.5  # weight of the nearest-neighbour term
    feature_weight: float = 0.5  # weight of the feature (redundancy) term

    def check(self) -> None:
        if self.proj_output_dim % self.transformer_heads:
            raise UserError(f"method.transformer_heads={self.transformer_heads} does not divide "
                            f"method.proj_output_dim={self.proj_output_dim} (the transformer's width); "
                            "pick a divisor")


@register
class All4One(Method):
    summary = "nearest-neighbour contrast + transformer centroid of 5 neighbours + feature decorrelation"
    extra_views_refusal = ""  # kith's design: extra crops join the neighbour term
    Config = All4OneConfig

    def __init__(self, config, backbone, feature_dim, info):
        super().__init__(config, backbone, feature_dim, info)
        dim = config.proj_output_dim
        self.projector = mlp(feature_dim, config.proj_hidden_dim, dim, layers=3, last_bn=True)
        self.predictor = mlp(dim, config.pred_hidden_dim, dim)
        self.predictor2 = mlp(dim, config.pred_hidden_dim, dim)
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=config.transformer_heads,
                                           dim_feedforward=config.transformer_ff_dim,
                                           dropout=config.transformer_dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=config.transformer_layers,
                                                 enable_nested_tensor=False)
        self.add_momentum_copy("backbone", "momentum_backbone")
        self.add_momentum_copy("projector", "momentum_projector")
        self.queue = Queue(config.queue_size, dim, seed=info.seed)
        # a fixed table, a function of the config: not saved in checkpoints
        self.register_buffer("pos_encoding", all4one_positional_encoding(config.num_neighbours, dim),
                             persistent=False)

    def param_groups(self) -> list[dict]:
        """Everything trainable but the transformer first (group 0 is the logged lr); then the
        transformer with its own base lr ``transformer_lr`` (the loop does not batch-scale it)."""
        transformer = {id(p) for p in self.transformer.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in transformer]
        return [
            {"params": rest},
            {"params": [p for p in self.transformer.parameters() if p.requires_grad],
             "lr": self.config.transformer_lr},
        ]

    # ---- pieces (separate so tests can check them) -------------------------------------
    @torch.no_grad()
    def neighbours(self, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_neighbours`` nearest queue entries of ``zt (B, D)``, nearest first.

        Returns ``(idx (B, k), NN (B, k, D))``; NN rows are normalised queue entries, no gradient.
        """
        _, idx = self.queue.neighbours(zt, self.config.num_neighbours)
        return idx, self.queue.data[idx]

    def shifted_sequence(self, p2: torch.Tensor, nn_: torch.Tensor) -> torch.Tensor:
        """Tokens of the shifted sequence: own ``predictor2`` output first, then the k-1 nearest
        neighbours. ``p2 (B, D)``, ``nn_ (B, k, D)`` → ``(B, k, D)`` in the wider of the two dtypes
        (float32 under autocast: the queue's neighbours keep their precision, as the official code)."""
        dtype = torch.promote_types(p2.dtype, nn_.dtype)
        return torch.cat([p2[:, None].to(dtype), nn_[:, : nn_.shape[1] - 1].to(dtype)], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``Transformer(tokens + PE)[:, 0]``: the first output token, ``(B, D)``."""
        return self.transformer(tokens + self.pos_encoding.to(tokens.dtype))[:, 0]

    def losses(self, z, p, p2, zt, nn_) -> dict[str, torch.Tensor]:
        """The three loss terms from per-view lists (view 1, view 2) of online projections ``z``,
        predictions ``p``, ``p2``, normalised momentum embeddings ``zt`` and neighbours ``nn_``."""
        config = self.config
        centroid = [self.encode(n) for n in nn_]  # the centroid sequence: the k neighbours, nearest first
        shifted = [self.encode(self.shifted_sequence(q, n)) for q, n in zip(p2, nn_)]
        t_c, t = config.centroid_temperature, config.temperature
        return {
            "loss_centroid": 0.5 * (nnclr_loss(centroid[0], shifted[1], t_c)
                                    + nnclr_loss(centroid[1], shifted[0], t_c)),
            "loss_neighbour": 0.5 * (nnclr_loss(nn_[0][:, 0], p[1], t) + nnclr_loss(nn_[1][:, 0], p[0], t)),
            "loss_feature": all4one_feature_loss(zt[0], z[1], zt[1], z[0]),
        }

    def extra_neighbour_loss(self, two_view: torch.Tensor, extra: list[torch.Tensor], nn_) -> torch.Tensor:
        """Multi-crop (kith's design): L_neighbour as the mean over the two global terms (`two_view`, their
        mean) and one term per (extra crop, global view): ``nnclr(NN_v[:, 0], p_crop, T)``."""
        t, b = self.config.temperature, nn_[0].shape[0]
        preds = [pc for x in extra for pc in self.crops(self.predictor(self.projector(self.backbone(x))), b)]
        terms = [nnclr_loss(n[:, 0], pc, t) for pc in preds for n in nn_]
        return (2 * two_view + sum(terms)) / (2 + len(terms))

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        return (config.centroid_weight * terms["loss_centroid"]
                + config.neighbour_weight * terms["loss_neighbour"]
                + config.feature_weight * terms["loss_feature"])

    # ---- the step ----------------------------------------------------------------------
    def training_step(self, views, batch, step):
        z = [self.projector(self.backbone(v)) for v in views[:2]]
        p = [self.predictor(zi) for zi in z]
        p2 = [self.predictor2(zi) for zi in z]
        zt = [self.momentum_embedding(v) for v in views[:2]]
        found = [self.neighbours(zi) for zi in zt]
        nn_ = [n for _, n in found]
        terms = self.losses(z, p, p2, zt, nn_)
        if len(views) > 2:
            terms["loss_neighbour"] = self.extra_neighbour_loss(terms["loss_neighbour"], views[2:], nn_)
        loss = self.combine(terms)
        nn_acc = label_agreement(batch.labels, self.queue.labels[found[0][0][:, 0]])
        self.enqueue(self.queue, zt[0], batch.labels, batch.indices)
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics.update(nn_acc=nn_acc, z_std=embedding_std(z[0]))
        return loss, metrics
