"""Shared fixtures: tiny configs on a few dozen digits images so a whole run takes seconds on a CPU."""

from __future__ import annotations

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


def tiny_config(method: str, *overrides: str, out_dir=None):
    """A resolved config for `method` on 64 digits images (16x16), tiny convnet, batch 32, 2 epochs."""
    items = list(TINY) + [f"method.name={method}"] + list(overrides)
    if out_dir is not None:
        items.append(f"out_dir={out_dir}")
    return build_config(items)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust to a busy machine
    yield
    torch.set_num_threads(threads)
