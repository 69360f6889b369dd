"""What tests share: tiny configs on a few dozen digits images (a whole run takes seconds on a CPU),
small heads per method, the phase switches that make 3 tiny epochs cover every method's phases, and
the bitwise comparison of two runs. Tests import it as `tests.helpers`; fixtures stay in conftest."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

from kith.config import build_config
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics

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

# ReSSL switches from InfoNCE to its relation loss at epoch 2; SPCL clusters at the start of
# epoch 2 only (cluster_every=2), so epoch 3 trains on the prototypes restored from the checkpoint.
PHASES = {"ressl": ["method.warmup_epochs=1"],
          "spcl": ["method.proto_warmup_epochs=1", "method.cluster_every=2"]}


def logged_rows(run_dir) -> list[dict]:
    """Train and epoch-start rows without wall-clock values (e.g. SPCL's cluster/time_s)."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s")}
            for r in read_metrics(run_dir) if r["kind"] in ("train", "epoch_start")]


def assert_bitwise_equal(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(run_dir, full_dir) -> None:
    # every logged row (loss, lr, tau, method metrics; SPCL's clustering metrics) matches, and no
    # row is lost or repeated across the interruptions
    assert logged_rows(run_dir) == logged_rows(full_dir)
    want = torch.load(full_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    got = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    for key in ("method", "optimizer", "scaler", "epoch", "step", "images_seen"):
        assert_bitwise_equal(want[key], got[key], key)


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """`classes` Gaussian blobs of `n_per_class` points in `dim` dimensions, centres 10 apart on a sphere."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    centres = 10 * torch.nn.functional.normalize(centres, dim=1)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


# ---- an image folder to stream: framed images whose borders show where a crop came from ----
BORDER, CENTRE = (0, 0, 255), (0, 255, 0)


def framed_image(path, h=40, w=100):
    """A wide image whose centre square is green and whose left/right borders (outside it) are blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = BORDER
    left = (w - h) // 2
    a[:, left:left + h] = CENTRE
    Image.fromarray(a).save(path, quality=95)


def image_folder(root, n=24, classes=("a", "b")):
    """`n` framed JPEGs in one subfolder per class under `root`."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // len(classes)):
            framed_image(root / c / f"{i}.jpg")
    return root


def stream_config(root, *extra):
    """A tiny SimCLR config that streams the image folder `root` (16x16, batch 8, a quarter held out)."""
    return tiny_config("simclr", "data.name=folder", f"data.path={root}", "data.resident=false",
                       "data.size=16", "train.batch_size=8", "data.holdout=0.25", *extra)


def signal_run(cmd: list[str], signame: str, ready, poll_s: float, preexec_fn=None) -> tuple[int, str, bool]:
    """Start the kith command `cmd`, wait (at most 2 minutes, polling every `poll_s`) until `ready()` or
    its exit, send it `signame`; `(exit code, stderr, whether it was ready)`."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], preexec_fn=preexec_fn,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(round(120 / poll_s)):
            if ready() or proc.poll() is not None:
                break
            time.sleep(poll_s)
        was_ready = ready()
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err, was_ready


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_method: str | None = "env://"):
    """A gloo process group for one spawned test worker.

    A rank that finishes first must not tear the group down under one still talking to it: gloo
    then aborts the other process ("terminate called without an active exception", SIGABRT), as
    CI saw on a loaded machine. So a worker that got through its body waits at a barrier before
    the group is destroyed; one that raised destroys at once (its peer fails on its own).
    `init_method=None`: the code under test creates the group itself (as `run_training` under
    torchrun does)."""
    if init_method is not None:
        torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank,
                                             world_size=world_size)
    try:
        yield
        torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
