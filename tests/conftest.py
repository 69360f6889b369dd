"""Fixtures every test gets: a fixed seed and one thread, and a check that no test writes into the
checkout. What tests import (tiny configs, small heads, run comparisons) is in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from kith.train.loop import run_training
from tests.helpers import tiny_config

# kith's on-disk caches (file listings, random-init baselines) never outlive a test: a fresh folder per
# test, and one for the session's module-scoped fixtures, which run before any test's own
os.environ["KITH_CACHE_DIR"] = tempfile.mkdtemp(prefix="kith-test-cache-")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KITH_CACHE_DIR", str(tmp_path_factory.mktemp("kith-cache")))


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs (SimCLR and BYOL, 2 epochs on 64 digits images)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for method in ("simclr", "byol"):
        torch.manual_seed(0)
        dirs[method] = run_training(tiny_config(method, out_dir=out), run_dir=out / method).run_dir
    return dirs
