"""Issue 21, bounded memory: config keys whose size drives an allocation are estimated and checked against
the training device at setup, one line with the estimate; no preset is refused."""

from __future__ import annotations

import pytest
import torch

import kith.utils.capacity as capacity
from kith.config import available_presets, build_config
from kith.train.capacity import tiny_weights, training_needs
from kith.train.setup import setup
from kith.utils.capacity import Need, check_fits, classifier_need, format_bytes, refusal
from kith.utils.errors import UserError
from tests.helpers import tiny_config

CPU = torch.device("cpu")
GB = 10**9


def _refused(overrides, capacity=24 * GB, num_images=50_000, resident=False):
    cfg = build_config(overrides)
    error = refusal(training_needs(cfg, num_images, resident), capacity, "this machine")
    return None if error is None else str(error)


def test_a_huge_queue_is_one_line_with_its_estimate():
    message = _refused(["method=nnclr", "method.queue_size=10000000000", "method.proj_output_dim=128"])
    assert message.startswith("method.queue_size=10000000000 needs 5.3 TB for the queue (128 x 4 bytes each")
    assert "this machine has 24 GB: lower method.queue_size" in message and "\n" not in message
    assert "method.bank_size=" in _refused(["method=msf", "method.bank_size=1000000000000"])


@pytest.mark.parametrize("overrides,key", [
    (["backbone.name=tiny", "backbone.width=1000000"], "backbone.width=1000000"),
    (["data.size=100000"], "data.size=100000"),
])
def test_width_and_image_size_are_estimated(overrides, key):
    assert _refused(overrides).startswith(f"{key} needs ")


def test_the_resident_split_counts_only_when_resident():
    over = ["data.size=512", "train.batch_size=8"]  # 50000 x 3 x 512 x 512 bytes = 39 GB resident
    assert _refused(over) is None
    message = _refused(over, resident=True)
    assert "data.size=512 needs 39 GB for the resident images (50000 x 3 x 512 x 512 bytes)" in message
    assert "set data.resident=false" in message


def test_tiny_weights_count_the_built_net():
    from kith.nn.backbones import TinyConvNet

    assert tiny_weights(16) == sum(p.numel() for p in TinyConvNet(16).parameters())


def test_the_refusal_is_pure_and_names_the_largest_need():
    needs = [Need("a", 1, 6 * GB, "x"), Need("b", 2, 5 * GB, "y")]
    assert refusal(needs, 12 * GB, "here") is None and refusal(needs, None, "here") is None
    assert str(refusal(needs, 10 * GB, "here")) == ("a=1 needs 6.0 GB for x (11 GB with the rest); here has "
                                                    "10 GB: lower a")
    assert format_bytes(5.12e12) == "5.1 TB" and format_bytes(24e9) == "24 GB"


@pytest.mark.parametrize("preset", available_presets())
def test_no_preset_is_refused_on_a_16_gb_device(preset):
    """Every preset at its own dataset's size, streamed (ImageNet) or resident (the small sets)."""
    images = 1_281_167 if preset.startswith("imagenet") else 105_000  # STL-10's train + unlabeled
    assert _refused([f"preset={preset}"], 16 * GB, images, resident=not preset.startswith("imagenet")) is None


def test_setup_refuses_before_allocating(monkeypatch):
    cfg = tiny_config("nnclr", "method.queue_size=10000000000")
    with pytest.raises(UserError, match="method.queue_size=10000000000 needs .* for the queue"):
        setup(cfg, CPU)
    monkeypatch.setattr(capacity, "host_memory_bytes", lambda: 10**8)  # a 100 MB machine
    with pytest.raises(UserError, match="needs .* for the resident images .*this machine has 100 MB"):
        setup(tiny_config("simclr", "data.size=1024", "train.batch_size=2"), CPU)  # ~180 MB resident


def test_a_classifier_over_too_many_classes_is_refused(monkeypatch):
    monkeypatch.setattr(capacity, "host_memory_bytes", lambda: GB)
    check_fits([classifier_need(2048, 1000)], CPU)
    with pytest.raises(UserError, match="num_classes=1000000 needs 25 GB .* number the classes 0..K-1"):
        check_fits([classifier_need(2048, 1_000_000)], CPU)
