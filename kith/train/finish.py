"""The end of a run: the final kNN of the trained and of the random-init backbone (every rank taking
its share), then `summary.json` (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from kith.data.spec import image_spec
from kith.evaluation.baseline import baseline_key, random_init_knn
from kith.evaluation.probe import KnnSettings, backbone_knn
from kith.runs.files import atomic_write_text
from kith.runs.folder import skipped_counts
from kith.runs.metrics import MetricsLog
from kith.utils import distributed as dist


# ---- end of a run ---------------------------------------------------------------------------
def finish_run(run_dir: Path, cfg: DictConfig, backbone: torch.nn.Module, train_data, test_data,
               device: torch.device, log: MetricsLog, step: int, epochs_done: int, elapsed: float,
               images_per_s: float, final_eval: bool = True, extra: dict | None = None,
               last_knn: tuple[int, dict] | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """The end of a run: the final kNN of the trained and of the random-init backbone (logged as the
    `final` metrics row; every rank embeds its share of the data, see `backbone_knn`), then
    summary.json, on rank 0. Returns `(knn, knn_random_init)`, empty when not evaluated: without
    `final_eval`, before `train.epochs` or without test labels (and on ranks other than 0).
    `extra`: more summary keys (the online linear accuracy). `last_knn`: the kNN monitor's `(step, kNN)`;
    when it was measured at this `step` for every final k, the trained backbone is not embedded again.
    """
    knn: dict[int, float] = {}
    knn_random: dict[int, float] = {}
    if final_eval and epochs_done == cfg.train.epochs and test_data.has_labels:
        spec, settings = image_spec(cfg.data), KnnSettings.of(cfg.eval, progress=cfg.train.progress)

        def knn_of(net: torch.nn.Module) -> dict[int, float]:
            return backbone_knn(net, train_data, test_data, spec, device, settings)

        reusable = last_knn is not None and last_knn[0] == step and all(k in last_knn[1] for k in settings.ks)
        knn = {k: last_knn[1][k] for k in settings.ks} if reusable else knn_of(backbone)
        key = baseline_key(cfg, train_data, test_data, spec, settings.ks, settings.temperature, device)
        knn_random = random_init_knn(cfg, key, device, knn_of)
        log.write({"kind": "final", "step": step, "epoch": epochs_done,
                   **{f"knn_top1@{k}": v for k, v in knn.items()},
                   **{f"random_init_knn_top1@{k}": v for k, v in knn_random.items()}})
    if not dist.is_main_process():
        return {}, {}
    summary = {"method": cfg.method.name, "preset": cfg.preset, "data": cfg.data.name,
               "backbone": cfg.backbone.name,
               "epochs": epochs_done, "num_train": len(train_data), "num_test": len(test_data),
               "wall_time_s": elapsed, "images_per_s": images_per_s, "device": str(device),
               "world_size": dist.world_size(), "knn": knn, "knn_random_init": knn_random, **(extra or {})}
    if cfg.data.skip_bad_images:
        summary["skipped_images"] = skipped_counts(train_data, test_data)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2), inside=run_dir)
    return knn, knn_random


def finished_summary(run_dir: Path, epochs_done: int, ks) -> dict | None:
    """summary.json of a run that already finished `epochs_done` epochs with its final kNN at every k of
    `ks`, so that a
    resume of a finished run reports it instead of embedding the data twice more; None otherwise.
    Rank 0's answer holds on every rank (all return early, or none)."""
    summary = None
    if dist.is_main_process():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        if not (isinstance(summary, dict) and summary.get("epochs") == epochs_done
                and isinstance(summary.get("knn"), dict) and all(str(k) in summary["knn"] for k in ks)):
            summary = None
    return dist.gather_objects(summary)[0]  # rank 0's answer on every rank
