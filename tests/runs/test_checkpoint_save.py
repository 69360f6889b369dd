"""Divergence and disk: no checkpoint with non-finite state, messages that say what exists, a full disk
that leaves the previous checkpoint intact, and a corrupt last.pt that points at prev.pt."""

import errno

import pytest
import torch

from kith.runs import checkpoint as run_module
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import tiny_config

FAST = ("method.proj_hidden_dim=32", "train.knn_every=0")


def _floating(obj):
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floating(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floating(v)


def _ckpt(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)


def test_inf_batchnorm_statistics_are_never_checkpointed(tmp_path):
    """lr 1e8: the loss stays finite while BatchNorm running_var overflows to inf; the run used to
    finish with exit 0 and a checkpoint full of inf."""
    cfg = tiny_config("simclr", "train.lr=1e8", *FAST, out_dir=tmp_path)
    with pytest.raises(UserError, match="not finite") as err:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    assert "running_var" in str(err.value) and "\n" not in str(err.value)
    for name in ("last.pt", "prev.pt"):
        if (tmp_path / "run" / "checkpoints" / name).is_file():
            assert all(torch.isfinite(t).all() for t in _floating(_ckpt(tmp_path / "run", name)))
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_nan_message_without_a_checkpoint_does_not_claim_one(tmp_path):
    cfg = tiny_config("simclr", "train.lr=1e30", *FAST, out_dir=tmp_path)
    with pytest.raises(UserError, match="loss became") as err:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert "kept at" not in str(err.value) and "no checkpoint" in str(err.value)


def test_nan_message_names_the_kept_checkpoint_and_its_epoch(tmp_path):
    cfg = tiny_config("simclr", "train.epochs=3", *FAST, out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", stop_after_epoch=1, final_eval=False)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    diverging = tiny_config("simclr", "train.epochs=3", *FAST, "train.lr=1e30", out_dir=tmp_path)
    with pytest.raises(UserError, match="loss became") as err:  # lr is a key a resume may change
        run_training(diverging, run_dir=tmp_path / "run", resume=True, final_eval=False)
    assert f"kept at '{path}'" in str(err.value) and "epoch 1" in str(err.value)
    assert _ckpt(tmp_path / "run")["epoch"] == 1


def _failing_save(real_save, exc, fail_on_call):
    """torch.save that writes part of the file and then fails as a full disk does, on call `fail_on_call`."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        if hasattr(f, "write"):  # kith saves through a handle of its temp file
            f.write(b"PK\x03\x04" + b"\0" * 1000)
        else:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04" + b"\0" * 1000)
        raise exc

    return save


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # seen on EFBIG
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-writer", "enospc"])
def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, exc):
    cfg = tiny_config("simclr", "train.epochs=3", *FAST, out_dir=tmp_path)
    monkeypatch.setattr(run_module.torch, "save", _failing_save(torch.save, exc, fail_on_call=2))
    with pytest.raises(UserError) as err:
        run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    monkeypatch.undo()
    message = str(err.value)
    assert message.startswith("disk full while writing the checkpoint to") and "\n" not in message
    assert "last.pt" in message
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert _ckpt(tmp_path / "run")["epoch"] == 1


def test_previous_checkpoint_is_kept_as_prev(tmp_path):
    cfg = tiny_config("simclr", "train.epochs=3", *FAST, out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", final_eval=False)
    assert _ckpt(tmp_path / "run")["epoch"] == 3
    assert _ckpt(tmp_path / "run", "prev.pt")["epoch"] == 2
    assert not list((tmp_path / "run").rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle-garbage", "empty"])
def test_corrupt_last_checkpoint_on_resume_is_one_line_and_offers_prev(tmp_path, damage):
    cfg = tiny_config("simclr", "train.epochs=3", *FAST, out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run", stop_after_epoch=2, final_eval=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    data = last.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 50,
               "pickle-garbage": b"\x80\x04garbage" * 50, "empty": b""}
    last.write_bytes(damaged[damage])
    with pytest.raises(UserError) as err:
        run_training(cfg, run_dir=tmp_path / "run", resume=True, final_eval=False)
    message = str(err.value)
    assert "\n" not in message and str(last) in message
    # pickle opcodes that reach a non-plain object are load_file's refusal, named as such
    assert ("refusing" if damage == "pickle-garbage" else "corrupt") in message
    assert str(tmp_path / "run" / "checkpoints" / "prev.pt") in message
    # the advice works: prev.pt as last.pt resumes from epoch 1 and finishes
    (tmp_path / "run" / "checkpoints" / "prev.pt").replace(last)
    result = run_training(cfg, run_dir=tmp_path / "run", resume=True, final_eval=False)
    assert result.epochs == 3
