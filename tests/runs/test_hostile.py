"""Issue 21, every input a user can hand kith: one error boundary (one line, exit 2, KITH_DEBUG=1 for
the traceback, a bug keeps its own), atomic writes that stay inside the run folder, --overwrite by
the run manifest only, exports that never replace a run's files, signals at any moment, resumes that
refuse what cannot be true."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import sys
import time

import pytest
import torch

import kith
from kith.cli import main
from kith.runs.checkpoint import CHECKPOINT
from kith.train.loop import run_training
from kith.utils.errors import UserError
from kith.utils.files import atomic_write
from tests.helpers import TINY, signal_run, small_heads, tiny_config

SMALL = (*small_heads("simclr"), "train.knn_every=0")
REPO = pathlib.Path(__file__).parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A 2-epoch run (its manifest, config, metrics and checkpoint)."""
    out = tmp_path_factory.mktemp("hostile")
    run_training(tiny_config("simclr", *SMALL, out_dir=out), run_dir=out / "run", final_eval=False)
    return out / "run"


def _copy(run: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("kith: error:") and "\n" not in err, err
    return err


def _pretrain(run_dir, *extra) -> list[str]:
    return ["pretrain", "--run-dir", str(run_dir), *TINY, *SMALL, "train.epochs=1", *extra]


# ---- one error boundary --------------------------------------------------------------------
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(_pretrain(tmp_path / "afile")) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"
    with pytest.raises(UserError, match="is a file"):
        kith.pretrain(run_dir=tmp_path / "afile", **dict(i.split("=", 1) for i in TINY))


@pytest.mark.parametrize("name, says", [("x" * 300, "at most 200"), ("../../x", "plain folder name"),
                                        ("a/b", "plain folder name"), ("..", "plain folder name")])
def test_a_run_name_stays_one_folder_inside_out_dir(name, says, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    assert main(["pretrain", *TINY, f"out_dir={out}", f"run_name={name}"]) == 2
    assert says in _one_line_error(capsys)
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("item, says", [
    ("train.lr=${oc.env:HOME}", "train.lr"),  # an interpolation: never resolved into a run
    ("train.lr=${train.lr}", "train.lr"),  # self-reference
    ("train.warmup_epochs=inf", "not a finite number"),
    ("train.lr=nan", "not a finite number"),
    (f"seed={2**70}", "seed="),
])
def test_config_values_that_cannot_be_true_are_one_line(item, says, tmp_path, capsys):
    assert main(_pretrain(tmp_path / "run", item)) == 2
    assert says in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_python_tag_in_config_yaml_is_refused_without_running_it(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    marker = tmp_path / "MARKER"
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["pretrain", "--resume", str(run)]) == 2
    assert "config.yaml" in _one_line_error(capsys)
    assert not marker.exists()
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00garbage: [")
    assert main(["pretrain", "--resume", str(run)]) == 2
    assert "is damaged" in _one_line_error(capsys)


def test_disk_full_while_writing_summary_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, capsys):
    import kith.utils.files as files

    real = files.os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    assert main(_pretrain(tmp_path / "run")) == 2
    err = _one_line_error(capsys)
    assert "summary.json" in err and "disk is full" in err
    assert not list((tmp_path / "run").rglob("*.tmp")) and not (tmp_path / "run" / "summary.json").exists()


def test_out_of_memory_on_a_set_size_is_one_line(tmp_path, monkeypatch, capsys):
    import kith.train.setup as setup_module

    def build_trainer(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4294967296000 bytes. Error code 12")

    monkeypatch.setattr(setup_module, "build_trainer", build_trainer)
    assert main(_pretrain(tmp_path / "run")) == 2
    err = _one_line_error(capsys)
    assert "out of memory (4000.0 GiB" in err and "train.batch_size" in err


def test_kith_debug_shows_the_traceback_and_a_bug_keeps_its_own(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    import kith.train.setup as setup_module

    monkeypatch.setenv("KITH_DEBUG", "1")
    denied = PermissionError(errno.EACCES, "denied", "/x/y")
    monkeypatch.setattr(setup_module, "build_trainer", lambda *a, **k: (_ for _ in ()).throw(denied))
    assert main(_pretrain(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("kith: error: cannot use '/x/y'")
    monkeypatch.setattr(setup_module, "build_trainer", lambda *a, **k: 1 / 0)  # a bug, not the user's
    with pytest.raises(ZeroDivisionError):
        main(_pretrain(tmp_path / "run2"))


# ---- writes: atomic, inside the run folder ---------------------------------------------------
def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    for exc in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        def write(fh, exc=exc):
            fh.write(b"half")
            raise exc

        with pytest.raises(type(exc)) as info:
            atomic_write(path, write)
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    assert info.type is KeyboardInterrupt
    with pytest.raises(OSError) as info:
        atomic_write(path, lambda fh: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert info.value.filename == str(path)  # the boundary can name the file


def test_eval_never_writes_through_a_metrics_symlink(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    outside = tmp_path / "mine.jsonl"
    outside.write_text('{"a": 1}\n{"b": 2')  # a last line without a newline: what eval used to cut
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    assert main(["eval", str(run), "--k", "5", "--no-linear"]) == 2
    assert "symlink" in _one_line_error(capsys)
    assert outside.read_text() == '{"a": 1}\n{"b": 2'


def test_export_never_replaces_a_checkpoint_of_a_run(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    before = (run / CHECKPOINT).read_bytes()
    for target in (run / CHECKPOINT, run / "config.yaml"):
        assert main(["export", str(run), str(target)]) == 2
        assert "refusing to write" in _one_line_error(capsys)
    assert main(["export", str(run / CHECKPOINT), str(run / CHECKPOINT)]) == 2
    _one_line_error(capsys)
    assert (run / CHECKPOINT).read_bytes() == before
    assert main(["pretrain", "--resume", str(run), "train.epochs=2"]) == 0  # still a good checkpoint
    assert main(["export", str(run), str(run / "exported" / "b.pt")]) == 0  # a new file in the folder: fine


def test_overwrite_refuses_a_folder_kith_did_not_make(tmp_path, capsys):
    folder = tmp_path / "mine"
    for name in ("plots/figure1.png", "wandb/run.log", "tensorboard/events", "metrics.jsonl"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("the user's")
    assert main(_pretrain(folder, "--overwrite")) == 2
    assert "no kith run manifest" in _one_line_error(capsys)
    assert all((folder / n).read_text() == "the user's"
               for n in ("plots/figure1.png", "wandb/run.log", "tensorboard/events", "metrics.jsonl"))


def test_overwrite_deletes_only_what_the_run_created(tmp_path, capsys):
    folder = tmp_path / "run"
    (folder / "plots").mkdir(parents=True)
    (folder / "plots" / "figure1.png").write_text("the user's")  # there before the first run
    assert main(_pretrain(folder)) == 0
    (folder / "notes.txt").write_text("the user's")  # added next to the run
    assert "plots" not in json.loads((folder / ".kith-run.json").read_text())["created"]
    assert main(_pretrain(folder, "--overwrite")) == 0
    assert (folder / "plots" / "figure1.png").read_text() == "the user's"
    assert (folder / "notes.txt").read_text() == "the user's"
    kinds = [json.loads(r)["kind"] for r in (folder / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1


# ---- signals at any moment -----------------------------------------------------------------------
def _ignore_sigint() -> None:
    """What a non-interactive shell does to a background job (`cmd &` in a script, a CI runner)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_run_started_with_sigint_ignored(signame, tmp_path):
    """The flaky test's cause: started with SIGINT ignored (inherited), Python raised no
    KeyboardInterrupt, the run trained to the end and exited 0 saying nothing. Sent as soon as the
    folder exists (the lock is the first file), the signal must stop it with 130 and no lock."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kith", *_pretrain(run, "train.epochs=500")]
    code, err, _ = signal_run(cmd, signame, run.exists, poll_s=0.01, preexec_fn=_ignore_sigint)
    assert code == 130, err[-2000:]
    assert "interrupted" in err and not (run / ".lock").exists()


def test_a_signal_while_the_lock_is_written_leaves_no_lock(tmp_path, monkeypatch):
    import kith.runs.folder as folder

    def dumps(obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder.json, "dumps", dumps)
    with pytest.raises(KeyboardInterrupt):
        with folder.locked(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_interrupt_still_stops_the_loop():
    """A KeyboardInterrupt raised inside a finaliser (a DataLoader iterator's __del__) is lost; the
    loop's check at every step raises it again."""
    from kith.utils.signals import check_stop, stop_on_signals

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here and its exception is swallowed

    with stop_on_signals():
        try:
            Finalised()
        except KeyboardInterrupt:
            pytest.skip("the interrupt was not swallowed on this interpreter")
        with pytest.raises(KeyboardInterrupt):
            check_stop()
    check_stop()  # outside: nothing pending


@pytest.mark.parametrize("content", ['{"pid": 99999999999, "host": "h"}', '{"pid": -1, "host": "h"}'])
def test_a_lock_with_an_impossible_pid_is_taken_over(content, tmp_path, capsys):
    import kith.runs.folder as folder

    (tmp_path / ".lock").write_text(content)
    with folder.locked(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "invalid lock" in capsys.readouterr().err


# ---- resume refuses what cannot be true --------------------------------------------------------
def test_resume_refuses_fewer_epochs_than_done(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    assert main(["pretrain", "--resume", str(run), "train.epochs=1"]) == 2
    err = _one_line_error(capsys)
    assert "train.epochs=1" in err and "2 epochs" in err
    assert (run / "config.yaml").read_text() == config  # not rewritten to a lie


def test_resume_refuses_a_checkpoint_of_other_shapes(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    key = next(k for k, v in ckpt["method"].items() if v.dim() == 2)
    ckpt["method"][key] = torch.zeros(3, 3)
    torch.save(ckpt, run / CHECKPOINT)
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = _one_line_error(capsys)
    assert "does not fit" in err and key in err
