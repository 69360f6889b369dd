"""Bad data: one rule for corrupt files in either split, every bad file listed, 16-bit PNGs, npz names."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kith.config import DataConfig
from kith.data.images import decode_image
from kith.data.sources import load_splits
from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from kith.utils.errors import UserError
from tests.helpers import tiny_config


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def _folder(root, counts, bad=None):
    """root/<split>/<class>/<i>.png random images; `bad` maps split -> number of corrupt files to add."""
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    broken = []
    for split, n in (bad or {}).items():
        for i in range(n):
            path = root / split / "a" / f"broken{i:02d}.png"
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
            broken.append(str(path))
    return broken


def test_corrupt_test_file_stops_like_a_training_one(tmp_path):
    """It used to be scored as a black image, with exit 0."""
    broken = _folder(tmp_path / "data", {"train": 20, "test": 5}, bad={"test": 1})
    with pytest.raises(UserError) as err:
        load_splits(data_cfg(name="folder", path=str(tmp_path / "data"), size=16))
    assert broken[0] in str(err.value) and "data.skip_bad_images=true" in str(err.value)
    assert "\n" not in str(err.value)


def test_skipped_images_are_counted_in_the_log_and_summary(tmp_path):
    broken = _folder(tmp_path / "data", {"train": 20, "test": 5}, bad={"train": 2, "test": 1})
    cfg = tiny_config("simclr", "data.name=folder", f"data.path={tmp_path / 'data'}",
                      "data.skip_bad_images=true", "train.epochs=1", "method.proj_hidden_dim=32",
                      out_dir=tmp_path)
    run_training(cfg, run_dir=tmp_path / "run")
    start = read_metrics(tmp_path / "run")[0]
    assert start["kind"] == "start" and start["skipped_images"] == {"train": 2, "test": 1}
    assert start["num_train"] == 40 and start["num_test"] == 10
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": 2, "test": 1}
    assert sorted((tmp_path / "run" / "bad_images.txt").read_text().split()) == sorted(broken)


def test_many_bad_files_are_listed_and_written_out(tmp_path):
    broken = _folder(tmp_path / "data", {"train": 20, "test": 5}, bad={"train": 12})
    cfg = tiny_config("simclr", "data.name=folder", f"data.path={tmp_path / 'data'}", "train.epochs=1",
                      "method.proj_hidden_dim=32", out_dir=tmp_path / "out")
    with pytest.raises(UserError) as err:
        run_training(cfg, run_dir=tmp_path / "out" / "run")
    message = str(err.value)
    assert "\n" not in message and "12 image files cannot be decoded" in message
    assert sum(path in message for path in broken) == 10 and "and 2 more" in message
    listed = re.search(r"all of them in '([^']+)'", message).group(1)
    assert listed.startswith(str(tmp_path / "out"))
    assert sorted(Path(listed).read_text().split()) == sorted(broken)


@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (0, 0), (257 * 40, 40)])
def test_16_bit_png_is_scaled_to_8_bit(tmp_path, value, expected):
    """A 16-bit mid-grey used to decode as white (PIL clips I;16 to 255 when converting to RGB)."""
    Image.fromarray(np.full((12, 12), value, dtype=np.uint16)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as check:
        assert check.mode.startswith("I")  # a real 16-bit file
    out = decode_image(str(tmp_path / "grey16.png"), 8)
    assert out.shape == (8, 8, 3) and abs(int(out.mean()) - expected) <= 1


@pytest.mark.parametrize("values,expected", [
    ((0.5, 0.5), 128),  # a float TIFF in [0, 1] used to decode to black (PIL clips "F" at 255)
    ((0.0, 1.0), (0, 255)),
    ((100.0, 100.0), 100),  # already 8-bit levels: kept
    ((-1.0, 1.0), (0, 255)),  # another range: stretched from its min..max
    ((0.0, 4095.0), (0, 255)),
])
def test_a_float_tiff_is_scaled_to_8_bit(tmp_path, values, expected):
    left, right = values
    pixels = np.full((12, 12), left, np.float32)
    pixels[:, 6:] = right
    Image.fromarray(pixels, "F").save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as check:
        assert check.mode == "F"  # a real 32-bit float file
    out = decode_image(str(tmp_path / "f.tif"), 12).astype(int)
    low, high = expected if isinstance(expected, tuple) else (expected, expected)
    assert abs(out[:, 1].mean() - low) <= 1 and abs(out[:, -2].mean() - high) <= 1


def test_a_16_bit_tiff_and_nan_floats(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "g.tif")
    with Image.open(tmp_path / "g.tif") as check:
        assert check.mode.startswith("I;16")
    assert abs(int(decode_image(str(tmp_path / "g.tif"), 8).mean()) - 128) <= 1
    nan = np.full((8, 8), 0.5, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    assert abs(int(np.median(decode_image(str(tmp_path / "nan.tif"), 8))) - 128) <= 1


def test_npz_with_keras_names(tmp_path):
    """x_train/y_train/x_test/y_test (keras, and the CIFAR pack's prepare.py --format npz) were refused."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(30) % 3, x_test=rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8),
             y_test=np.arange(9) % 3, classes=np.array(["a", "b", "c"]))
    train, test = load_splits(data_cfg(name="npz", path=str(tmp_path / "d.npz"), size=16))
    assert len(train) == 30 and len(test) == 9 and train.has_labels and test.has_labels
    blank = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "both.npz", x=blank, x_train=blank)
    with pytest.raises(UserError, match="both"):
        load_splits(data_cfg(name="npz", path=str(tmp_path / "both.npz"), size=8))


def test_streamed_training_split_stops_on_a_bad_file(tmp_path):
    """A streamed split is not decoded in advance; its bad file used to train as a black image, exit 0."""
    broken = _folder(tmp_path / "data", {"train": 20, "test": 5}, bad={"train": 1})
    common = ("simclr", "data.name=folder", f"data.path={tmp_path / 'data'}", "data.resident=false",
              "data.num_workers=0", "train.epochs=1", "train.knn_every=0", "method.proj_hidden_dim=32")
    with pytest.raises(UserError) as err:
        run_training(tiny_config(*common, out_dir=tmp_path), run_dir=tmp_path / "run", final_eval=False)
    assert broken[0] in str(err.value) and "\n" not in str(err.value)
    result = run_training(tiny_config(*common, "data.skip_bad_images=true", out_dir=tmp_path),
                          run_dir=tmp_path / "run2", final_eval=False)
    assert result.epochs == 1


def test_a_file_that_breaks_after_loading_stops_the_clean_pass(tmp_path):
    from kith.data.loader import iter_images

    _folder(tmp_path / "data", {"train": 6, "test": 3})
    _, test = load_splits(data_cfg(name="folder", path=str(tmp_path / "data"), size=16, num_workers=0))
    with open(test.files[1], "wb") as fh:  # truncated after the split was checked
        fh.write(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UserError, match=re.escape(test.files[1])):
        list(iter_images(test, 4, torch.device("cpu"), 16))
