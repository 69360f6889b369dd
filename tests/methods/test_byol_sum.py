"""BYOL sums its two directions, L(a→b) + L(b→a), as solo-learn (SPEC.md), recomputed by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kith.data.loader import Batch
from kith.methods.context import StepInfo, TrainInfo
from kith.train.setup import build_method
from tests.helpers import tiny_config

B = 8


def reference_byol(p1, p2, zt1, zt2):
    """solo-learn's BYOL loss written out: sum over both directions of mean(2 - 2 cos)."""
    def one(p, z):
        return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)).mean()
    return one(p1, zt2) + one(p2, zt1)


def test_byol_loss_is_the_sum_of_both_directions():
    cfg = tiny_config("byol", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
                      "method.pred_hidden_dim=32")
    m = build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=4, epochs=2)).eval()
    views = [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)]
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8), labels=torch.arange(B) % 3,
                  indices=torch.arange(B))
    with torch.no_grad():
        p = [m.predictor(m.projector(m.backbone(v))) for v in views]
        zt = [m.momentum_projector(m.momentum_backbone(v)) for v in views]
        expected = reference_byol(p[0], p[1], zt[0], zt[1])
        loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert expected.item() > 0.5  # random heads: far from 0, so a halved loss cannot pass
    assert torch.allclose(loss, expected, atol=1e-5)
