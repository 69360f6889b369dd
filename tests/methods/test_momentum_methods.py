"""MoCo v2+, ReSSL and MSF: losses recomputed from the same tensors, queue/bank order,
warm-up schedule, purity, and short CPU runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kith.methods.ressl as ressl_module
from kith.data.loader import Batch
from kith.losses import byol_loss, info_nce, relation_loss
from kith.methods.context import StepInfo, TrainInfo
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.train.setup import build_method
from tests.helpers import small_heads, tiny_config

B = 8


def make_method(name: str, *overrides: str):
    cfg = tiny_config(name, *small_heads(name), *overrides)
    info = TrainInfo(num_samples=64, steps_per_epoch=4, epochs=10)
    return build_method(cfg, info)


def make_inputs(labels=None):
    views = [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)]
    labels = torch.arange(B) % 3 if labels is None else labels
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8), labels=labels,
                  indices=torch.arange(B))
    return views, batch


def rows_contain(table: torch.Tensor, rows: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """(len(rows),) bool: whether each row of `rows` appears in `table` (max-abs difference < atol)."""
    diff = (rows.detach().float()[:, None, :] - table.detach().float()[None, :, :]).abs().amax(dim=-1)
    return (diff < atol).any(dim=1)


# ---- MoCo v2+ -------------------------------------------------------------------------------
def test_mocov2plus_loss_is_symmetric_info_nce_and_pushes_keys():
    m = make_method("mocov2plus")
    views, batch = make_inputs()
    q = [m.query(v) for v in views]
    k = [m.momentum_embedding(v) for v in views]
    queues = [qu.data.clone() for qu in m.queues]
    expected = 0.5 * (info_nce(q[0], k[1], queues[1], 0.2) + info_nce(q[1], k[0], queues[0], 0.2))
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not rows_contain(queues[0], k[0]).any()
    for queue, old in zip(m.queues, queues):  # no push before backward, which reads the queues
        assert torch.equal(queue.data, old)
    loss.backward()
    m.after_step()
    for queue, key in zip(m.queues, k):  # pushed after the loss, each view into its own queue
        assert rows_contain(queue.data, key).all()
        assert int(queue.ptr) == B
    assert all(p.grad is None for p in m.momentum_backbone.parameters())
    assert m.momentum_tau(0) == pytest.approx(0.99) and m.momentum_tau(40) == pytest.approx(0.999)
    assert isinstance(m.projector[1], torch.nn.ReLU)  # official MoCo v2 projector: no BN


def _info_nce_by_hand(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    """mean_i -log(exp(q̂_i·k̂_i/T) / (exp(q̂_i·k̂_i/T) + Σ_j exp(q̂_i·queue_j/T))), in float64 loops."""
    q, k, queue = (F.normalize(x.double(), dim=1).tolist() for x in (q, k, queue))
    total = 0.0
    for qi, ki in zip(q, k):
        pos = math.exp(sum(a * b for a, b in zip(qi, ki)) / t)
        neg = sum(math.exp(sum(a * b for a, b in zip(qi, row)) / t) for row in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def test_mocov2plus_symmetric_loss_value_on_fixed_tensors(monkeypatch):
    """L = ½ [InfoNCE(q_1, k_2, queue_2) + InfoNCE(q_2, k_1, queue_1)] on given queries, keys, queues."""
    m = make_method("mocov2plus")
    g = torch.Generator().manual_seed(5)
    views, batch = make_inputs()
    q = [torch.randn(B, 16, generator=g) for _ in range(2)]
    k = [F.normalize(q[v] + 0.5 * torch.randn(B, 16, generator=g), dim=1) for v in range(2)]
    for queue in m.queues:
        queue.data.copy_(F.normalize(torch.randn(64, 16, generator=g), dim=1))
    queues = [queue.data.clone() for queue in m.queues]
    view_of = {id(views[0]): 0, id(views[1]): 1}
    monkeypatch.setattr(m, "query", lambda x: q[view_of[id(x)]])
    monkeypatch.setattr(m, "momentum_embedding", lambda x: k[view_of[id(x)]])
    t = m.config.temperature
    def symmetric(keys, negatives):  # ½ [L(q_1, keys[0], negatives[0]) + L(q_2, keys[1], negatives[1])]
        return 0.5 * sum(_info_nce_by_hand(q[v], keys[v], negatives[v], t) for v in range(2))

    expected = symmetric((k[1], k[0]), (queues[1], queues[0]))
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the pairing matters: own-view keys or swapped queues give other values
    own_keys = symmetric((k[0], k[1]), (queues[0], queues[1]))
    swapped_queues = symmetric((k[1], k[0]), (queues[0], queues[1]))
    for wrong in (own_keys, swapped_queues):
        assert loss.item() != pytest.approx(wrong, rel=1e-3)


# ---- ReSSL ----------------------------------------------------------------------------------
def test_ressl_teacher_gets_no_gradient():
    m = make_method("ressl", "method.warmup_epochs=0")
    views, batch = make_inputs()
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    loss.backward()
    teacher = list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.momentum_tau(0) == m.momentum_tau(39) == pytest.approx(0.99)  # constant τ


def test_ressl_queue_push_happens_after_the_loss(monkeypatch):
    m = make_method("ressl", "method.warmup_epochs=0")
    views, batch = make_inputs()
    k = m.momentum_embedding(views[1])
    seen = {}

    def spy(q, k_arg, queue, t_student, t_teacher):
        seen["k"] = k_arg.detach().clone()
        seen["queue_has_k"] = rows_contain(queue, k_arg).any().item()
        seen["buffer_has_k"] = rows_contain(m.queue.data, k_arg).any().item()
        seen["temps"] = (t_student, t_teacher)
        return relation_loss(q, k_arg, queue, t_student, t_teacher)

    monkeypatch.setattr(ressl_module, "relation_loss", spy)
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.allclose(seen["k"], k, atol=1e-6)
    assert seen["queue_has_k"] is False and seen["buffer_has_k"] is False
    assert seen["temps"] == (0.1, 0.04)
    loss.backward()  # the loss read the queue buffer itself (no copy): backward before the push
    assert not rows_contain(m.queue.data, k).any()
    m.after_step()
    assert rows_contain(m.queue.data, k).all()  # pushed after the loss
    assert torch.equal(m.queue.labels[:B], batch.labels) and torch.equal(m.queue.indices[:B], batch.indices)


@pytest.mark.parametrize("mode", ["switch", "blend"])
def test_ressl_warmup_schedule(mode):
    m = make_method("ressl", "method.warmup_epochs=2", f"method.warmup_mode={mode}")
    views, batch = make_inputs()
    spe = 4
    for step in (0, 2, 4, 7, 8, 9, 20):
        info = StepInfo(step, spe)
        _, q = m.student(views[0])
        k = m.momentum_embedding(views[1])
        queue = m.queue.data.clone()
        nce = info_nce(q, k, queue, 0.2)
        rel = relation_loss(q, k, queue, 0.1, 0.04)
        loss, metrics = m.training_step(views, batch, info)
        if mode == "switch":
            w = 1.0 if step // spe < 2 else 0.0
        else:
            w = max(0.0, 1.0 - info.epoch_progress / 2)
        assert metrics["warmup_weight"] == pytest.approx(w)
        assert torch.allclose(loss, w * nce + (1 - w) * rel, atol=1e-5), (step, loss, nce, rel)
        assert torch.allclose(metrics["loss_relation"], rel, atol=1e-5)
        assert ("loss_infonce" in metrics) == (w > 0)
        if w == 1.0:
            assert torch.equal(loss, nce)
        if w == 0.0:
            assert torch.equal(loss, rel)
    if mode == "blend":
        assert m.infonce_weight(1.0) == pytest.approx(0.5)


def test_ressl_without_predictor_is_neurips_ressl():
    m = make_method("ressl", "method.predictor=false", "method.warmup_epochs=0")
    assert m.predictor is None
    assert not any("predictor" in name for name, _ in m.named_parameters())
    views, batch = make_inputs()
    _, q = m.student(views[0])
    assert torch.allclose(q, F.normalize(m.projector(m.backbone(views[0])), dim=-1), atol=1e-6)
    assert not any(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.projector)  # official projector
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.isfinite(loss)


# ---- MSF ------------------------------------------------------------------------------------
def test_msf_k1_equals_byol_loss():
    # MSF is one-directional (strong → query, weak → target): with k=1 it equals ONE BYOL
    # direction, byol_loss(query, target), not the BYOL method's two-direction sum.
    m = make_method("msf", "method.k=1")
    views, batch = make_inputs()
    _, query = m.query(views[0])
    target = m.momentum_embedding(views[1])
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.allclose(loss, byol_loss(query, target), atol=1e-5)


def test_msf_default_heads_derive_from_width():
    cfg = tiny_config("msf", "method.bank_size=64")  # tiny backbone, width 8: F = 64
    m = build_method(cfg, TrainInfo(num_samples=64, steps_per_epoch=2, epochs=2))
    assert m.feature_dim == 64
    dims = [(lin.in_features, lin.out_features) for lin in m.projector if isinstance(lin, torch.nn.Linear)]
    assert dims == [(64, 128), (128, 16)]
    dims = [(lin.in_features, lin.out_features) for lin in m.predictor if isinstance(lin, torch.nn.Linear)]
    assert dims == [(16, 128), (128, 16)]
    assert m.bank.data.shape == (64, 16)


def _constructed_msf(monkeypatch, query, target, bank, bank_labels, k):
    """An MSF method whose encoders return the given tensors, with a hand-filled bank."""
    m = make_method("msf", "method.proj_output_dim=4", f"method.k={k}")
    m.bank.data.copy_(bank)
    m.bank.labels.copy_(bank_labels)
    monkeypatch.setattr(m, "query", lambda x: (query, query))
    monkeypatch.setattr(m, "momentum_embedding", lambda x: target)
    return m


def test_msf_neighbours_follow_the_target_and_bank_is_pushed_first(monkeypatch):
    e = torch.eye(4)
    n = 64
    # bank: e0 near the target, e1 near the query, the rest far from both (-e3 direction)
    bank = F.normalize(-e[3].repeat(n, 1) + 0.01 * torch.randn(n, 4), dim=1)
    bank[10], bank[20] = e[0], e[1]
    target = F.normalize(torch.tensor([[1.0, 0.0, 0.3, 0.0]]), dim=1).repeat(B, 1)
    query = F.normalize(torch.tensor([[0.0, 1.0, 0.3, 0.0]]), dim=1).repeat(B, 1).requires_grad_()
    m = _constructed_msf(monkeypatch, query, target, bank, torch.full((n,), -1), k=B + 1)
    seen = {}
    real = m.bank.neighbours

    def spy(t, k):
        seen["bank_has_target"] = rows_contain(m.bank.data, t).all().item()
        sims, idx = real(t, k)
        seen["idx"] = idx
        return sims, idx

    monkeypatch.setattr(m.bank, "neighbours", spy)
    views, batch = make_inputs()
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert seen["bank_has_target"]  # pushed BEFORE the lookup
    # neighbours: the B pushed copies of the target and e0 (the target's neighbour), not e1 (the query's)
    for row in seen["idx"]:
        assert set(row.tolist()) == set(range(B)) | {10}
    cos_target = (query[0] * target[0]).sum()
    expected = (B * (2 - 2 * cos_target) + (2 - 2 * query[0, 0])) / (B + 1)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_msf_purity_on_a_constructed_case(monkeypatch):
    e = torch.eye(4)
    n = 64
    bank = F.normalize(-e[3].repeat(n, 1) + 0.01 * torch.randn(n, 4), dim=1)
    bank_labels = torch.full((n,), 7)
    # two neighbours near the e0 targets (labels 0 and 5), two near the e1 targets (labels 1 and 1)
    bank[40], bank[41] = F.normalize(torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0]]), dim=1)
    bank[50], bank[51] = F.normalize(torch.tensor([[0.1, 1.0, 0, 0], [0, 1.0, 0.1, 0]]), dim=1)
    bank_labels[40], bank_labels[41], bank_labels[50], bank_labels[51] = 0, 5, 1, 1
    target = torch.stack([e[0] if i < 4 else e[1] for i in range(B)])
    labels = torch.tensor([0, 0, 0, -1, 1, 1, 1, 1])
    query = target.clone().requires_grad_()
    m = _constructed_msf(monkeypatch, query, target, bank, bank_labels, k=B // 2 + 2)
    views, batch = make_inputs(labels)
    _, metrics = m.training_step(views, batch, StepInfo(0, 4))
    # each sample's 6 neighbours: the 4 pushed targets of its group (labels of that group) + 2 bank rows.
    # group e0, known labels 0,0,0: pushed labels [0,0,0,-1] -> 3 matches, bank 0/5 -> 1 match: 4/6
    # group e1, labels 1: pushed [1,1,1,1] -> 4, bank 1/1 -> 2: 6/6
    expected = (3 * 4 / 6 + 4 * 6 / 6) / 7
    assert metrics["purity"].item() == pytest.approx(expected, abs=1e-6)
    m2 = _constructed_msf(monkeypatch, target.clone().requires_grad_(), target, bank, bank_labels, k=2)
    _, metrics = m2.training_step(*make_inputs(torch.full((B,), -1)), StepInfo(0, 4))
    assert torch.isnan(metrics["purity"])  # no known label


def test_msf_symmetric_runs():
    m = make_method("msf", "method.symmetric=true")
    views, batch = make_inputs()
    loss, _ = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.isfinite(loss) and int(m.bank.ptr) == 2 * B


# ---- short runs (exact resume: test_resume.py) ----------------------------------------------
RUN = {
    "mocov2plus": small_heads("mocov2plus"),
    "ressl": small_heads("ressl") + ["method.warmup_epochs=1"],  # both phases within 2 epochs
    "msf": small_heads("msf"),
}


@pytest.mark.parametrize("name", ["mocov2plus", "ressl", "msf"])
def test_two_epoch_run_and_checkpoint(name, tmp_path):
    cfg = tiny_config(name, *RUN[name], out_dir=tmp_path)  # kNN monitor every epoch
    full = run_training(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / CHECKPOINT).is_file() and full.epochs == 2 and full.knn
    metrics = read_metrics(tmp_path / "run")
    rows = [r for r in metrics if r["kind"] == "train"]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["kind"] == "knn" for r in metrics) == 2
    if name == "ressl":  # warm-up (InfoNCE) in epoch 1, relation loss in epoch 2
        assert all(r["warmup_weight"] == 1.0 and "loss_infonce" in r for r in rows if r["epoch"] == 1)
        assert all(r["warmup_weight"] == 0.0 and "loss_infonce" not in r for r in rows if r["epoch"] == 2)
    if name == "msf":
        assert all(0.0 <= r["purity"] <= 1.0 for r in rows)
