"""The examples in examples/ run, on tiny settings, as a user would start them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("method", ["byol", "nnclr"])
def test_own_loop_trains(method, tmp_path):
    out = _run([str(ROOT / "examples" / "own_loop.py"), "--method", method, "--steps", "2", "--batch", "16"],
               tmp_path)
    assert f"{method} step 1: loss" in out


def test_new_method_registers_and_trains_from_the_cli(tmp_path):
    script = str(ROOT / "examples" / "simsiam.py")
    assert "simsiam" in _run([script, "methods"], tmp_path)
    out = _run([script, "pretrain", "method=simsiam", "train.epochs=1", "train.progress=false",
                "data.train_subset=64", "data.test_subset=40", "data.size=16", "backbone.width=8",
                "train.batch_size=32", "method.proj_dim=32", "method.pred_hidden_dim=8", "eval.knn_k=[5]",
                f"out_dir={tmp_path}"], tmp_path)
    assert "trained simsiam on digits for 1 epochs" in out and "kNN@5 top-1" in out
