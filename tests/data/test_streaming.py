"""Streaming path: crops cut from full images in workers, seeded per (seed, step, rank, position); clean
passes through a worker pool; fast, cached listing; ImageNet-style folders and file lists."""

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kith.config import DataConfig
from kith.data import images
from kith.data.augment import BatchAugment, ViewConfig
from kith.data.images import decode_image
from kith.data.loader import (
    Batch,
    StreamingLoader,
    _Key,
    _StreamDataset,
    augment_views,
    decode_crop_batch,
    iter_images,
    make_train_loader,
)
from kith.data.sources import load_splits
from kith.data.spec import ImageSpec
from kith.train.loop import run_training
from kith.utils.errors import UserError
from kith.utils.rng import view_seed
from tests.helpers import image_folder, stream_config

CPU = torch.device("cpu")


def _loader(root, workers, *extra):
    cfg = stream_config(root, f"data.num_workers={workers}", *extra)
    train, _ = load_splits(cfg.data)
    loader, _ = make_train_loader(train, cfg, CPU, 0, 0, 1)
    assert isinstance(loader, StreamingLoader)
    return loader


def test_crops_come_from_the_full_image_not_the_centre_square(tmp_path):
    loader = _loader(image_folder(tmp_path), 0)
    blue = 0
    for batch in loader.epoch(0):
        assert len(batch.views) == 2  # the preset's [strong, strong_solarize]
        for crops in batch.views:
            assert crops.shape == (8, 3, 16, 16) and crops.dtype == torch.uint8
            b = crops.float()
            blue += int(((b[:, 2] > 200) & (b[:, 1] < 60)).sum())
    assert blue > 0  # a centre-crop-first pipeline never shows the blue borders
    # the clean pass still sees the centre square (shorter side resized, centre crop)
    clean = decode_image(loader.dataset.files[0], 16)
    assert (clean[..., 1] > 200).all()


def test_same_crops_after_resume_whatever_the_workers(tmp_path):
    root = image_folder(tmp_path)
    full = [b.views for b in _loader(root, 0).epoch(1)]
    resumed = list(_loader(root, 2).epoch(1, start=1))  # a resumed run starting at the epoch's step 1
    assert len(resumed) == len(full) - 1
    for views, batch in zip(full[1:], resumed):
        for a, b in zip(views, batch.views, strict=True):
            assert torch.equal(a, b)
    other_epoch = next(_loader(root, 0).epoch(2)).views[0]
    assert not torch.equal(other_epoch, full[0][0])


def test_a_recipe_named_twice_is_cut_twice_with_its_own_geometry(tmp_path):
    """SimCLR's and MoCo v2+'s views are [strong, strong]: streamed, each view gets its own crop (keyed by
    its position, not by the recipe's name, which once gave both views one crop)."""
    loader = _loader(image_folder(tmp_path), 0, "method.views=[strong,strong]")
    batch = next(loader.epoch(0))
    first, second = batch.views
    assert first.shape == second.shape and not torch.equal(first, second)


def test_view_seed_depends_on_each_part():
    seeds = {view_seed(s, p, v) for s in (1, 2) for p in (0, 1) for v in (0, 1)}
    assert len(seeds) == 8


def test_gpu_decode_path_matches_cpu_path_on_cpu(tmp_path):
    """decode=gpu's worker half (bytes + crop boxes) and device half (batched decode_jpeg + shared crop),
    run on the CPU, cut the same crops as the CPU workers."""
    root = image_folder(tmp_path, n=6)
    Image.new("RGB", (30, 50), (9, 9, 9)).save(root / "a" / "png.png")  # non-JPEG: decoded in the worker
    files = sorted(str(p) for p in root.rglob("*.*"))
    views = [ViewConfig(), ViewConfig(min_scale=0.5)]
    key_batch = {"files": files, "labels": torch.zeros(len(files), dtype=torch.long), "size": 16,
                 "views": views}
    key = _Key(tuple(range(len(files))), step_seed=1234)
    cpu_views, _, _ = _StreamDataset(**key_batch)[key]
    parts, _, _ = _StreamDataset(**key_batch, gpu=True)[key]
    gpu_views = decode_crop_batch(parts, 16, CPU)
    for a, b in zip(cpu_views, gpu_views):
        assert torch.equal(a, b)


def test_gpu_decode_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="data.decode=gpu needs a CUDA device"):
        _loader(image_folder(tmp_path, n=16), 0, "data.decode=gpu")


def test_precropped_views_skip_only_the_geometric_part():
    """On images already at the view size, an identity crop (scale 1, ratio 1, no flip) with crop=True equals
    crop=False: the photometric part is the same, drawn from the same random stream."""
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    view = ViewConfig(min_scale=1.0, min_ratio=1.0, max_ratio=1.0, flip_prob=0.0, solarize_prob=0.5)
    aug = BatchAugment(view, ImageSpec.of(16, (0.5,) * 3, (0.25,) * 3))
    full = aug(images, torch.Generator().manual_seed(3))
    photometric = aug(images, torch.Generator().manual_seed(3), crop=False)
    torch.testing.assert_close(full, photometric, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="16x16"):
        aug(torch.zeros(2, 3, 20, 20, dtype=torch.uint8), torch.Generator(), crop=False)


def test_streamed_training_runs_end_to_end(tmp_path):
    cfg = stream_config(image_folder(tmp_path / "data"), "data.num_workers=1", "train.epochs=2")
    result = run_training(cfg, run_dir=tmp_path / "run")
    assert result.knn  # the clean passes (monitor and final kNN) ran through the worker pool
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the persistent workers serve the second epoch too


def test_augment_views_on_resident_batches_is_the_full_augment():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    augments = {"v": BatchAugment(ViewConfig(), ImageSpec.of(12, (0.5,) * 3, (0.25,) * 3))}
    batch = Batch(images, torch.zeros(4, dtype=torch.long), torch.arange(4))
    out = augment_views(batch, augments, ["v"], torch.Generator().manual_seed(0))
    assert torch.equal(out[0], augments["v"](images, torch.Generator().manual_seed(0)))


def test_clean_pass_uses_workers_in_order(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(23):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    data, _ = load_splits(OmegaConf.structured(DataConfig(name="folder", path=str(root), holdout=0.1,
                                                          num_workers=2)))
    assert data.num_workers == 2
    seen = []
    real = torch.utils.data.DataLoader.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_workers"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    pooled = list(iter_images(data, 5, CPU, 12))
    assert seen == [2]
    inline = list(iter_images(data, 5, CPU, 12, num_workers=0))
    assert torch.cat([b.indices for b in pooled]).tolist() == list(range(len(data)))
    assert torch.equal(torch.cat([b.images for b in pooled]), torch.cat([b.images for b in inline]))
    expected = np.stack([decode_image(f, 12) for f in data.files])
    assert torch.equal(torch.cat([b.images for b in pooled]), torch.from_numpy(expected).permute(0, 3, 1, 2))


def test_imagenet_style_train_val_folders(tmp_path):
    for split, classes in (("train", ("cat", "dog", "eel")), ("val", ("dog", "eel"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / f"{i}.jpg")
    train, test = load_splits(OmegaConf.structured(DataConfig(name="folder", path=str(tmp_path))))
    assert len(train) == 9 and len(test) == 6
    assert test.classes == ["cat", "dog", "eel"]
    assert sorted(set(test.labels.tolist())) == [1, 2]  # val's classes keep the training split's indices
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "0.jpg")
    with pytest.raises(UserError, match="fox"):
        load_splits(OmegaConf.structured(DataConfig(name="folder", path=str(tmp_path))))


def test_file_list_source(tmp_path):
    (tmp_path / "img" / "x").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "img" / "x" / f"{i}.jpg")
    (tmp_path / "train.txt").write_text("# path label\n"
                                        + "".join(f"img/x/{i}.jpg {i % 2}\n" for i in range(4)))
    (tmp_path / "val.txt").write_text("img/x/4.jpg 1\n\nimg/x/5.jpg 0\n")
    train, test = load_splits(OmegaConf.structured(DataConfig(name="filelist", path=str(tmp_path))))
    assert train.files[1] == str(tmp_path / "img" / "x" / "1.jpg") and train.labels.tolist() == [0, 1, 0, 1]
    assert test.labels.tolist() == [1, 0] and os.path.isfile(test.files[0])
    # one list file with class names: the training split, a test split held out
    (tmp_path / "named.txt").write_text("".join(f"img/x/{i}.jpg {'cat' if i < 3 else 'dog'}\n"
                                                for i in range(6)))
    named = DataConfig(name="filelist", path=str(tmp_path / "named.txt"), holdout=0.34)
    train, test = load_splits(OmegaConf.structured(named))
    assert train.classes == ["cat", "dog"] and len(train) + len(test) == 6 and len(test) == 2
    with pytest.raises(UserError, match="no train.txt"):
        load_splits(OmegaConf.structured(DataConfig(name="filelist", path=str(tmp_path / "img"))))


def test_listing_cache_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KITH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "CACHE_MIN_FILES", 1)
    monkeypatch.setattr(images, "_MTIME_SLACK_NS", 0)
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / f"{i}.png")
    files, labels, classes = images.list_image_folder(root.parent)
    assert len(files) == 3 and classes == ["c"] and labels == [0, 0, 0]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(images, "_scan_folder", lambda r: calls.append(r) or pytest.fail("re-listed"))
    assert images.list_image_folder(root.parent)[0] == files  # unchanged tree: served from the cache
    monkeypatch.undo()
    monkeypatch.setenv("KITH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "CACHE_MIN_FILES", 1)
    (root / "0.png").unlink()
    Image.new("RGB", (8, 8)).save(root / "9.png")
    stat = os.stat(root)
    os.utime(root, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # a coarse clock still moves on
    files, _, _ = images.list_image_folder(root.parent)
    assert [os.path.basename(f) for f in files] == ["1.png", "2.png", "9.png"]


EXTRA = ["augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}", "method.extra_views=[small,small]"]


def test_workers_cut_every_extra_crop_from_the_full_image_at_its_own_size(tmp_path):
    root = image_folder(tmp_path)
    loader = _loader(root, 0, *EXTRA)
    blue = 0
    for batch in loader.epoch(0):
        assert [tuple(c.shape) for c in batch.extra] == [(8, 3, 8, 8)] * 2
        assert not torch.equal(batch.extra[0], batch.extra[1])  # each crop its own seed
        blue += sum(int(((c[:, 2] > 200) & (c[:, 1] < 60)).sum()) for c in batch.extra)
    assert blue > 0  # small crops reach the borders: cut from the full image
    # a resumed loader (another worker count, a later start) cuts the same extra crops
    full = [b.extra for b in _loader(root, 0, *EXTRA).epoch(1)]
    resumed = [b.extra for b in _loader(root, 2, *EXTRA).epoch(1, start=1)]
    assert all(torch.equal(a, b) for x, y in zip(full[1:], resumed) for a, b in zip(x, y))


def test_gpu_decode_path_cuts_each_view_at_its_own_size(tmp_path):
    files = sorted(str(p) for p in image_folder(tmp_path, n=4).rglob("*.jpg"))
    views = [ViewConfig(), ViewConfig(size=8, min_scale=0.05, max_scale=0.3)]
    labels = torch.zeros(len(files), dtype=torch.long)
    dataset = {"files": files, "labels": labels, "size": 16, "views": views}
    key = _Key(tuple(range(len(files))), step_seed=99)
    cpu_views, _, _ = _StreamDataset(**dataset)[key]
    parts, _, _ = _StreamDataset(**dataset, gpu=True)[key]
    gpu_views = decode_crop_batch(parts, [16, 8], CPU)
    assert [tuple(v.shape[-2:]) for v in cpu_views] == [(16, 16), (8, 8)]
    assert all(torch.equal(a, b) for a, b in zip(cpu_views, gpu_views))
