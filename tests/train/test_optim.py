"""Optimisation pieces, checked numerically or through the loop: the EMA (momentum network)
update and its cosine τ schedule, LARS without clipping, AdamW's weight-decay groups and
train.grad_clip."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from kith.methods import METHODS
from kith.methods.context import TrainInfo
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.train.optim import build_optimizer
from kith.train.setup import build_method
from tests.helpers import small_heads, tiny_config

INFO = TrainInfo(num_samples=64, steps_per_epoch=2, epochs=5)


def spec_tau(k: int, total: int, tau_base: float, tau_final: float) -> float:
    """SPEC: τ = τ_final - (τ_final - τ_base) (cos(π k / K) + 1) / 2."""
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * k / total) + 1) / 2


@pytest.fixture
def optimizer_steps():
    """Every optimizer step taken while the test runs: (optimizer, global grad norm before the step)."""
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((optimizer, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


# ---- EMA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_momentum_update_is_the_ema_with_the_cosine_tau(name):
    """θ_t ← τ θ_t + (1-τ) θ_o for each momentum pair, τ from SPEC's schedule; nothing else moves."""
    cfg = tiny_config(name, *small_heads(name), "method.tau_base=0.9", "method.tau_final=0.99") \
        if "tau_base" in tiny_config(name).method else tiny_config(name, *small_heads(name))
    method = build_method(cfg, INFO)
    with torch.no_grad():  # online and momentum weights apart, so the update is visible
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    total = INFO.steps_per_epoch * INFO.epochs
    params = list(method.parameters())
    # each momentum parameter's online parameter (Method.momentum_pairs: (online, momentum) modules)
    online_of = {id(t): o for online, target in method.momentum_pairs()
                 for o, t in zip(online.parameters(), target.parameters(), strict=True)}
    assert bool(online_of) == ("tau_base" in cfg.method)
    for k in (0, 3, total - 1):
        before = {id(p): p.detach().double().clone() for p in params}
        tau = method.update_momentum(k)
        if not online_of:
            assert tau is None
            assert all(torch.equal(p.double(), before[id(p)]) for p in params)
            continue
        assert tau == pytest.approx(spec_tau(k, total, cfg.method.tau_base, cfg.method.tau_final), abs=1e-12)
        for p in params:
            expected = before[id(p)]
            if id(p) in online_of:
                expected = tau * expected + (1 - tau) * before[id(online_of[id(p)])]
            assert torch.allclose(p.detach().double(), expected, atol=1e-6, rtol=0), (k, p.shape)


def test_loop_applies_tau_of_each_step(tmp_path):
    cfg = tiny_config("byol", *small_heads("byol"), "train.knn_every=0", out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    total = len(rows)  # logged every step
    assert [r["tau"] for r in rows] == pytest.approx(
        [spec_tau(r["step"] - 1, total, cfg.method.tau_base, cfg.method.tau_final) for r in rows], abs=1e-12)


# ---- LARS -------------------------------------------------------------------------------------
def test_lars_without_clipping_matches_the_formula():
    """lars_clip=false: d = (g + wd w) η ||w|| / (||g|| + wd ||w||), buf = m buf + d, w -= lr buf;
    biases and norms: plain momentum SGD without decay."""
    cfg = tiny_config("simclr", *small_heads("simclr"), "train.optimizer=lars", "train.lars_clip=false",
                      "train.weight_decay=0.01", "train.lars_eta=0.02", "train.momentum=0.9")
    method = build_method(cfg, INFO)
    opt = build_optimizer(method, cfg)
    lr, wd, eta, mom = cfg.train.lr * cfg.train.batch_size / 256, 0.01, 0.02, 0.9
    params = [p for p in method.parameters() if p.requires_grad]
    w = [p.detach().double().clone() for p in params]
    buf = [None] * len(params)
    gen = torch.Generator().manual_seed(0)
    clipped_differs = False
    for _ in range(2):  # the second step checks the momentum buffer too
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.double()
            if w[i].ndim > 1:
                local = eta * w[i].norm() / (g.norm() + wd * w[i].norm())
                d = (g + wd * w[i]) * local
                clipped_differs |= bool(local < lr)  # with clipping this step would be lr (g + wd w)
            else:
                d = g
            buf[i] = d if buf[i] is None else mom * buf[i] + d
            w[i] = w[i] - lr * buf[i]
            assert torch.allclose(params[i].detach().double(), w[i], atol=1e-6, rtol=1e-5), i
    assert clipped_differs


# ---- AdamW and gradient clipping through the loop --------------------------------------------
def test_adamw_trains_with_decay_on_weights_only(tmp_path, optimizer_steps):
    cfg = tiny_config("byol", *small_heads("byol"), "train.optimizer=adamw", "train.weight_decay=0.05",
                      "train.epochs=1", "train.knn_every=0", out_dir=tmp_path)
    result = run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    opt = optimizer_steps[0][0]
    assert isinstance(opt, torch.optim.AdamW) and len(optimizer_steps) == len(rows)
    trainable = [p for p in result.method.parameters() if p.requires_grad]
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(trainable) and {id(p) for p in in_groups} == {id(p) for p in trainable}
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)  # biases and norms: no decay
            assert opt.state[p]["step"] == len(rows)  # every trainable tensor took every step
    frozen = [p for p in result.method.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in {id(q) for q in in_groups} for p in frozen)  # the EMA copies


def test_grad_clip_bounds_the_gradient_norm(tmp_path, optimizer_steps):
    def norms(clip: float) -> list[float]:
        optimizer_steps.clear()
        cfg = tiny_config("simclr", *small_heads("simclr"), f"train.grad_clip={clip}", "train.epochs=1",
                          "train.knn_every=0", out_dir=tmp_path)
        run_training(cfg, run_dir=tmp_path / f"clip{clip}", final_eval=False)
        return [n for _, n in optimizer_steps]

    free, clip = norms(0.0), 0.05
    assert len(free) == 2 and min(free) > 2 * clip  # the bound below is really exercised
    assert norms(clip) == pytest.approx([clip] * len(free), rel=1e-4)
