"""torchrun with 2 CPU processes (gloo): the whole loop runs, ranks agree, rank 0 writes the run folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    run = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "kith", "pretrain",
           "data.train_subset=128", "data.test_subset=40", "backbone.width=8", "train.batch_size=32",
           "train.epochs=2", "train.progress=false", "train.knn_every=0", "train.log_every=1",
           "eval.knn_k=[5]", "method=byol", "method.proj_hidden_dim=32", "method.pred_hidden_dim=32",
           "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 8  # 128 images / global batch 32 = 4 steps per epoch
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 8
