"""kith.memory: Queue ring-buffer semantics, checkpoint round trip, and exact chunked top-k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kith.memory import Queue, chunked_topk
from kith.utils.errors import UserError


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _close(a, b):
    return torch.allclose(a, b, atol=1e-7, rtol=0)


def test_init_normalised_seeded_and_unknown_labels():
    q = Queue(10, 4, seed=3)
    assert q.data.shape == (10, 4) and q.data.dtype == torch.float32
    assert torch.allclose(q.data.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.equal(q.data, Queue(10, 4, seed=3).data)
    assert not torch.equal(q.data, Queue(10, 4, seed=4).data)
    assert torch.all(q.labels == -1) and torch.all(q.indices == -1)
    assert q.ptr.dtype == torch.long and q.ptr.ndim == 0 and int(q.ptr) == 0
    assert set(q.state_dict()) == {"data", "labels", "indices", "ptr"}


def test_push_wraps_around_with_labels_and_indices():
    q = Queue(10, 3)
    init = q.data.clone()
    batches = [_unit(4, 3, seed=s) for s in range(3)]
    q.push(batches[0], labels=torch.tensor([0, 1, 2, 3]), indices=torch.tensor([100, 101, 102, 103]))
    assert int(q.ptr) == 4
    assert _close(q.data[:4], batches[0]) and _close(q.data[4:], init[4:])
    q.push(batches[1], labels=torch.tensor([4, 5, 6, 7]), indices=torch.tensor([104, 105, 106, 107]))
    assert int(q.ptr) == 8
    q.push(batches[2], labels=torch.tensor([8, 9, 10, 11]), indices=torch.tensor([108, 109, 110, 111]))
    assert int(q.ptr) == 2  # 12 % 10
    # rows 8, 9 and then 0, 1 hold the third batch; 2..7 keep the older ones
    assert _close(q.data[8:10], batches[2][:2])
    assert _close(q.data[0:2], batches[2][2:])
    assert _close(q.data[2:4], batches[0][2:])
    assert _close(q.data[4:8], batches[1])
    assert q.labels.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert q.indices.tolist() == [110, 111, 102, 103, 104, 105, 106, 107, 108, 109]


def test_push_without_labels_stores_minus_one():
    q = Queue(6, 2)
    q.push(_unit(4, 2, 0), labels=torch.tensor([1, 2, 3, 4]), indices=torch.tensor([5, 6, 7, 8]))
    q.push(_unit(4, 2, 1))  # overwrites rows 4, 5, 0, 1 with unknown labels
    assert q.labels.tolist() == [-1, -1, 3, 4, -1, -1]
    assert q.indices.tolist() == [-1, -1, 7, 8, -1, -1]


def test_push_normalises_and_casts_to_float32():
    q = Queue(8, 5)
    x = torch.randn(3, 5) * 7
    q.push(x.bfloat16())
    assert q.data.dtype == torch.float32
    assert torch.allclose(q.data[:3], F.normalize(x.bfloat16().float(), dim=1))
    # idempotent on already-normalised input
    y = _unit(2, 5, 9)
    q.push(y)
    assert torch.allclose(q.data[3:5], y, atol=1e-7)


def test_push_batch_larger_than_queue_keeps_last_rows():
    q = Queue(5, 3)
    q.push(_unit(2, 3, 0))  # ptr 2
    x = _unit(12, 3, 1)
    q.push(x, labels=torch.arange(12))
    assert int(q.ptr) == (2 + 12) % 5
    # same state as pushing the rows one by one
    ref = Queue(5, 3)
    ref.push(_unit(2, 3, 0))
    for i in range(12):
        ref.push(x[i : i + 1], labels=torch.tensor([i]))
    assert torch.equal(q.data, ref.data) and torch.equal(q.labels, ref.labels)
    assert torch.equal(q.ptr, ref.ptr)
    assert sorted(q.labels.tolist()) == [7, 8, 9, 10, 11]


def test_push_rejects_wrong_dim():
    with pytest.raises(ValueError):
        Queue(4, 3).push(torch.randn(2, 5))


def test_state_dict_round_trip():
    q = Queue(10, 4, seed=1)
    q.push(_unit(7, 4, 2), labels=torch.arange(7), indices=torch.arange(7) + 50)
    fresh = Queue(10, 4, seed=99)
    fresh.load_state_dict(q.state_dict())
    for name in ("data", "labels", "indices", "ptr"):
        assert torch.equal(getattr(fresh, name), getattr(q, name)), name
    x = _unit(6, 4, 3)
    q.push(x)
    fresh.push(x)
    assert torch.equal(fresh.data, q.data) and int(fresh.ptr) == int(q.ptr) == 3


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 50, 64, 1000])
def test_chunked_topk_matches_torch_topk(chunk_size):
    queries, keys = _unit(9, 8, 10), _unit(50, 8, 11)
    k = 5
    ref_vals, ref_idx = torch.topk(queries @ keys.T, k, dim=1)
    vals, idx = chunked_topk(queries, keys, k, chunk_size=chunk_size)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(vals, ref_vals, atol=1e-6)
    assert torch.all(vals[:, :-1] >= vals[:, 1:])  # nearest first


def test_chunked_topk_k_equals_n_and_bad_k():
    queries, keys = _unit(3, 4, 12), _unit(6, 4, 13)
    vals, idx = chunked_topk(queries, keys, 6, chunk_size=4)
    ref_vals, ref_idx = torch.topk(queries @ keys.T, 6, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(vals, ref_vals, atol=1e-6)
    with pytest.raises(UserError):
        chunked_topk(queries, keys, 7)


def test_chunked_topk_float32_under_autocast():
    queries, keys = _unit(4, 16, 14), _unit(30, 16, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx = chunked_topk(queries, keys, 3, chunk_size=8)
    assert vals.dtype == torch.float32
    assert torch.equal(idx, torch.topk(queries @ keys.T, 3).indices)


def test_queue_neighbours():
    q = Queue(20, 6, seed=5)
    x = _unit(4, 6, 16)
    q.push(x, labels=torch.tensor([3, 1, 4, 1]))
    sims, idx = q.neighbours(5 * x, k=3, chunk_size=7)  # queries normalised inside
    assert idx[:, 0].tolist() == [0, 1, 2, 3]
    assert torch.allclose(sims[:, 0], torch.ones(4), atol=1e-6)
    ref_sims, ref_idx = torch.topk(x @ q.data.T, 3)
    assert torch.equal(idx, ref_idx) and torch.allclose(sims, ref_sims, atol=1e-6)
    assert q.labels[idx[:, 0]].tolist() == [3, 1, 4, 1]


@pytest.mark.parametrize("chunk_size", [97, 256, 1000, 1031, 4096])
def test_chunked_topk_equals_unchunked_on_a_larger_bank(chunk_size):
    # N = 1031 is prime: no chunk size but N itself divides it, so the last chunk is always short
    queries, keys = _unit(17, 32, 20), _unit(1031, 32, 21)
    ref_vals, ref_idx = torch.topk(queries @ keys.T, 10, dim=1)
    vals, idx = chunked_topk(queries, keys, 10, chunk_size=chunk_size)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(vals, ref_vals, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_topk_low_precision_is_rescored_in_float32(dtype):
    queries, keys = _unit(17, 32, 22), _unit(1031, 32, 23)
    ref_idx = torch.topk(queries @ keys.T, 10, dim=1).indices
    vals, idx = chunked_topk(queries, keys, 10, chunk_size=300, dtype=dtype)
    assert vals.dtype == torch.float32
    # the values are the float32 similarities of the rows returned, in float32 order
    assert torch.allclose(vals, (queries[:, None, :] * keys[idx]).sum(-1), atol=1e-6)
    assert torch.all(vals[:, :-1] >= vals[:, 1:])
    # well-separated random data: the low-precision candidates contain the exact neighbours
    assert torch.equal(idx, ref_idx)


def test_queue_neighbours_low_precision():
    q = Queue(300, 16, seed=6)
    x = _unit(5, 16, 24)
    q.push(x)
    sims, idx = q.neighbours(x, k=4, chunk_size=64, dtype=torch.bfloat16)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4] and torch.allclose(sims[:, 0], torch.ones(5), atol=1e-6)


def test_push_after_load_continues_at_the_loaded_pointer():
    q = Queue(10, 4, seed=1)
    q.push(_unit(7, 4, 2))
    fresh = Queue(10, 4, seed=1)
    fresh.load_state_dict(q.state_dict())
    x = _unit(5, 4, 3)
    fresh.push(x)  # rows 7, 8, 9, then 0, 1
    assert _close(fresh.data[7:10], x[:3]) and _close(fresh.data[:2], x[3:]) and int(fresh.ptr) == 2


def test_neighbour_benchmark_runs_tiny():
    # the benchmark script's measuring code on a tiny bank (its numbers are not checked: no timings in tests)
    from benchmarks.neighbours import run_config, summarise

    rows = run_config(300, 8, [16], k=3, chunk=128, dtypes=["fp32", "bf16"], repeats=1,
                      device=torch.device("cpu"), seed=0)
    chunked = next(r for r in rows if r["variant"] == "chunked_fp32")
    assert chunked["same_indices_as_naive"] is True
    assert {r.get("data") for r in rows} >= {"clustered_cos0.95", "clustered_cos0.99"}
    assert summarise(rows)[0]["bank"] == 300
