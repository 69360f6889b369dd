"""Kernels per step do not grow by accident: every method's counts on the tiny setup stay at or below
the ones recorded in benchmarks/results/kernel_count_tiny.json (`python -m benchmarks.kernel_count
benchmarks/results/kernel_count_tiny.json --tiny` records them again, for a change that adds kernels
on purpose or a new torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.kernel_count import count_method
from kith.methods import METHODS

RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kernel_count_tiny.json"


def _recorded() -> dict:
    return json.loads(RECORDED.read_text())


def _same_torch(recorded: dict) -> bool:
    return recorded["torch"].split(".")[:2] == torch.__version__.split(".")[:2]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_step_launches_no_more_kernels_than_recorded(method):
    recorded = _recorded()
    assert method in recorded["methods"], f"record {method}'s kernels: python -m benchmarks.kernel_count " \
                                          f"{RECORDED.relative_to(RECORDED.parents[2])} --tiny"
    if not _same_torch(recorded):
        pytest.skip(f"recorded with torch {recorded['torch']}: dispatch counts differ between versions")
    got, want = count_method(method), recorded["methods"][method]
    for phase in ("augment", "augment_gpu", "step"):
        assert got[phase] <= want[phase], (f"{method}'s {phase} dispatches {got[phase]} kernels, "
                                           f"{want[phase]} recorded; top now: {got['step_top']}")


def test_the_count_sees_an_added_kernel(monkeypatch):
    """The counter counts what the step runs: one more op per step shows as one more kernel."""
    from kith.methods.base import Method

    before = count_method("simclr")["step"]
    after_step = Method.after_step

    def one_more(self):
        after_step(self)
        torch.zeros(1).add_(1)

    monkeypatch.setattr(Method, "after_step", one_more)
    assert count_method("simclr")["step"] == before + 2  # zeros (a fill) and add_
