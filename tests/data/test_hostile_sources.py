"""Issue 21: every source validated at load, one line per problem (npz, CIFAR, STL-10, file lists,
folders), internal markers that cannot collide with a user's label, only regular files opened."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from kith.data.arrays import load_cifar_split, load_npz_split, load_stl10_split
from kith.data.images import list_image_folder, open_rgb
from kith.data.sources import load_folder_split, read_file_list
from kith.utils.errors import UserError


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


X = np.zeros((6, 8, 8, 3), np.uint8)


@pytest.mark.parametrize("y, says", [
    (np.zeros(7, np.int64), "6 images but labels of shape (7,)"),
    (np.zeros(5, np.int64), "6 images but labels of shape (5,)"),  # used to train silently on a prefix
    (np.eye(6, 3, dtype=np.int64), "one-hot"),
    (np.full(6, 0.5), "not integers"),
    (np.full(6, -2), "hold -2"),  # the loader's "undecodable" marker
    (np.full(6, 10**10), "hold 10000000000"),
])
def test_npz_labels_are_checked(y, says, tmp_path):
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")) as info:
        load_npz_split(_npz(tmp_path, x=X, y=y), "train")
    assert "\n" not in str(info.value)


def test_a_npy_or_an_object_array_given_as_npz_is_one_line(tmp_path):
    np.save(tmp_path / "a.npy", X)
    os.rename(tmp_path / "a.npy", tmp_path / "a.npz")
    with pytest.raises(UserError, match="single .npy array"):
        load_npz_split(str(tmp_path / "a.npz"), "train")
    np.savez(tmp_path / "o.npz", x=np.array([X, None], dtype=object))
    with pytest.raises(UserError, match="cannot read"):
        load_npz_split(str(tmp_path / "o.npz"), "train")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz_split(str(tmp_path / "t.npz"), "train")


@pytest.mark.parametrize("entry, says", [
    ({"labels": [0]}, "lacks 'data'"),
    ({"data": [], "labels": []}, "N > 0"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "2 images"),
])
def test_cifar_batches_are_checked(entry, says, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with pytest.raises(UserError, match=says):
        load_cifar_split("cifar10", str(tmp_path), "train", download=False)


def test_stl10_truncated_or_short_labels_are_one_line(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    image = 3 * 96 * 96
    (folder / "test_X.bin").write_bytes(bytes(image * 2 + 100))
    with pytest.raises(UserError, match="truncated"):
        load_stl10_split(str(tmp_path), "test", download=False)
    (folder / "test_X.bin").write_bytes(bytes(image * 2))
    (folder / "test_y.bin").write_bytes(bytes([1]))
    with pytest.raises(UserError, match="1 labels for the 2 images"):  # used to be cut silently
        load_stl10_split(str(tmp_path), "test", download=False)


def test_file_lists_bom_latin1_and_odd_labels(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_bytes("\ufeffa.png 0\nb.png 1\n".encode("utf-8"))
    files, labels, _ = read_file_list(lst)
    assert files[0] == str(tmp_path / "a.png") and labels == [0, 1]  # no invisible U+FEFF
    lst.write_bytes("caf\xe9.png 0\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 .* line 1.*iconv"):
        read_file_list(lst)
    lst.write_text("a.png -2\n")
    with pytest.raises(UserError, match="hold -2"):
        read_file_list(lst)
    lst.write_text("a.png --5\nb.png x\n")  # not an integer: a class name, never a crash
    assert read_file_list(lst)[1] == [0, 1]
    lst.write_text(f"a.png {10**10}\n")
    with pytest.raises(UserError, match="class indices"):
        read_file_list(lst)


def _png(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_hidden_folders_are_ignored_and_a_flat_folder_stays_flat(tmp_path):
    for i in range(3):
        _png(tmp_path / f"img{i}.png")
    _png(tmp_path / ".ipynb_checkpoints" / "img0-checkpoint.png")
    _png(tmp_path / "._img0.png")
    files, labels, classes = list_image_folder(tmp_path)
    assert classes == [] and labels == [-1] * 3 and len(files) == 3


def test_a_fifo_named_png_is_never_opened(tmp_path):
    for i in range(2):
        _png(tmp_path / f"img{i}.png")
    os.mkfifo(tmp_path / "x.png")  # reading it would block forever
    files, _, _ = list_image_folder(tmp_path)
    assert sorted(os.path.basename(f) for f in files) == ["img0.png", "img1.png"]
    assert open_rgb(str(tmp_path / "x.png")) is None  # a file list naming it: a bad image, no hang


def test_a_symlink_loop_is_one_line(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")
    with pytest.raises(UserError, match="symlink loop"):
        load_folder_split(str(tmp_path), "train", 8)


def test_an_image_larger_than_the_pixel_limit_is_a_bad_image(tmp_path):
    _png(tmp_path / "big.png", (64, 64))
    assert open_rgb(str(tmp_path / "big.png")) is not None
    assert open_rgb(str(tmp_path / "big.png"), max_pixels=64 * 63) is None  # judged from the header


def _unreadable(monkeypatch, folder):
    """os.scandir refuses `folder` as it would without read permission (the tests run as root)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == os.path.abspath(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("which", ["cat", "cat/sub", "."])
def test_an_unreadable_folder_is_named(tmp_path, monkeypatch, which):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "cat" / "sub" / "b.png")
    _png(tmp_path / "dog" / "c.png")
    folder = tmp_path / which if which != "." else tmp_path
    _unreadable(monkeypatch, folder)
    with pytest.raises(UserError) as err:
        load_folder_split(str(tmp_path), "train", 8)
    message = str(err.value)
    assert message.startswith(f"cannot read folder '{folder}' (permission denied)") and "chmod" in message


def test_a_hidden_folder_in_train_does_not_shift_the_val_labels(tmp_path):
    """The held-out split's labels come from train/'s class folders, hidden ones left out as in its listing
    (`.ipynb_checkpoints` sorts first and used to shift every val label by one)."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            _png(tmp_path / split / c / "x.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    train = load_folder_split(str(tmp_path), "train", 8)
    val = load_folder_split(str(tmp_path), "val", 8)
    assert train.classes == val.classes == ["a", "b"]
    assert val.labels.tolist() == train.labels.tolist() == [0, 1]
