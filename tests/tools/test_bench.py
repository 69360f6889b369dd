"""`kith bench` with extra views sets the multi-crop step beside the 2-view step of the same config."""

from __future__ import annotations

import pytest

from kith.config import build_config
from kith.tools.bench import bench, summary_line
from tests.helpers import TINY, small_heads


def test_bench_reports_a_multicrop_step_beside_the_two_view_step():
    cfg = build_config([*TINY, "method.name=ressl", *small_heads("ressl"), "train.device=cpu",
                        "augment.small={size: 8, min_scale: 0.05, max_scale: 0.3}",
                        "method.extra_views=[small,small,small]"])
    report = bench(cfg, warmup=0, steps=1)
    multi = report["multicrop"]
    assert multi["extra_views"] == ["small"] * 3 and multi["crop_sizes"] == [16, 16, 8, 8, 8]
    assert multi["pixel_ratio"] == (2 * 16 * 16 + 3 * 8 * 8) / (2 * 16 * 16)
    # three more student crops cost more FLOPs per image than the 2-view step of the same config
    assert multi["flops_ratio"] > 1 and multi["two_view"]["flops_per_image"] < report["flops_per_image"]
    assert multi["step_time_ratio"] > 0 and "multi-crop step" in summary_line(report)
    assert "multicrop" not in bench(build_config([*TINY, "train.device=cpu"]), warmup=0, steps=1)


def test_host_syncs_are_counted_per_step_under_cuda_sync_debug_mode(monkeypatch):
    import warnings

    import torch

    from kith.tools import bench as bench_module

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)

    def step(i: int) -> None:  # a step with two reads back to the host on even steps
        if i % 2 == 0:
            for _ in range(2):
                warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)

    syncs = bench_module.host_syncs_per_step(step, 4, torch.device("cuda"), start=10)
    assert syncs == 1.0  # 4 synchronizing operations over 4 steps; other warnings do not count
    assert modes == ["warn", 0]  # the debug mode is left as it was found
    assert bench_module.host_syncs_per_step(step, 4, torch.device("cpu")) is None


@pytest.mark.parametrize("augment_rng, graphs", [("cpu", 1), ("device", 2)])
def test_bench_of_a_graphed_step_times_replays_only(augment_rng, graphs, monkeypatch):
    from kith.train import step as train_step
    from kith.train.graphed import ReplayCheck

    class Counted(ReplayCheck):
        calls: list[str] = []

        def eager(self, fn):
            self.calls.append("eager")
            return super().eager(fn)

        def replay(self, graph, fn):
            self.calls.append("replay")
            return super().replay(graph, fn)

    monkeypatch.setattr(train_step, "graph_backend", lambda device: Counted())
    Counted.calls = []
    report = bench(build_config([*TINY, "method.name=byol", *small_heads("byol"), "train.cuda_graph=true",
                                 f"data.augment_rng={augment_rng}"]), warmup=1, steps=3)
    assert report["cuda_graph"] and report["augment_in_graph"] == (augment_rng == "device")
    # warm-up raised to 3 eager steps and the capture per graph (the full step's is its own graph when
    # it augments inside: its inputs are the uint8 images); the 2 x 3 timed steps (model only, full) replay
    assert Counted.calls.count("eager") == 3 * graphs and Counted.calls[-6:] == ["replay"] * 6
