"""`train.compile_mode=reduce-overhead` runs the step as CUDA graphs, whose replay writes its outputs
into the memory of the last replay's: the loss and metric tensors the loop keeps until the next log row
must be copies. A CPU stand-in for the CUDA graph overwrites every output of a step at the next call,
as a replay does; the logged means must still be those of the eager run."""

from __future__ import annotations

import torch

from kith.runs.metrics import read_metrics
from kith.train.loop import run_training
from tests.helpers import small_heads, tiny_config


class _ReplayedGraph:
    """Stands in for a compiled step under CUDA graphs: calls the model, and at the next call first
    overwrites the outputs it returned last time (in place, as a replay into static memory does)."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def __call__(self, *args, **kwargs):
        for t in self.outputs:
            t.detach().fill_(float("nan"))
        loss, metrics = self.model(*args, **kwargs)
        self.outputs = [loss, *(v for v in metrics.values() if torch.is_tensor(v))]
        return loss, metrics


def _train_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_the_losses_kept_between_log_rows_survive_the_next_graph_replay(tmp_path, monkeypatch):
    common = [*small_heads("byol"), "train.epochs=1", "train.knn_every=0", "train.log_every=1000"]
    eager = run_training(tiny_config("byol", *common, out_dir=tmp_path), run_dir=tmp_path / "eager",
                         final_eval=False)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: _ReplayedGraph(model))
    cfg = tiny_config("byol", *common, "train.compile=true", "train.compile_mode=reduce-overhead",
                      out_dir=tmp_path)
    graphed = run_training(cfg, run_dir=tmp_path / "graphed", final_eval=False)
    assert eager.epochs == graphed.epochs == 1
    want, got = _train_rows(tmp_path / "eager"), _train_rows(tmp_path / "graphed")
    assert len(want) == len(got) == 1  # one row: the mean of both steps, the first kept past a replay
    assert got[0]["loss"] == want[0]["loss"] and got[0]["z_std"] == want[0]["z_std"]
