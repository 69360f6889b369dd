from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kith.config import DataConfig
from kith.data.loader import ResidentLoader, make_train_loader, shard_indices
from kith.data.sources import balanced_subset, load_splits
from kith.utils.errors import UserError
from tests.helpers import tiny_config


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def _write_images(folder, n, size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_digits_split():
    train, test = load_splits(data_cfg(name="digits"))
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert set(train.labels.tolist()) == set(range(10))


def test_class_folder_with_holdout(tmp_path):
    for c in ("cat", "dog"):
        _write_images(tmp_path / c, 10)
    train, test = load_splits(data_cfg(name="folder", path=str(tmp_path), size=16, holdout=0.2))
    assert len(train) == 16 and len(test) == 4
    assert train.classes == ["cat", "dog"]
    loader, data = make_train_loader(train, tiny_config("simclr", "data.size=16", "train.batch_size=8"),
                                     torch.device("cpu"), 0, 0, 1)
    assert data.images.shape == (16, 3, 16, 16)  # decoded and resized from 20x24
    batch = next(loader.epoch(0))
    assert batch.images.shape == (8, 3, 16, 16) and batch.indices.shape == (8,)


def test_flat_folder_is_unlabelled(tmp_path):
    _write_images(tmp_path, 6)
    train, _ = load_splits(data_cfg(name="folder", path=str(tmp_path), holdout=0.2))
    assert (train.labels == -1).all()


def test_corrupt_and_empty_images_are_reported(tmp_path):
    _write_images(tmp_path / "a", 8)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    train, _ = load_splits(data_cfg(name="folder", path=str(tmp_path), holdout=0.1))
    cfg = tiny_config("simclr", "train.batch_size=4")
    with pytest.raises(UserError,
                       match="2 image files cannot be decoded.*broken.jpg.*empty.png.*skip_bad_images"):
        make_train_loader(train, cfg, torch.device("cpu"), 0, 0, 1)
    cfg = tiny_config("simclr", "train.batch_size=4", "data.skip_bad_images=true")
    _, data = make_train_loader(train, cfg, torch.device("cpu"), 0, 0, 1)
    bad = sum(Path(f).stem in ("broken", "empty") for f in train.files)
    assert bad == 2 and len(data) == len(train) - bad


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_splits(data_cfg(name="folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_splits(data_cfg(name="folder", path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        load_splits(data_cfg(name="cifar1O"))
    with pytest.raises(UserError, match="cifar10 python-format folder not found"):
        load_splits(data_cfg(name="cifar10", path=str(tmp_path)))


def test_npz_source_and_shape_errors(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (30, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    train, test = load_splits(data_cfg(name="npz", path=str(tmp_path / "d.npz"), holdout=0.2))
    assert len(train) == 24 and len(test) == 6 and train.images.shape[1:] == (3, 12, 12)
    np.savez(tmp_path / "rect.npz", x=x[:, :, :10])
    with pytest.raises(UserError, match="square"):
        load_splits(data_cfg(name="npz", path=str(tmp_path / "rect.npz")))
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        load_splits(data_cfg(name="npz", path=str(tmp_path / "float.npz")))
    np.savez(tmp_path / "nox.npz", images=x)
    with pytest.raises(UserError, match="no array 'x'"):
        load_splits(data_cfg(name="npz", path=str(tmp_path / "nox.npz")))


def test_cifar_python_layout(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    train, test = load_splits(data_cfg(name="cifar10", path=str(tmp_path)))
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4 and train.classes[0] == "c0"


def test_balanced_subset_and_sharding():
    labels = torch.arange(100) % 4
    idx = balanced_subset(labels, 20, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 5, 5, 5]
    shards = [shard_indices(100, 20, 0, 3, r, 2) for r in range(2)]
    both = torch.cat([torch.cat([a, b]) for a, b in zip(*shards)])
    assert len(both.unique()) == len(both) == 100  # disjoint, cover the epoch
    with pytest.raises(UserError, match="not divisible"):
        shard_indices(100, 21, 0, 0, 0, 2)


def test_batch_larger_than_dataset_is_user_error():
    train, _ = load_splits(data_cfg(name="digits", train_subset=10))
    with pytest.raises(UserError, match="larger than"):
        ResidentLoader(train, 32, torch.device("cpu"), 0)
