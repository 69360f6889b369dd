"""How often the negatives a contrastive loss pushes away share the anchor's class: SPCL's argument,
measured on a trained network.

SimCLR (NT-Xent): an anchor's negatives are the other images of its batch. SPCL's prototype term
(`prototype_nce`): its negatives are the prototypes other than the anchor's own, and a prototype
"shares the anchor's class" by the fraction of its members that do. Two shares per anchor, averaged
over anchors:

    unweighted = mean over negatives n of same(i, n)
    weighted   = sum_n w_in same(i, n) / sum_n w_in,   w_in = exp(s_in / T)

`same(i, n)` is 1 when image n has the anchor's class (SimCLR), or the share of prototype n's
members with the anchor's class (SPCL); `s_in` the cosine similarity the loss uses (SimCLR:
projections z; SPCL: predictions p against centroids) and T the loss's temperature, so
`weighted` is the share of the repulsion in the loss's gradient that lands on same-class
negatives. Measured on clean training images (no augmentation), heads in eval mode, `BATCHES`
random batches of `BATCH` images (seeded); SPCL's over each granularity K, then averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kith.data.images import ImageData
from kith.data.spec import image_spec
from kith.evaluation.probe import extract_features

BATCHES, BATCH = 20, 256
METHODS = ("simclr", "spcl")


def _shares(same: torch.Tensor, logits: torch.Tensor, negative: torch.Tensor) -> tuple[float, float]:
    """(unweighted, weighted) mean shares; `same`, `logits`, `negative`: (anchors, negatives)."""
    neg = negative.float()
    unweighted = (same * neg).sum(1) / neg.sum(1)
    weights = torch.softmax(logits.masked_fill(~negative, float("-inf")), dim=1)
    weighted = (same * weights).sum(1)
    return unweighted.mean().item(), weighted.mean().item()


@torch.no_grad()
def false_negative_shares(method: torch.nn.Module, name: str, cfg, train: ImageData, seed: int) -> dict:
    """`{"unweighted", "weighted"}` shares (fractions) of same-class negatives for a trained SimCLR or
    SPCL `method` on `train` (labelled)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)[: BATCHES * BATCH]
    sample = train.subset(order)
    was_training = method.training
    method.eval()
    try:
        features = extract_features(method.backbone, sample, image_spec(cfg.data), torch.device("cpu"), BATCH)
        z = method.projector(features)
        labels = sample.labels
        prototypes = _prototypes(method, train.labels) if name == "spcl" else []
        results = []
        for b in range(BATCHES):
            rows = slice(b * BATCH, (b + 1) * BATCH)
            y = labels[rows]
            if name == "simclr":
                zb = F.normalize(z[rows], dim=-1)
                logits = zb @ zb.T / method.config.temperature
                negative = ~torch.eye(len(y), dtype=torch.bool)
                results.append(_shares((y[:, None] == y[None, :]).float(), logits, negative))
            else:
                results += _prototype_shares(method, prototypes, z[rows], order[rows], y)
    finally:
        method.train(was_training)
    return {"unweighted": sum(r[0] for r in results) / len(results),
            "weighted": sum(r[1] for r in results) / len(results)}


def _prototypes(method, labels_all: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SPCL, per granularity, once per measurement: (assignments (N,), normalised centroids (K, D), class
    composition (K, classes): the share of each prototype's members in each class; an empty prototype's
    row is all zero)."""
    state = method.prototypes
    if not state.is_clustered:
        raise RuntimeError("SPCL has not clustered yet (train past method.proto_warmup_epochs)")
    num_classes = int(labels_all.max()) + 1
    out = []
    for g in range(state.num_granularities):
        assignments = state.assignments(g).cpu()
        centroids = F.normalize(state.centroids(g).cpu().float(), dim=-1)
        counts = torch.zeros(centroids.shape[0], num_classes).index_put_(
            (assignments, labels_all), torch.ones(len(labels_all)), accumulate=True)
        out.append((assignments, centroids, counts / counts.sum(1, keepdim=True).clamp_min(1)))
    return out


def _prototype_shares(method, prototypes: list, z: torch.Tensor, indices: torch.Tensor, y: torch.Tensor
                      ) -> list[tuple[float, float]]:
    """SPCL: each granularity's shares for one batch (anchor predictions against the centroids)."""
    p = F.normalize(method.predictor(z), dim=-1)
    out = []
    for assignments, centroids, composition in prototypes:
        k = centroids.shape[0]
        same = composition[:, y].T  # (anchors, K): share of each prototype with the anchor's class
        negative = torch.ones(len(y), k, dtype=torch.bool)
        negative[torch.arange(len(y)), assignments[indices]] = False
        negative &= composition.sum(1)[None, :] > 0  # an empty prototype pushes nothing
        out.append(_shares(same, p @ centroids.T / method.config.proto_temperature, negative))
    return out
