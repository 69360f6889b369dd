"""SPCL (kith's reconstruction): the loss recomputed from the same tensors before and after the
first clustering, partner sampling, the clustering schedule and pass, K > N, presets, and
short CPU runs with a checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kith.config import build_config
from kith.data.loader import Batch
from kith.losses import byol_loss, prototype_nce
from kith.methods.context import EpochContext, StepInfo, TrainInfo
from kith.methods.spcl.prototypes import resolve_num_prototypes, resolve_warmup_epochs, size_histogram
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.train.setup import build_method
from kith.utils.errors import UserError
from tests.helpers import small_heads, tiny_config

N, B = 64, 8
# small heads and K=[4,8]; k-means at its default 10 iterations unless a test says otherwise
SMALL = [*small_heads("spcl"), "method.kmeans_iters=10"]


def make_method(*overrides: str, num_samples: int = N, epochs: int = 10):
    cfg = tiny_config("spcl", *SMALL, "method.proto_warmup_epochs=1",
                      *overrides)
    info = TrainInfo(num_samples=num_samples, steps_per_epoch=4, epochs=epochs, seed=3)
    return build_method(cfg, info)


def make_ctx(progress: bool = False):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(N, 3, 16, 16, generator=gen)
    labels = torch.arange(N) % 3

    def clean_batches():
        for start in range(0, N, 20):
            idx = torch.arange(start, min(start + 20, N))
            yield images[idx], labels[idx], idx

    return EpochContext(clean_batches, labels, progress), images


def make_inputs(indices=None):
    views = [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)]
    indices = torch.tensor([3, 10, 17, 24, 31, 38, 45, 52]) if indices is None else indices
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8), labels=indices % 3, indices=indices)
    return views, batch


def forward(m, views):
    """(p, zt) recomputed by hand: online prediction and normalised EMA target per view."""
    p = [m.predictor(m.projector(m.backbone(v))) for v in views]
    with torch.no_grad():
        zt = [F.normalize(m.momentum_projector(m.momentum_backbone(v)), dim=-1) for v in views]
    return p, zt


def test_registered_presets_and_resolved_defaults():
    expected = {"cifar10": [1000, 2000, 4000], "cifar100": [1000, 2000, 4000],
                "stl10": [2100, 4200, 8400], "imagenet100": [2500, 5000, 10000]}
    for data, ks in expected.items():
        cfg = build_config([f"preset={data}/spcl"])
        assert list(cfg.method.num_prototypes) == ks
        byol = build_config([f"preset={data}/byol"])  # SPEC: BYOL's heads and optimiser, per dataset
        for key in ("optimizer", "lr", "weight_decay", "exclude_bias_norm_wd", "epochs", "batch_size"):
            assert cfg.train[key] == byol.train[key], key
        for key in ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim", "tau_base", "tau_final"):
            assert cfg.method[key] == byol.method[key], key
    default = build_config(["method=spcl"]).method
    assert default.num_prototypes is None  # derived from N by the ratios
    assert resolve_num_prototypes(default, 50_000) == [1000, 2000, 4000]
    assert resolve_num_prototypes(default, 105_000) == [2100, 4200, 8400]
    assert resolve_warmup_epochs(default, 1000) == 100 and resolve_warmup_epochs(default, 400) == 40
    assert resolve_warmup_epochs(default, 2) == 1  # at least one instance-only epoch
    assert size_histogram(torch.tensor([1, 2, 3, 4, 9, 0])) == [1, 2, 1, 1]


def test_k_larger_than_n_is_a_user_error():
    with pytest.raises(UserError, match="lower method.num_prototypes"):
        make_method("method.num_prototypes=[4,100]")
    with pytest.raises(UserError, match="num_prototypes_ratio"):
        make_method("method.num_prototypes=null", "method.num_prototypes_ratio=[0.5]")


def test_clustering_schedule():
    m = make_method("method.proto_warmup_epochs=2", "method.cluster_every=3")
    assert [e for e in range(10) if m.should_cluster(e)] == [2, 5, 8]
    m = make_method("method.proto_warmup_epochs=null", "method.proto_warmup_fraction=0.3", epochs=10)
    assert m.proto_warmup_epochs == 3


def test_loss_is_instance_term_before_clustering():
    m = make_method().eval()  # BN in eval mode: the hand recomputation sees the same network
    views, batch = make_inputs()
    ctx, _ = make_ctx()
    assert m.on_epoch_start(0, ctx) == {}  # epoch 0 < proto_warmup_epochs
    p, zt = forward(m, views)
    expected = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
    loss, metrics = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(metrics["loss_inst"], expected, atol=1e-6)
    assert metrics["loss_intra"] is None and metrics["loss_inter"] is None and metrics["partner_acc"] is None
    assert not bool(m.prototypes.clustered)


def test_clustering_pass_and_full_loss():
    m = make_method()
    ctx, images = make_ctx(progress=True)
    metrics = m.on_epoch_start(1, ctx)
    assert m.momentum_backbone.training and m.momentum_projector.training  # train mode restored
    for k in (4, 8):
        assert {f"cluster/k{k}/nmi", f"cluster/k{k}/ari", f"cluster/k{k}/size_hist"} <= set(metrics)
        assert sum(metrics[f"cluster/k{k}/size_hist"]) == k
    m.eval()
    with torch.no_grad():  # the bank holds the clean-pass target embeddings (eval-mode BN)
        assert torch.allclose(m.prototypes.bank, m.momentum_embedding(images), atol=1e-5)
    assert torch.equal(m.dataset_labels, ctx.labels)

    state, step = m.prototypes, 5
    # the first images of the K=8 prototypes in member order: some partners lie in the batch itself
    views, batch = make_inputs(state.members_1[:B].clone())
    # the random-init target maps every image to nearly one point; spread the bank out so that
    # reading a partner's row before or after this step's overwrite makes a visible difference
    state.bank.copy_(F.normalize(torch.randn(N, 16), dim=-1))
    p, zt = forward(m, views)
    bank = state.bank.clone()
    bank[batch.indices] = F.normalize(zt[0] + zt[1], dim=-1)  # bank_update=mean, before the lookup
    gen = m.partner_generator(step)
    intra, inter, agree, in_batch = [], [], [], []
    for g in range(2):
        partner = state.partners(batch.indices, g, gen)
        a = state.assignments(g)
        assert torch.equal(a[partner], a[batch.indices])  # partners share the prototype
        assert (partner != batch.indices).all()  # and are other images (no singletons here)
        agree.append(ctx.labels[partner] == ctx.labels[batch.indices])
        in_batch.append(torch.isin(partner, batch.indices))
        intra.append(byol_loss(p[0], bank[partner]) + byol_loss(p[1], bank[partner]))
        inter.append(prototype_nce(p[0], a[batch.indices], state.centroids(g), 0.1)
                     + prototype_nce(p[1], a[batch.indices], state.centroids(g), 0.1))
    assert torch.cat(in_batch).any()  # so the bank overwrite order matters below
    l_inst = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
    l_intra, l_inter = torch.stack(intra).mean(), torch.stack(inter).mean()

    loss, metrics = m.training_step(views, batch, StepInfo(step, 4))
    assert torch.allclose(loss, l_inst + l_intra + l_inter, atol=1e-5)
    assert torch.allclose(metrics["loss_intra"], l_intra, atol=1e-5)
    assert torch.allclose(metrics["loss_inter"], l_inter, atol=1e-5)
    assert float(metrics["partner_acc"]) == pytest.approx(torch.cat(agree).float().mean().item())
    assert torch.allclose(state.bank, bank, atol=1e-6)  # overwritten by this step's targets
    loss.backward()
    assert all(p.grad is None for p in m.momentum_backbone.parameters())


def test_lambdas_and_singleton_partner_is_itself():
    m = make_method("method.lambda_intra=0.5", "method.lambda_inter=0", "method.num_prototypes=[4]",
                    "method.bank_update=none").eval()
    state = m.prototypes
    a = torch.arange(N) % 3 + 1
    a[10] = 0  # index 10 is alone in prototype 0
    state.set_clusters(0, torch.randn(4, 16), a)
    views, batch = make_inputs()
    assert state.partners(batch.indices, 0, m.partner_generator(0))[1] == 10
    p, zt = forward(m, views)
    bank = state.bank.clone()
    partner = state.partners(batch.indices, 0, m.partner_generator(0))
    l_inst = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
    l_intra = byol_loss(p[0], bank[partner]) + byol_loss(p[1], bank[partner])
    loss, metrics = m.training_step(views, batch, StepInfo(0, 4))
    assert torch.allclose(loss, l_inst + 0.5 * l_intra, atol=1e-5)
    assert torch.isnan(metrics["partner_acc"])  # no labels known (no epoch context yet)
    assert torch.equal(state.bank, bank)  # bank_update=none


def test_run_and_checkpoint_round_trip(tmp_path):  # exact resume: test_resume.py
    # 3 epochs: instance only, then clustering at the start of epoch 2 (cluster_every=2: not again
    # at epoch 3, which uses the prototypes saved in the checkpoint)
    cfg = tiny_config("spcl", *SMALL, "method.proto_warmup_epochs=1",
                      "method.cluster_every=2", "method.kmeans_iters=3", "train.epochs=3",
                      "train.knn_every=0", out_dir=tmp_path)
    full = run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    metrics = read_metrics(tmp_path / "run")
    rows = [r for r in metrics if r["kind"] == "train"]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert all("loss_intra" not in r and r["loss"] == r["loss_inst"] for r in rows if r["epoch"] == 1)
    later = [r for r in rows if r["epoch"] > 1]
    assert later and all({"loss_intra", "loss_inter", "partner_acc"} <= set(r) for r in later)
    starts = [r for r in metrics if r["kind"] == "epoch_start"]
    assert [r["epoch"] for r in starts] == [1]
    assert {"cluster/k4/nmi", "cluster/k4/ari", "cluster/k8/nmi", "cluster/k8/ari"} <= set(starts[0])

    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, map_location="cpu", weights_only=False)
    fresh = build_method(cfg, full.method.info)
    assert not bool(fresh.prototypes.clustered)
    fresh.load_state_dict(ckpt["method"])
    trained = full.method.prototypes.state_dict()
    assert bool(fresh.prototypes.clustered)
    for key, value in fresh.prototypes.state_dict().items():
        assert torch.equal(value, trained[key]), key
