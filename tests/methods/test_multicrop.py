"""Multi-crop (`method.extra_views`): ReSSL against a written reference of the official ressl_multi.py
formula, the per-size forward against a per-crop loop, SimCLR's multi-positive InfoNCE and BYOL's sum
over pairs against their formulas, and every method either training with extra crops or refusing them
in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kith.data.loader import Batch
from kith.losses import byol_loss, info_nce, multi_positive_nt_xent, nt_xent, relation_loss
from kith.methods import METHODS
from kith.methods.context import StepInfo, TrainInfo
from kith.train.loop import run_training
from kith.train.setup import build_method
from kith.utils.errors import UserError
from tests.helpers import small_heads, tiny_config

SMALL = "augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}"
MID = "augment.mid={size: 12, min_scale: 0.1, max_scale: 0.5}"
B = 6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def official_ressl_multi_loss(q_list, k, queue, t_student=0.1, t_teacher=0.04):
    """ressl_multi.py, written out: q = cat(q_list); logits_q = q Qᵀ; logits_k = (k Qᵀ).repeat(n, 1);
    loss = mean over all rows of -Σ softmax(logits_k / t_t) log_softmax(logits_q / t_s)."""
    q = torch.cat([F.normalize(x, dim=1) for x in q_list])
    logits_q = q @ queue.T
    logits_k = (F.normalize(k, dim=1) @ queue.T).repeat(len(q_list), 1)
    return -torch.sum(F.softmax(logits_k / t_teacher, dim=1) * F.log_softmax(logits_q / t_student, dim=1),
                      dim=1).mean()


def test_multicrop_relation_loss_is_the_official_formula():
    q_list = [torch.randn(B, 16, generator=_gen(i)) for i in range(5)]
    k = torch.randn(B, 16, generator=_gen(9))
    queue = F.normalize(torch.randn(64, 16, generator=_gen(10)), dim=1)
    got = relation_loss(torch.cat(q_list), k, queue, 0.1, 0.04)
    assert torch.allclose(got, official_ressl_multi_loss(q_list, k, queue), atol=1e-6, rtol=1e-6)
    # one student crop: the single-crop loss
    assert torch.allclose(relation_loss(q_list[0], k, queue), official_ressl_multi_loss(q_list[:1], k, queue),
                          atol=1e-6)


def _method(name, *overrides):
    cfg = tiny_config(name, *small_heads(name), SMALL, MID, *overrides)
    method = build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2))
    return method


def _views(*sizes):
    """Two 16x16 global views, then one tensor per (size, crops) group, crop-major."""
    out = [torch.randn(B, 3, 16, 16, generator=_gen(1)), torch.randn(B, 3, 16, 16, generator=_gen(2))]
    return out + [torch.randn(n * B, 3, s, s, generator=_gen(3 + i)) for i, (s, n) in enumerate(sizes)]


def _batch():
    return Batch(torch.zeros(B, 3, 16, 16, dtype=torch.uint8), torch.arange(B) % 3, torch.arange(B))


def _ressl_loss_by_crop_loop(method, views, step):
    """ReSSL multi-crop with one student forward per crop, the official code's loop."""
    b = views[0].shape[0]
    crops = [views[0]] + [c for x in views[2:] for c in x.split(b)]
    q = torch.cat([method.student(c)[1] for c in crops])
    k = method.momentum_embedding(views[1])
    if method.infonce_weight(step.epoch_progress) == 1.0:
        return info_nce(q, k, method.queue.data, method.config.warmup_temperature)
    return relation_loss(q, k, method.queue.data, method.config.t_student, method.config.t_teacher)


@pytest.mark.parametrize("epoch", [0, 3])  # InfoNCE warm-up, then the relation loss
def test_ressl_distinct_sizes_in_train_mode_equal_the_official_per_crop_loop(epoch):
    """Every extra size its own forward: with distinct sizes that is one forward per crop, BatchNorm
    statistics included, as ressl_multi.py."""
    method = _method("ressl", "method.extra_views=[mid,small]", "method.warmup_epochs=1").train()
    views, step = _views((12, 1), (8, 1)), StepInfo(2 * epoch, 2)
    loss, _ = method(views, _batch(), step)  # the queue changes only at after_step
    torch.testing.assert_close(loss, _ressl_loss_by_crop_loop(method, views, step), rtol=0, atol=1e-6)
    method.after_step()


def test_ressl_one_forward_per_size_equals_a_per_crop_loop_where_batchnorm_does_not_couple_rows():
    method = _method("ressl", "method.extra_views=[small,small,small,mid]", "method.warmup_epochs=0").eval()
    views, step = _views((8, 3), (12, 1)), StepInfo(0, 2)
    queue = method.queue.data.clone()
    loss, _ = method(views, _batch(), step)
    assert torch.equal(method.queue.data, queue)  # the step reads the queue, after_step pushes
    expected = _ressl_loss_by_crop_loop(method, views, step)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_ressl_enqueues_only_the_weak_teacher_key():
    method = _method("ressl", "method.extra_views=[small,small]")
    views = _views((8, 2))
    ptr = int(method.queue.ptr)
    method(views, _batch(), StepInfo(0, 2))
    method.after_step()
    assert int(method.queue.ptr) == ptr + B  # B keys, not the (1 + 2) B student crops
    k = method.momentum_embedding(views[1])
    torch.testing.assert_close(method.queue.data[ptr:ptr + B], k)


def solo_simclr_reference(z, crops, temperature):
    """solo-learn's simclr_loss_func with indexes repeated per crop (one process), written out."""
    z = F.normalize(z, dim=-1)
    idx = torch.arange(z.shape[0] // crops).repeat(crops)
    sim = torch.exp(z @ z.T / temperature)
    pos_mask = (idx[:, None] == idx[None, :]).float()
    pos_mask.fill_diagonal_(0)
    neg_mask = (idx[:, None] != idx[None, :]).float()
    pos, neg = (sim * pos_mask).sum(1), (sim * neg_mask).sum(1)
    return -torch.mean(torch.log(pos / (pos + neg)))


@pytest.mark.parametrize("crops", [2, 3, 6])
def test_simclr_multi_positive_infonce_is_solo_learns_formula(crops):
    z = torch.randn(crops * B, 8, generator=_gen(crops))
    got = multi_positive_nt_xent(z, crops, 0.2)
    torch.testing.assert_close(got, solo_simclr_reference(z, crops, 0.2), rtol=1e-5, atol=1e-6)
    if crops == 2:
        torch.testing.assert_close(got, nt_xent(z[:B], z[B:], 0.2), rtol=1e-6, atol=1e-6)


def test_simclr_puts_every_crop_in_one_loss():
    method = _method("simclr", "method.extra_views=[small,small]").eval()
    views = _views((8, 2))
    loss, _ = method(views, _batch(), StepInfo(0, 2))
    z = torch.cat([method.projector(method.backbone(v)) for v in views])
    torch.testing.assert_close(loss, solo_simclr_reference(z, 4, method.config.temperature),
                               rtol=1e-5, atol=1e-6)


def test_byol_sums_every_crop_against_each_other_global_target():
    """solo-learn: sum over global v1, over all crops v2 != v1, of byol(p[v2], z_momentum[v1])."""
    method = _method("byol", "method.extra_views=[small,mid]").eval()
    views = _views((8, 1), (12, 1))
    loss, _ = method(views, _batch(), StepInfo(0, 2))
    p = [method.predictor(method.projector(method.backbone(v))) for v in views]
    with torch.no_grad():
        zt = [method.momentum_projector(method.momentum_backbone(v)) for v in views[:2]]
    expected = sum(byol_loss(p[v2], zt[v1]) for v1 in (0, 1) for v2 in range(len(p)) if v2 != v1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_mocov2plus_averages_extra_queries_against_both_global_keys():
    method = _method("mocov2plus", "method.extra_views=[small]").eval()
    views = _views((8, 1))
    loss, _ = method(views, _batch(), StepInfo(0, 2))
    q = [method.query(v) for v in views]
    k = [method.momentum_embedding(v) for v in views[:2]]
    neg = [queue.data for queue in method.queues]
    t = method.config.temperature
    terms = [info_nce(q[0], k[1], neg[1], t), info_nce(q[1], k[0], neg[0], t),
             info_nce(q[2], k[0], neg[0], t), info_nce(q[2], k[1], neg[1], t)]
    torch.testing.assert_close(loss, sum(terms) / 4, rtol=1e-5, atol=1e-6)
    method.after_step()


TAKES = sorted(m for m, cls in METHODS.items() if not cls.extra_views_refusal)


def test_the_methods_that_take_extra_views():
    assert TAKES == ["all4one", "byol", "mocov2plus", "msf", "nnclr", "ressl", "simclr"]


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(TAKES)))
def test_methods_without_a_multicrop_recipe_refuse_extra_views_in_one_line(method):
    with pytest.raises(UserError, match=f"{method} does not take method.extra_views") as err:
        _method(method, "method.extra_views=[small]")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", TAKES)
def test_extra_crops_reach_the_loss_and_the_gradient(method):
    m = _method(method, "method.extra_views=[small,mid]").train()
    views = [v.requires_grad_() for v in _views((8, 1), (12, 1))]
    loss, _ = m(views, _batch(), StepInfo(0, 2))
    loss.backward()
    m.after_step()
    assert torch.isfinite(loss)
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in (views[0], views[2], views[3]))


@pytest.mark.parametrize("method", TAKES)
def test_every_taking_method_trains_with_extra_views_end_to_end(method, tmp_path):
    cfg = tiny_config(method, *small_heads(method), SMALL, MID, "method.extra_views=[small,mid,small]",
                      "train.epochs=1", out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run")
    assert result.knn and all(0 <= v <= 100 for v in result.knn.values())
