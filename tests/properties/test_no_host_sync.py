"""No host-device sync inside a training step: for every registered method, forward (loss and
metrics), backward, the optimizer step, `after_step` (queue pushes) and the EMA update never read a
tensor value back to the host (`.item()`, `bool(t)`, `int(t)`, `float(t)`, `.tolist()`) and never
run an op whose output shape depends on the data (`nonzero`, boolean-mask indexing), each of which
would stall every step on a GPU. Checked on the CPU with a dispatch mode that sees every aten op
(`_local_scalar_dense` is what every scalar read dispatches to) and a patched `Tensor.tolist`."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kith.data.images import ImageData
from kith.data.loader import Batch, ResidentLoader
from kith.methods import METHODS
from kith.methods.base import label_agreement
from kith.methods.context import StepInfo, TrainInfo
from kith.methods.spcl.cluster import _kmeanspp, spherical_kmeans
from kith.train.loop import _mean_metrics
from kith.train.optim import build_optimizer
from kith.train.setup import build_method
from tests.helpers import small_heads, tiny_config

B, N = 8, 64
# aten ops whose output shape depends on tensor values (their CPU kernels read data to size it)
DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
                  "unique_consecutive", "unique_dim", "argwhere"}


class SyncSpy(TorchDispatchMode):
    """Records every aten op that reads a value to the host or sizes its output from the data."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in DATA_DEPENDENT:
            self.syncs.append(name)
        if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype == torch.bool for t in indices):
                self.syncs.append(f"{name}[bool mask]")
        return func(*args, **kwargs)


def make_method(name: str):
    overrides = small_heads(name) + (["method.proto_warmup_epochs=0"] if name == "spcl" else [])
    info = TrainInfo(num_samples=N, steps_per_epoch=4, epochs=10)
    method = build_method(tiny_config(name, *overrides), info)
    if name == "spcl":  # the clustered path: partners, prototypes and partner_acc
        for g, k in enumerate(method.num_prototypes):
            method.prototypes.set_clusters(g, torch.randn(k, 16), torch.arange(N) % k)
        method.dataset_labels.copy_(torch.arange(N) % 3)
    return method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_step_reads_nothing_back_to_the_host(name, monkeypatch):
    method = make_method(name).train()
    optimizer = build_optimizer(method, tiny_config(name))
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8),
                  labels=torch.tensor([0, 1, 2, -1, 0, 1, 2, -1]), indices=torch.arange(B) * 3)
    tolist_calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or real_tolist(t))
    for step in (0, 39):  # ReSSL: InfoNCE warm-up, then the relation loss
        views = [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)]
        with SyncSpy() as spy:
            loss, metrics = method(views, batch, StepInfo(step, 4))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step()
            method.update_momentum(step)
        assert spy.syncs == [], f"{name} step {step}: host syncs {spy.syncs}"
        assert tolist_calls == [], f"{name}: Tensor.tolist in the step"
        assert torch.isfinite(loss)
        assert all(v is None or isinstance(v, (float, torch.Tensor)) for v in metrics.values())


@pytest.mark.parametrize("name", sorted(m for m, cls in METHODS.items() if not cls.extra_views_refusal))
def test_a_multicrop_step_reads_nothing_back_to_the_host(name):
    """With extra crops: two of one size (one tensor) and one of another."""
    overrides = small_heads(name) + ["augment.small={size: 8}", "augment.mid={size: 12}",
                                     "method.extra_views=[small,mid,small]"]
    info = TrainInfo(num_samples=N, steps_per_epoch=4, epochs=10)
    method = build_method(tiny_config(name, *overrides), info)
    batch = Batch(images=torch.zeros(B, 3, 16, 16, dtype=torch.uint8),
                  labels=torch.tensor([0, 1, 2, -1, 0, 1, 2, -1]), indices=torch.arange(B) * 3)
    for step in (0, 39):
        views = [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16), torch.randn(2 * B, 3, 8, 8),
                 torch.randn(B, 3, 12, 12)]
        with SyncSpy() as spy:
            loss, _ = method(views, batch, StepInfo(step, 4))
            loss.backward()
            method.after_step()
        assert spy.syncs == [], f"{name} step {step}: host syncs {spy.syncs}"


def test_the_spy_catches_what_it_guards():
    x = torch.tensor([1.0, -1.0, 2.0])
    with SyncSpy() as spy:
        _ = x[x > 0]
        _ = bool((x > 0).any())
        _ = x.sum().item()
    assert spy.syncs[0].startswith("index") and spy.syncs.count("_local_scalar_dense") == 2


def test_label_agreement_is_a_tensor_nan_when_nothing_is_known():
    labels = torch.tensor([0, 1, -1, 2])
    neighbours = torch.tensor([[0, 0], [1, 1], [5, 5], [0, 2]])
    assert label_agreement(labels, neighbours).item() == pytest.approx(5 / 6)  # the -1 row is left out
    assert label_agreement(labels, neighbours[:, 0]).item() == pytest.approx(2 / 3)
    assert torch.isnan(label_agreement(torch.full((4,), -1), neighbours))


def test_logged_means_skip_unknown_steps_but_never_a_nan_loss():
    nan = torch.tensor(float("nan"))
    rows = [{"loss": torch.tensor(1.0), "acc": nan, "gone": nan, "none": None},
            {"loss": torch.tensor(3.0), "acc": torch.tensor(0.5), "gone": nan, "none": None}]
    assert _mean_metrics(rows) == {"loss": 2.0, "acc": 0.5}
    rows[1]["loss"] = nan
    assert math.isnan(_mean_metrics(rows)["loss"])


class CopySpy(TorchDispatchMode):
    """Records every copy between tensors (a host-to-device copy of pageable memory blocks the host)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_to_copy", "copy_"):
            self.copies.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_resident_loader_copies_the_epoch_order_once_not_every_step():
    # `meta` stands in for the GPU: a per-step `idx.to(device)` shows as one `_to_copy` per batch
    data = ImageData(labels=torch.arange(40) % 4, classes=["a", "b", "c", "d"],
                     images=torch.zeros(40, 3, 8, 8, dtype=torch.uint8), size=8)
    loader = ResidentLoader(data, batch_size=4, device=torch.device("meta"), seed=0)
    batches = loader.epoch(0)
    first = next(batches)  # the epoch's order goes to the device here, once
    with CopySpy() as spy:
        rest = list(batches)
    assert len(rest) == 9 and spy.copies == []
    assert first.images.device.type == "meta" and first.indices.device.type == "meta"
    cpu = ResidentLoader(data, batch_size=4, device=torch.device("cpu"), seed=0)
    whole = [b.indices.tolist() for b in cpu.epoch(0)]
    assert [b.indices.tolist() for b in cpu.epoch(0, start=3)] == whole[3:]  # a mid-epoch resume's batches


def test_spcl_kmeanspp_seeding_reads_nothing_back_to_the_host():
    x = torch.nn.functional.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    with SyncSpy() as spy:
        centroids = _kmeanspp(x, 40, torch.Generator().manual_seed(1))
    assert spy.syncs == []  # was one read per centroid
    # every centroid is one of the points, each chosen once
    matches = (centroids @ x.T > 1 - 1e-6).sum(dim=1)
    assert matches.tolist() == [1] * 40


@pytest.mark.parametrize("iters", [1, 10])
def test_spcl_kmeans_reads_one_value_back_however_many_iterations(iters):
    # duplicates empty clusters out, so every iteration re-seeds some (the path that used to read back)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    x[:150] = x[0]
    with SyncSpy() as spy:
        result = spherical_kmeans(x, 30, iters=iters, init="random", seed=0, backend="torch")
    assert result.num_reseeded > 0
    assert spy.syncs == ["_local_scalar_dense"]  # the re-seeded count, once at the end
    assert torch.bincount(result.assignments, minlength=30).min() >= 1  # no cluster left empty
