"""Issue 21, bounded memory: a checkpoint's uncompressed size (from its zip directory) is checked against
a limit and against its file size before torch.load allocates anything."""

from __future__ import annotations

import zipfile

import pytest
import torch

import kith.runs.files as files
from kith.runs.files import MAX_CHECKPOINT_ENV, check_archive_size, load_file
from kith.utils.errors import UserError


def _save(path, numel=250_000):
    torch.save({"w": torch.zeros(numel)}, path)  # 1 MB of float32
    return path


def _recompress(src, dst):
    """`src` with every member deflated (torch.save never compresses): zeros shrink a thousandfold."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
    return dst


def test_a_normal_checkpoint_loads(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_CHECKPOINT_ENV, raising=False)
    path = _save(tmp_path / "a.pt")
    check_archive_size(path)
    assert load_file(path)["w"].shape == (250_000,)


def test_a_zip_bomb_is_refused_before_loading(tmp_path, monkeypatch):
    bomb = _recompress(_save(tmp_path / "a.pt"), tmp_path / "bomb.pt")
    assert bomb.stat().st_size * 50 < (tmp_path / "a.pt").stat().st_size
    monkeypatch.setattr(files, "INFLATION_FLOOR", 0)  # a 1 MB bomb stands in for a 512 MiB one

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(UserError) as err:
        load_file(bomb)
    message = str(err.value)
    assert "\n" not in message and str(bomb) in message and "inflates to 1.0 MB" in message
    assert "zip bomb" in message


def test_a_checkpoint_over_the_limit_names_it_and_how_to_raise_it(tmp_path, monkeypatch):
    path = _save(tmp_path / "a.pt")
    monkeypatch.setenv(MAX_CHECKPOINT_ENV, "0.0005")  # 500 KB
    with pytest.raises(UserError) as err:
        load_file(path)
    message = str(err.value)
    assert str(path) in message and "1.0 MB uncompressed" in message and "500 KB" in message
    assert f"set {MAX_CHECKPOINT_ENV}=1" in message
    monkeypatch.setenv(MAX_CHECKPOINT_ENV, "0.002")
    assert load_file(path)["w"].numel() == 250_000
    monkeypatch.setenv(MAX_CHECKPOINT_ENV, "lots")
    with pytest.raises(UserError, match=f"{MAX_CHECKPOINT_ENV}='lots' is not a positive number"):
        load_file(path)


def test_a_file_that_is_not_a_zip_is_left_to_the_reader(tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(_save(tmp_path / "a.pt").read_bytes()[:1000])  # truncated: the reader's own error
    check_archive_size(path)
    with pytest.raises(Exception) as err:
        load_file(path)
    assert not isinstance(err.value, UserError) or "inflates" not in str(err.value)
