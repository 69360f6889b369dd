"""Issue 21, bounded memory: the pixel limit `data.max_pixels` (checked from each header before decoding)
in every decode path."""

from __future__ import annotations

import pytest
import torch

from kith.config import build_config
from kith.data.augment import ViewConfig
from kith.data.images import MAX_PIXELS, ImageData, decode_files, materialise
from kith.data.loader import UNDECODABLE, _Key, _StreamDataset, check_decoded, iter_images
from kith.data.sources import load_splits
from kith.utils.errors import UserError
from tests.helpers import framed_image, image_folder, stream_config

CPU = torch.device("cpu")
SMALL = 40 * 100  # framed_image's pixels
BIG_HW = (60, 100)  # 6000 pixels: over a limit of 5000, under the default


def _with_big(root):
    """An image folder (40 x 100 JPEGs) with one 60 x 100 JPEG added to class `a`; its path."""
    image_folder(root)
    big = root / "a" / "big.jpg"
    framed_image(big, *BIG_HW)
    return str(big)


def test_max_pixels_is_a_checked_key():
    assert build_config([]).data.max_pixels == MAX_PIXELS
    assert build_config(["data.max_pixels=5000"]).data.max_pixels == 5000
    with pytest.raises(UserError, match="data.max_pixels=0 is out of range"):
        build_config(["data.max_pixels=0"])


def test_the_start_check_names_the_key_and_the_value_that_reads_the_file(tmp_path):
    """The test split is screened at load: its oversized file stops the start naming data.max_pixels."""
    image_folder(tmp_path / "train")
    big = _with_big(tmp_path / "val")
    with pytest.raises(UserError) as err:
        load_splits(stream_config(tmp_path, "data.max_pixels=5000").data)
    message = str(err.value)
    assert "\n" not in message and big in message and "empty or corrupt" not in message
    assert "more pixels than data.max_pixels=5000" in message and "data.max_pixels=6000" in message
    train, test = load_splits(stream_config(tmp_path, "data.max_pixels=6000").data)
    assert big in test.files and train.max_pixels == test.max_pixels == 6000


def test_the_resident_decode_obeys_the_limit(tmp_path):
    big = _with_big(tmp_path)
    files = [big, str(tmp_path / "b" / "0.jpg")]
    with pytest.raises(UserError, match="data.max_pixels=6000"):
        decode_files(files, 16, skip_bad=False, progress=False, max_pixels=5000)
    images, keep = decode_files(files, 16, skip_bad=True, progress=False, max_pixels=5000)
    assert keep == [1] and images.shape == (1, 3, 16, 16)
    assert len(decode_files(files, 16, skip_bad=False, progress=False, max_pixels=6000)[1]) == 2
    # materialise reads the split's own limit (set from data.max_pixels by load_splits)
    data = ImageData(labels=torch.tensor([0, 1]), classes=["a", "b"], files=files, max_pixels=5000)
    assert materialise(data, 16, skip_bad=True, progress=False).skipped == [big]


@pytest.mark.parametrize("gpu", [False, True])
def test_the_streaming_workers_obey_the_limit(tmp_path, gpu):
    """A worker never decodes a file over the limit (the CPU crops, and the JPEG bytes of decode=gpu)."""
    big = _with_big(tmp_path)
    files = [str(tmp_path / "b" / "0.jpg"), big]
    dataset = _StreamDataset(files, torch.tensor([1, 0]), 16, [ViewConfig()], gpu=gpu, max_pixels=5000)
    _, labels, idx = dataset[_Key((0, 1), step_seed=3)]
    assert labels.tolist() == [1, UNDECODABLE]
    with pytest.raises(UserError, match="more pixels than data.max_pixels=5000"):
        check_decoded(labels, idx, files, skip_bad=False, max_pixels=5000)
    _, labels, _ = _StreamDataset(files, torch.tensor([1, 0]), 16, [ViewConfig()], gpu=gpu,
                                  max_pixels=6000)[_Key((0, 1), step_seed=3)]
    assert labels.tolist() == [1, 0]


def test_a_clean_pass_obeys_the_split_limit(tmp_path):
    big = _with_big(tmp_path)
    files = [str(tmp_path / "b" / "0.jpg"), big]
    data = ImageData(labels=torch.tensor([1, 0]), classes=["a", "b"], files=files, max_pixels=5000)
    with pytest.raises(UserError, match="data.max_pixels=6000"):
        list(iter_images(data, 2, CPU, 16, num_workers=0))
    assert SMALL <= data.subset(torch.tensor([0])).max_pixels == 5000  # subsets keep the limit


def test_decodes_in_flight_stay_within_the_pixel_budget(tmp_path, monkeypatch):
    """Eight threads, but a budget of two images' pixels: never more than two decodes at once; an image
    larger than the whole budget is decoded alone."""
    import threading
    import time

    import kith.data.budget as budget
    import kith.data.images as images

    image_folder(tmp_path, n=16)
    big = _with_big(tmp_path / "more")
    files = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    lock, running, seen = threading.Lock(), [], []
    real = images.decode_image

    def counted(path, size, max_pixels):
        with lock:
            running.append(path)
            seen.append(list(running))
        time.sleep(0.01)
        try:
            return real(path, size, max_pixels)
        finally:
            with lock:
                running.remove(path)

    monkeypatch.setattr(images, "decode_image", counted)
    monkeypatch.setattr(budget, "DECODE_BUDGET_PIXELS", 2 * SMALL)
    decoded, keep = decode_files(files, 16, skip_bad=False, progress=False)
    assert len(keep) == len(files) and len(seen) == len(files)
    assert max(len(now) for now in seen) <= 2
    assert all(now == [big] for now in seen if big in now)  # 6000 + 4000 pixels exceed the 8000
    seen.clear()
    monkeypatch.setattr(budget, "DECODE_BUDGET_PIXELS", 5000)  # below the big image: it waits for all of it
    assert len(decode_files(files, 16, skip_bad=False, progress=False)[1]) == len(files)
    assert max(len(now) for now in seen) == 1
