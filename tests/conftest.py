"""Shared fixtures: tiny configs on a few dozen digits images so a whole run takes seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kith.config import build_config

TINY = [
    "data.name=digits",
    "data.size=16",
    "data.train_subset=64",
    "data.test_subset=40",
    "backbone.name=tiny",
    "backbone.width=8",
    "train.batch_size=32",
    "train.epochs=2",
    "train.warmup_epochs=0",
    "train.optimizer=sgd",
    "train.lr=0.1",
    "train.progress=false",
    "train.knn_every=1",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "eval.knn_k=[5]",
    "eval.monitor_k=5",
]

# Small heads, queues and prototype counts per registered method, so a run of any method takes
# about a second. A newly registered method needs an entry here (tests parametrised over the
# registry fail with a message saying so).
SMALL_HEADS = {
    "simclr": ["method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "byol": ["method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32"],
    "barlow_twins": ["method.proj_hidden_dim=32", "method.proj_output_dim=32"],
    "nnclr": ["method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32",
              "method.queue_size=64"],
    "all4one": ["method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32",
                "method.queue_size=64", "method.transformer_ff_dim=32"],
    "mocov2plus": ["method.queue_size=64", "method.proj_hidden_dim=32", "method.proj_output_dim=16"],
    "ressl": ["method.queue_size=64", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
              "method.pred_hidden_dim=32"],
    "msf": ["method.bank_size=64", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
            "method.pred_hidden_dim=32"],
    "spcl": ["method.proj_hidden_dim=32", "method.proj_output_dim=16", "method.pred_hidden_dim=32",
             "method.num_prototypes=[4,8]", "method.kmeans_iters=3"],
}


def tiny_config(method: str, *overrides: str, out_dir=None):
    """A resolved config for `method` on 64 digits images (16x16), tiny convnet, batch 32, 2 epochs."""
    items = list(TINY) + [f"method.name={method}"] + list(overrides)
    if out_dir is not None:
        items.append(f"out_dir={out_dir}")
    return build_config(items)


def small_heads(method: str) -> list[str]:
    assert method in SMALL_HEADS, f"add small-head overrides for the new method '{method}' to SMALL_HEADS"
    return list(SMALL_HEADS[method])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust to a busy machine
    yield
    torch.set_num_threads(threads)


# ---- tests write only under pytest's tmp paths --------------------------------------------------
CHECKOUT = Path(__file__).resolve().parent.parent
# written by Python, pytest, ruff, pip and CI themselves, not by the tests
_NOT_OURS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".ci-venv", ".venv", "build"}
# data the benchmark scripts unpack (tens of thousands of files): written by benchmarks, not by tests,
# and walking it before and after every test would cost seconds each
_BENCHMARK_CACHES = {os.path.join("benchmarks", ".cache")}


def _checkout_files() -> set[str]:
    found = set()
    for root, dirs, files in os.walk(CHECKOUT):
        rel = os.path.relpath(root, CHECKOUT)
        dirs[:] = [d for d in dirs if d not in _NOT_OURS and not d.endswith(".egg-info")
                   and os.path.normpath(os.path.join(rel, d)) not in _BENCHMARK_CACHES]
        found.update(os.path.normpath(os.path.join(rel, f)) for f in files)
        if not files and not dirs and root != str(CHECKOUT):
            found.add(rel + os.sep)  # an empty new folder counts too
    return found


@pytest.fixture(autouse=True)
def _writes_only_under_tmp_path():
    """Fail the test that leaves a new file (e.g. a runs/ folder) in the checkout."""
    before = _checkout_files()
    yield
    new = sorted(_checkout_files() - before)
    assert not new, f"the test wrote into the checkout (use tmp_path / out_dir=tmp_path): {new[:5]}"
