"""torchrun with 2 CPU processes (gloo): the whole loop runs, ranks agree, rank 0 writes the run folder;
and the same run as 2 "nodes" x 1 process (c10d rendezvous on localhost) gives the same losses and weights."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

RUN_ARGS = ["-m", "kith", "pretrain", "data.train_subset=128", "data.test_subset=40", "backbone.width=8",
            "train.batch_size=32", "train.progress=false", "train.knn_every=0", "train.log_every=1",
            "eval.knn_k=[5]", "method=byol", "method.proj_hidden_dim=32", "method.pred_hidden_dim=32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun() -> str:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return torchrun


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return out


def _rows(run, kind="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "run"
    out = _finish(_start([_torchrun(), "--standalone", "--nproc-per-node", "2", *RUN_ARGS, "train.epochs=2",
                          "--run-dir", str(run)]))
    assert out.count("run folder:") == 1  # only rank 0 reports
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2
    assert len(_rows(run)) == 8  # 128 images / global batch 32 = 4 steps per epoch
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 8


def test_two_nodes_match_one_node_and_resume(tmp_path):
    """2 nodes x 1 process (the README's multi-node command, on localhost) against the same 2 ranks on one
    node. (One process on the combined batch cannot match on CPUs: BatchNorm statistics are per rank
    without SyncBatchNorm, which is GPU-only, and each rank draws its own augmentations.)"""
    torchrun, port = _torchrun(), _free_port()
    nodes, single = tmp_path / "nodes", tmp_path / "single"
    common = [*RUN_ARGS, "train.epochs=1"]
    procs = [_start([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--rdzv-id", "kith-test", "--max-restarts", "0", *common, "--run-dir", str(nodes)])
             for rank in (0, 1)]
    procs.append(_start([torchrun, "--standalone", "--nproc-per-node", "2", *common,
                         "--run-dir", str(single)]))
    for proc in procs:
        _finish(proc)
    losses = [r["loss"] for r in _rows(nodes)]
    assert len(losses) == 4
    assert losses == pytest.approx([r["loss"] for r in _rows(single)], rel=1e-5, abs=1e-6)
    a = torch.load(nodes / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(single / "checkpoints" / "last.pt", weights_only=False)
    for key, value in a["method"].items():
        torch.testing.assert_close(value, b["method"][key], rtol=1e-5, atol=1e-6, msg=key)
    # the multi-node checkpoint resumes (here in one process) and the run goes on from its step
    _finish(_start([sys.executable, "-m", "kith", "pretrain", "--resume", str(nodes), "train.epochs=2",
                    "train.batch_size=32"]))
    assert [r["step"] for r in _rows(nodes)] == list(range(1, 9))
    assert torch.load(nodes / "checkpoints" / "last.pt", weights_only=False)["step"] == 8


@pytest.mark.parametrize("momentum", [True, False])
def test_sync_bn_converts_the_momentum_networks_only_when_asked(momentum):
    """`train.sync_bn_momentum`: the whole model (solo-learn's choice, the default) or the online networks
    only. Only the conversion: SyncBatchNorm runs on GPUs."""
    from torch import nn

    from kith.methods.context import TrainInfo
    from kith.train.setup import build_method
    from kith.train.step import sync_batchnorm
    from tests.helpers import small_heads, tiny_config

    cfg = tiny_config("byol", *small_heads("byol"))
    method = sync_batchnorm(build_method(cfg, TrainInfo(64, 2, 2)), momentum=momentum)
    for name in ("backbone", "projector", "predictor", "momentum_backbone", "momentum_projector"):
        norms = [m for m in getattr(method, name).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms, name
        synced = name in ("backbone", "projector", "predictor") or momentum
        assert all(isinstance(m, torch.nn.SyncBatchNorm) == synced for m in norms), name
