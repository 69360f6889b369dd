"""Issue 15, security and run-folder integrity: safe checkpoint loading on every path, one run per
folder (lock), resume that validates before it writes and applies what it records, torn metrics
lines, no stray folders from failed starts, studies that reuse a run only under the same config."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import kith
from kith.cli import main
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import TINY, signal_run, small_heads, tiny_config

SMALL = (*small_heads("simclr"), "train.knn_every=0")


class _Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint could do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A 2-epoch run stopped after epoch 1 (a checkpoint to resume, or to replace)."""
    out = tmp_path_factory.mktemp("rel")
    run_training(tiny_config("simclr", *SMALL, out_dir=out), run_dir=out / "run", stop_after_epoch=1,
                 final_eval=False)
    return out / "run"


def _copy(run: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, dest)
    return dest


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("kith: error:") and "\n" not in err, err
    return err


# ---- security ---------------------------------------------------------------------------
def test_the_payload_is_live(tmp_path):
    """The payload really runs code when unpickled without weights_only (else the tests below prove
    nothing)."""
    marker = tmp_path / "MARKER"
    torch.save({"method": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("path", ["eval", "eval-run-folder", "export", "load_backbone", "resume"])
def test_a_crafted_checkpoint_is_refused_on_every_loading_path(path, trained, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = _copy(trained, tmp_path / "run")
    evil = run / CHECKPOINT  # dropped in as the run's checkpoint; the file paths use it directly
    torch.save({"method": _Payload(marker), "config": "{}"}, evil)
    if path == "load_backbone":
        with pytest.raises(UserError, match="refusing to load") as info:
            kith.load_backbone(evil)
        assert "\n" not in str(info.value)
    else:
        argv = {"eval": ["eval", "--checkpoint", str(evil), "data.name=digits"],
                "eval-run-folder": ["eval", str(run)],
                "export": ["export", str(evil), str(tmp_path / "out.pt")],
                "resume": ["pretrain", "--resume", str(run)]}[path]
        assert main(argv) == 2
        assert "refusing to load" in _one_line_error(capsys)
    assert not marker.exists()


def test_a_crafted_cifar_batch_file_is_refused(tmp_path, capsys):
    """CIFAR's python-format batches are pickles too: only arrays and plain types are unpickled."""
    import pickle

    marker = tmp_path / "MARKER"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": _Payload(marker), "labels": [0]}, fh, protocol=2)
    argv = ["pretrain", "--run-dir", str(tmp_path / "run"), "data.name=cifar10", f"data.path={tmp_path}"]
    assert main(argv) == 2
    assert "refusing to load" in _one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_checkpoints_hold_only_tensors_and_plain_types(trained):
    ckpt = torch.load(trained / CHECKPOINT, weights_only=True)  # raises on any other pickled object
    assert isinstance(ckpt["config"], str) and "method:" in ckpt["config"]


def test_an_old_checkpoint_with_numpy_rng_state_says_how_to_upgrade(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    old = torch.load(run / CHECKPOINT, weights_only=False)
    old["rng"]["numpy"] = np.random.get_state()  # what kith wrote before weights-only loading
    old["rng"]["python"] = __import__("random").getstate()
    torch.save(old, run / CHECKPOINT)
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = _one_line_error(capsys)
    assert "older kith" in err and f"kith upgrade-checkpoint {run / CHECKPOINT}" in err
    assert main(["upgrade-checkpoint", str(run / CHECKPOINT)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 0


def test_torchscript_loads_only_when_named_explicitly(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    ts = tmp_path / "backbone.ts"
    assert main(["export", str(run), str(ts), "--format", "torchscript"]) == 0
    capsys.readouterr()
    backbone = kith.load_backbone(ts, ["data.name=digits", "data.size=16"])  # explicit: allowed, with a note
    assert backbone(torch.randn(2, 3, 16, 16)).shape[0] == 2
    assert "TorchScript" in capsys.readouterr().err
    shutil.copy(ts, run / CHECKPOINT)  # never from a run folder, never for resume
    with pytest.raises(UserError, match="TorchScript"):
        kith.load_backbone(run)
    assert main(["pretrain", "--resume", str(run)]) == 2
    assert "TorchScript" in _one_line_error(capsys)


# ---- run folder: lock and one run per folder ---------------------------------------------
def test_a_second_run_into_a_used_folder_is_refused_unless_resume_or_overwrite(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    assert main(["pretrain", "--run-dir", str(run), *TINY, "train.epochs=1", *SMALL]) == 2
    err = _one_line_error(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before
    with pytest.raises(UserError, match="already holds a run"):
        kith.pretrain(run_dir=run, **dict(item.split("=", 1) for item in TINY))
    assert main(["pretrain", "--resume", str(run), "--overwrite"]) == 2  # which one was meant?
    assert "--resume" in _one_line_error(capsys)
    assert main(["pretrain", "--run-dir", str(run), "--overwrite", *TINY, "train.epochs=1", *SMALL]) == 0
    rows = read_metrics(run)
    assert [r["kind"] for r in rows].count("start") == 1 and rows[-1]["epoch"] == 1
    assert not (run / ".lock").exists()


def test_the_folder_is_locked_while_a_run_writes_it(tmp_path):
    """A second run (here: a resume) into a folder whose run is still going is refused; the lock goes
    away when the run ends, also when it ends by an exception or Ctrl-C."""
    from kith.train.checkpointer import Checkpointer

    run = tmp_path / "run"
    seen = {}

    class TryAgain(Checkpointer):
        """Once the run's checkpoint is written (the lock still held), a resume into the same folder."""

        def save(self, state, run_dir):
            super().save(state, run_dir)
            seen["lock"] = json.loads((run_dir / ".lock").read_text())
            with pytest.raises(UserError, match="in use by") as info:
                run_training(tiny_config("simclr", *SMALL), run_dir=run_dir, resume=True)
            seen["error"] = str(info.value)

    run_training(tiny_config("simclr", *SMALL, "train.epochs=1"), run_dir=run, final_eval=False,
                 checkpointer=TryAgain())
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert str(os.getpid()) in seen["error"]
    assert not (run / ".lock").exists()

    class Interrupted(Checkpointer):
        def save(self, state, run_dir):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config("simclr", *SMALL, "train.epochs=2"), run_dir=run, resume=True,
                     checkpointer=Interrupted())
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_release_the_lock(signame, tmp_path):
    """A real SIGINT (Ctrl-C) or SIGTERM (kill, SLURM's time limit) to a training process: it stops
    cleanly (exit 130, 'interrupted') and leaves no lock behind."""

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kith", "pretrain", "--run-dir", str(run), *TINY, *SMALL, "train.epochs=500"]
    code, err, locked = signal_run(cmd, signame, (run / ".lock").exists, poll_s=0.1)  # holds its folder
    assert locked, err[-2000:]
    assert code == 130, err[-2000:]
    assert "interrupted" in err and not (run / ".lock").exists()


def test_a_lock_of_a_live_process_is_respected_and_a_dead_ones_taken_over(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        assert main(["pretrain", "--resume", str(run)]) == 2
        err = _one_line_error(capsys)
        assert f"in use by pid {live.pid}" in err and ".lock" in err
    finally:
        live.kill()
        live.wait()
    # live.pid is dead now: its lock is stale, taken over with a message
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert f"stale lock of pid {live.pid}" in capsys.readouterr().err
    assert not (run / ".lock").exists()


# ---- resume: validate first, apply what is recorded ----------------------------------------
def test_a_refused_resume_override_leaves_config_yaml_alone(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    assert main(["pretrain", "--resume", str(run), "method.proj_output_dim=64"]) == 2
    err = _one_line_error(capsys)
    assert "method.proj_output_dim" in err and "16 -> 64" in err
    assert (run / "config.yaml").read_text() == config
    for refused in ("train.batch_size=16", "data.size=24", "seed=3", "augment.strong.min_scale=0.5"):
        assert main(["pretrain", "--resume", str(run), refused]) == 2
        assert refused.split("=")[0] in _one_line_error(capsys)
    assert (run / "config.yaml").read_text() == config
    assert main(["pretrain", "--resume", str(run)]) == 0


def test_a_resume_override_takes_effect_and_is_logged(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    kith.pretrain(run_dir=run, resume=True, **{"train.lr": 0.003, "train.epochs": 3})
    rows = read_metrics(run)
    resume = [r for r in rows if r.get("kind") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 2
    assert resume[0]["changed"] == {"train.lr": {"from": 0.1, "to": 0.003},
                                    "train.epochs": {"from": 2, "to": 3}}
    after = [r for r in rows if r.get("kind") == "train" and r["step"] > 2]
    peak = 0.003 * 32 / 256  # batch-scaled; warmup 0, cosine over 3 epochs of 2 steps
    assert after and all(0 < r["lr"] <= peak + 1e-12 for r in after)
    assert after[0]["lr"] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 2 / 6)))
    assert "lr: 0.003" in (run / "config.yaml").read_text()
    assert "lr: 0.003" in torch.load(run / CHECKPOINT, weights_only=True)["config"]


# ---- metrics.jsonl with a torn last line -------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_by_plot_compare_eval_and_resume(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    torn = '{"kind": "train", "step": 3, "lo'  # a crash while appending

    def tear() -> None:
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write(torn)

    tear()
    assert main(["plot", str(run), "--only", "curves"]) == 0
    assert main(["compare", str(run)]) == 0
    assert main(["eval", str(run), "--k", "5", "--no-linear"]) == 0  # appends a row after the torn one
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "eval"  # not glued to the fragment (which would lose both)
    tear()
    assert main(["pretrain", "--resume", str(run)]) == 0
    text = (run / "metrics.jsonl").read_text()
    assert torn not in text and all(json.loads(line) for line in text.splitlines())
    assert read_metrics(run)[-1]["kind"] == "final"


# ---- failed starts leave no folder -------------------------------------------------------
@pytest.mark.parametrize("bad", ["data.path", "unknown key", "batch"])
def test_a_failed_start_leaves_no_run_folder(bad, tmp_path, capsys):
    run = tmp_path / "run"
    extra = {"data.path": ["data.name=folder", f"data.path={tmp_path / 'missing'}"],
             "unknown key": ["train.epoch=1"], "batch": ["train.batch_size=4096"]}[bad]
    assert main(["pretrain", "--run-dir", str(run), *TINY, *extra]) == 2
    _one_line_error(capsys)
    assert main(["pretrain", f"out_dir={tmp_path / 'runs'}", *TINY, *extra]) == 2
    assert not run.exists() and not (tmp_path / "runs").exists()


# ---- study -------------------------------------------------------------------------------
def test_study_reuses_a_finished_run_only_under_the_same_config(tmp_path, capsys):
    from kith.tools import study

    out = tmp_path / "study"
    overrides = [o for o in TINY if not o.startswith(("train.knn_every", "train.epochs"))]
    overrides += ["train.knn_every=0", "train.epochs=1"]
    first = study.run_study("dim", ["simclr"], out, values=[8], overrides=overrides, log=lambda *_: None)
    assert first["runs"][0]["status"] == "trained"
    again = study.run_study("dim", ["simclr"], out, values=[8], overrides=overrides, log=lambda *_: None)
    assert again["runs"][0]["status"] == "skipped"
    longer = overrides[:-1] + ["train.epochs=2"]
    trained = []
    with pytest.raises(UserError, match="--rerun") as info:  # before any training: dim4 is not trained
        study.run_study("dim", ["simclr"], out, values=[4, 8], overrides=longer, log=trained.append)
    assert "train.epochs 1 -> 2" in str(info.value) and "\n" not in str(info.value)
    assert trained == [] and not (out / "simclr-dim4").exists()
    argv = ["study", "--kind", "dim", "--methods", "simclr", "--out", str(out), "--values", "8", *longer]
    assert main(argv) == 2
    assert "--rerun" in _one_line_error(capsys)
    assert main([*argv, "--rerun"]) == 0
    result = json.loads((out / "study.json").read_text())
    assert result["runs"][0]["status"] == "trained" and result["runs"][0]["epochs"] == 2
