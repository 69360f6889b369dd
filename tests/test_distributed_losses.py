"""Two CPU processes (gloo) x B samples must train exactly like one process on the 2B batch.

Checks, per loss: the loss value, this rank's input gradients (which DDP later averages over
ranks, hence the / world_size), and the parameter gradients of a DDP-wrapped linear layer.
Also checks that Queue.push gathers the batches of all ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kith import losses as L
from kith.memory import Queue
from tests.helpers import gloo_group

WORLD = 2
B, D = 4, 6

LOSSES = {
    "nt_xent": lambda a, b: L.nt_xent(a, b, temperature=0.3),
    "barlow": lambda a, b: L.barlow_twins_loss(a, b, lambd=0.1, scale=0.5),
    "nnclr": lambda a, b: L.nnclr_loss(a, b, temperature=0.3),
}


def _data():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(WORLD * B, D, generator=g)
    x2 = torch.randn(WORLD * B, D, generator=g)
    weight = torch.randn(D, D, generator=g) / D**0.5
    return x1, x2, weight


def _run(name: str, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, ddp: bool):
    """Loss, input grads of x1/x2 and the linear layer's weight grad."""
    layer = torch.nn.Linear(D, D, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = torch.nn.parallel.DistributedDataParallel(layer) if ddp else layer
    x1 = x1.clone().requires_grad_()
    x2 = x2.clone().requires_grad_()
    loss = LOSSES[name](model(x1), model(x2))
    loss.backward()
    return loss.detach(), x1.grad, x2.grad, layer.weight.grad


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, WORLD, init_method=f"file://{init_file}"):
        torch.set_num_threads(1)
        x1, x2, weight = _data()
        sl = slice(rank * B, (rank + 1) * B)
        results = {name: _run(name, x1[sl], x2[sl], weight, ddp=True) for name in LOSSES}
        q = Queue(3 * WORLD * B, D)
        q.push(x1[sl], labels=torch.arange(B) + 10 * rank, indices=torch.arange(B) + 100 * rank)
        results["queue"] = q.state_dict()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    tmp = str(tmp_path_factory.mktemp("ddp"))
    init_file = os.path.join(tmp, "init")
    mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_ranks_equal_one_process(ddp_results, name):
    x1, x2, weight = _data()
    loss, g1, g2, gw = _run(name, x1, x2, weight, ddp=False)
    rank_losses = [r[name][0] for r in ddp_results]
    # each rank's loss is the mean over its own anchors: their mean is the global loss
    assert torch.allclose(torch.stack(rank_losses).mean(), loss, atol=1e-6)
    if name == "barlow":  # one global c: the same loss on every rank
        for rl in rank_losses:
            assert torch.allclose(rl, loss, atol=1e-6)
    # input grads: DDP averages over ranks, so rank grad / world == single-process grad slice
    for r, res in enumerate(ddp_results):
        sl = slice(r * B, (r + 1) * B)
        assert torch.allclose(res[name][1] / WORLD, g1[sl], atol=1e-6), f"{name} rank {r} x1 grad"
        assert torch.allclose(res[name][2] / WORLD, g2[sl], atol=1e-6), f"{name} rank {r} x2 grad"
        # parameter grads after DDP averaging equal the single-process ones (no world-size factor)
        assert torch.allclose(res[name][3], gw, atol=1e-6), f"{name} rank {r} weight grad"


def test_queue_push_gathers_all_ranks(ddp_results):
    x1, _, _ = _data()
    ref = Queue(3 * WORLD * B, D)
    ref.push(
        x1,
        labels=torch.cat([torch.arange(B), torch.arange(B) + 10]),
        indices=torch.cat([torch.arange(B), torch.arange(B) + 100]),
    )
    for res in ddp_results:
        for key, value in ref.state_dict().items():
            assert torch.allclose(res["queue"][key].to(value.dtype), value, atol=1e-7), key
