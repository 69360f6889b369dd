"""Issue 21: property-based fuzzing of the parsers a user's input reaches (the file-list reader, the
label check, the npz reader, the config override parser, checkpoint loading): each returns a valid
result or raises a one-line `UserError`, never another exception, and writes nothing outside
`tmp_path`. Small example counts keep the suite's time (hypothesis is in the dev extra)."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest

# hypothesis caches its unicode tables under the working directory unless told otherwise
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "kith-hypothesis"))
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kith.config import build_config  # noqa: E402
from kith.data.arrays import load_npz_split  # noqa: E402
from kith.data.images import as_labels  # noqa: E402
from kith.data.sources import read_file_list  # noqa: E402
from kith.runs.checkpoint import load_checkpoint  # noqa: E402
from kith.utils.boundary import as_user_error  # noqa: E402
from kith.utils.errors import UserError  # noqa: E402

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _user_error_or_value(fn, *args):
    """fn's value, or None for a one-line UserError; any other exception fails the property."""
    try:
        return fn(*args)
    except UserError as exc:
        assert "\n" not in str(exc)
        return None


@FAST
@given(st.binary(max_size=300))
def test_a_file_list_of_any_bytes(tmp_path, data):
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    before = set(os.listdir(tmp_path))
    result = _user_error_or_value(read_file_list, path)
    if result is not None:
        files, labels, classes = result
        assert len(files) == len(labels) and all(-1 <= y < max(len(classes), 1) or y == -1 for y in labels)
    assert set(os.listdir(tmp_path)) == before


@FAST
@given(st.lists(st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True)), max_size=8),
       st.integers(0, 8))
def test_labels_of_any_numbers(values, n):
    labels = _user_error_or_value(as_labels, np.array(values) if values else None, n)
    if labels is not None:
        assert labels.shape == (n,) and bool(((labels >= -1)).all())


@FAST
@given(st.binary(max_size=400))
def test_an_npz_of_any_bytes(tmp_path, data):
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04" + data if data[:1] == b"\0" else data)
    _user_error_or_value(load_npz_split, str(path), "train")


@FAST
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=3))
def test_config_overrides_of_any_text(tmp_path, items):
    items = [f"train.{item}" for item in items] + [f"out_dir={tmp_path}"]
    try:
        _user_error_or_value(build_config, items)
    except Exception as exc:  # noqa: BLE001  (the boundary's translation counts as a one-line error)
        assert as_user_error(exc) is not None, repr(exc)
    assert not (tmp_path / "runs").exists()


@FAST
@given(st.binary(max_size=400))
def test_a_checkpoint_of_any_bytes(tmp_path, data):
    import torch

    buffer = io.BytesIO()
    torch.save({"method": {}, "epoch": 0}, buffer)
    good = buffer.getvalue()
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(good[:len(data)] + data if data[:1] == b"\0" else data)
    _user_error_or_value(load_checkpoint, tmp_path, "cpu")
