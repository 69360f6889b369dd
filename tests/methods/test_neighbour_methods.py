"""NNCLR, Barlow Twins and All4One: neighbour lookup, All4One's token sequences, param groups, the
loss recomputed by hand, the queue push and short CPU training runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kith.data.loader import Batch
from kith.losses import all4one_feature_loss, all4one_positional_encoding, nnclr_loss
from kith.methods.context import StepInfo, TrainInfo
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.train.optim import build_optimizer
from kith.train.setup import build_method
from tests.helpers import small_heads, tiny_config

# twice the usual small heads (the reference-step comparisons need a 32-d embedding)
WIDER = ["method.proj_hidden_dim=64", "method.proj_output_dim=32", "method.pred_hidden_dim=64"]
SMALL = {
    "nnclr": [*small_heads("nnclr"), *WIDER],
    "barlow_twins": [*small_heads("barlow_twins"), "method.proj_hidden_dim=64", "method.proj_output_dim=64"],
    "all4one": [*small_heads("all4one"), *WIDER, "method.transformer_ff_dim=64", "train.optimizer=lars"],
}
B, S = 16, 16  # batch and image size of the unit tests


def _method(name: str, *overrides: str):
    cfg = tiny_config(name, *SMALL[name], *overrides)
    info = TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2, seed=cfg.seed)
    return cfg, build_method(cfg, info)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, S, S, generator=g) for _ in range(2)]
    batch = Batch(images=torch.zeros(B, 3, S, S, dtype=torch.uint8),
                  labels=torch.randint(0, 10, (B,), generator=g), indices=torch.randperm(64, generator=g)[:B])
    return views, batch


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---- NNCLR --------------------------------------------------------------------------------------
def test_nnclr_picks_the_argmax_neighbour():
    _, m = _method("nnclr")
    m.queue.data.copy_(_unit(64, 32, 0))
    target = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:B]
    # un-normalised queries close to known queue rows: the argmax is the row they were built from
    z = 5.0 * m.queue.data[target] + 0.01 * torch.randn(B, 32, generator=torch.Generator().manual_seed(2))
    idx, nn = m.find_nn(z)
    assert torch.equal(idx, target)
    assert torch.equal(nn, m.queue.data[target])
    z = torch.randn(B, 32, generator=torch.Generator().manual_seed(3))  # arbitrary queries
    idx, _ = m.find_nn(z)
    assert torch.equal(idx, (F.normalize(z, dim=1) @ m.queue.data.T).argmax(dim=1))


def test_nnclr_step_pushes_normalised_projection_and_reports_nn_acc():
    _, m = _method("nnclr")
    views, batch = _inputs()
    m.queue.labels[:] = torch.arange(64) % 10
    with torch.no_grad():
        z1 = m.projector(m.backbone(views[0]))
        idx1, _ = m.find_nn(z1)
    expected_acc = (m.queue.labels[idx1] == batch.labels).float().mean()
    loss, metrics = m.training_step(views, batch, StepInfo(0, 2))
    assert torch.isfinite(loss)
    assert torch.allclose(metrics["nn_acc"], expected_acc)
    m.after_step()  # applies the push the step recorded
    assert torch.allclose(m.queue.data[:B], F.normalize(z1, dim=1), atol=1e-6)
    assert torch.equal(m.queue.labels[:B], batch.labels) and torch.equal(m.queue.indices[:B], batch.indices)
    assert int(m.queue.ptr) == B


# ---- All4One ------------------------------------------------------------------------------------
def test_all4one_sequences_nearest_first_and_shifted():
    _, m = _method("all4one")
    m.queue.data.copy_(_unit(64, 32, 0))
    zt = _unit(B, 32, 1)
    idx, nn = m.neighbours(zt)
    assert idx.shape == (B, 5) and nn.shape == (B, 5, 32)
    assert torch.equal(idx, (zt @ m.queue.data.T).topk(5, dim=1).indices)  # nearest first
    sims = torch.einsum("bd,bkd->bk", zt, nn)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    assert torch.equal(nn, m.queue.data[idx])

    p2 = torch.randn(B, 32)
    shifted = m.shifted_sequence(p2, nn)
    assert shifted.shape == (B, 5, 32)
    assert torch.equal(shifted[:, 0], p2)  # own prediction first
    assert torch.equal(shifted[:, 1:], nn[:, :4])  # then the 4 nearest, in order

    assert torch.equal(m.pos_encoding, all4one_positional_encoding(5, 32))
    m.transformer.eval()
    assert torch.allclose(m.encode(nn), m.transformer(nn + m.pos_encoding)[:, 0])  # the centroid sequence


def test_all4one_transformer_has_its_own_param_group():
    cfg, m = _method("all4one")
    opt = build_optimizer(m, cfg)
    transformer = {id(p) for p in m.transformer.parameters()}
    scaled = cfg.train.lr * cfg.train.batch_size / 256
    seen = set()
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        seen |= ids
        if ids & transformer:
            assert ids <= transformer  # nothing else shares the transformer's groups
            assert g["base_lr"] == pytest.approx(0.1)
        else:
            assert g["base_lr"] == pytest.approx(scaled)
    assert transformer <= seen
    assert not ({id(p) for p in opt.param_groups[0]["params"]} & transformer)  # group 0: the logged lr
    momentum = {id(p) for net in (m.momentum_backbone, m.momentum_projector) for p in net.parameters()}
    assert not (seen & momentum)


def test_all4one_loss_equals_terms_recomputed_by_hand_and_push():
    _, m = _method("all4one")
    m.train()
    m.transformer.eval()  # no dropout: the hand computation must see the same transformer
    views, batch = _inputs()
    queue = m.queue.data.clone()
    pe = all4one_positional_encoding(5, 32)
    with torch.no_grad():
        z = [m.projector(m.backbone(v)) for v in views]
        p = [m.predictor(zi) for zi in z]
        p2 = [m.predictor2(zi) for zi in z]
        zt = [F.normalize(m.momentum_projector(m.momentum_backbone(v)), dim=1) for v in views]
        nn = [queue[(zi @ queue.T).topk(5, dim=1).indices] for zi in zt]
        cen = [m.transformer(n + pe)[:, 0] for n in nn]
        shi = [m.transformer(torch.cat([q[:, None], n[:, :4]], dim=1) + pe)[:, 0] for q, n in zip(p2, nn)]
        l_cen = 0.5 * nnclr_loss(cen[0], shi[1], 0.1) + 0.5 * nnclr_loss(cen[1], shi[0], 0.1)
        l_nn = 0.5 * nnclr_loss(nn[0][:, 0], p[1], 0.2) + 0.5 * nnclr_loss(nn[1][:, 0], p[0], 0.2)
        l_feat = all4one_feature_loss(zt[0], z[1], zt[1], z[0])
        expected = 0.5 * l_cen + 0.5 * l_nn + 0.5 * l_feat

    loss, metrics = m.training_step(views, batch, StepInfo(0, 2))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(metrics["loss_centroid"], l_cen, atol=1e-5)
    assert torch.allclose(metrics["loss_neighbour"], l_nn, atol=1e-5)
    assert torch.allclose(metrics["loss_feature"], l_feat, atol=1e-5)
    weighted = 0.5 * (metrics["loss_centroid"] + metrics["loss_neighbour"] + metrics["loss_feature"])
    assert torch.allclose(weighted, loss.detach(), atol=1e-6)
    assert metrics["nn_acc"] is not None and torch.isfinite(metrics["z_std"])
    loss.backward()  # the loss reaches the transformer and both predictors
    assert m.transformer.layers[0].self_attn.in_proj_weight.grad is not None
    assert m.predictor2[0].weight.grad is not None and m.predictor[0].weight.grad is not None

    # after the step, the queue holds the normalised momentum embeddings of view 1, with labels and indices
    m.after_step()
    assert not torch.equal(m.queue.data, queue)
    assert torch.allclose(m.queue.data[:B], zt[0], atol=1e-6)
    assert torch.equal(m.queue.data[B:], queue[B:])
    assert torch.equal(m.queue.labels[:B], batch.labels) and torch.equal(m.queue.indices[:B], batch.indices)
    assert int(m.queue.ptr) == B


# ---- training runs -----------------------------------------------------------------------------
def _check_run(name: str, run_dir, result) -> None:
    """A finished 2-epoch run: checkpoint written, 4 finite train rows with the method's metrics."""
    assert (run_dir / CHECKPOINT).is_file()
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert "z_std" in rows[-1]
    if name != "barlow_twins":
        assert "nn_acc" in rows[-1]
        assert int((result.method.queue.labels >= 0).sum()) > 0
    if name == "all4one":
        assert {"loss_centroid", "loss_neighbour", "loss_feature", "tau"} <= set(rows[-1])


@pytest.mark.parametrize("name", ["nnclr", "barlow_twins", "all4one"])  # exact resume: test_resume.py
def test_two_epoch_cpu_run(name, tmp_path):
    cfg = tiny_config(name, *SMALL[name], out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run")
    _check_run(name, tmp_path / "run", result)
