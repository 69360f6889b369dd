"""The end of a run: the final kNN of the trained and of the random-init backbone (every rank taking
its share), then `summary.json` (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from kith.data.spec import image_spec
from kith.evaluation.probe import KnnSettings, backbone_knn
from kith.nn.backbones import build_backbone
from kith.runs.files import atomic_write_text
from kith.runs.folder import skipped_counts
from kith.runs.metrics import MetricsLog
from kith.utils import distributed as dist


# ---- end of a run ---------------------------------------------------------------------------
def finish_run(run_dir: Path, cfg: DictConfig, backbone: torch.nn.Module, train_data, test_data,
               device: torch.device, log: MetricsLog, step: int, epochs_done: int, elapsed: float,
               images_per_s: float, final_eval: bool = True, extra: dict | None = None
               ) -> tuple[dict[int, float], dict[int, float]]:
    """The end of a run: the final kNN of the trained and of the random-init backbone (logged as the
    `final` metrics row; every rank embeds its share of the data, see `backbone_knn`), then
    summary.json, on rank 0. Returns `(knn, knn_random_init)`, empty when not evaluated: without
    `final_eval`, before `train.epochs` or without test labels (and on ranks other than 0).
    `extra`: more summary keys (the online linear accuracy).
    """
    knn: dict[int, float] = {}
    knn_random: dict[int, float] = {}
    if final_eval and epochs_done == cfg.train.epochs and test_data.has_labels:
        spec, settings = image_spec(cfg.data), KnnSettings.of(cfg.eval, progress=cfg.train.progress)

        def knn_of(net: torch.nn.Module) -> dict[int, float]:
            return backbone_knn(net, train_data, test_data, spec, device, settings)

        knn = knn_of(backbone)
        torch.manual_seed(cfg.seed)  # the same initial weights the trained backbone started from
        random_backbone, _ = build_backbone(cfg.backbone)
        knn_random = knn_of(random_backbone.to(device))
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
