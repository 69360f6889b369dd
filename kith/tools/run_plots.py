"""The pictures of a run folder (`kith plot`): reads its metrics, checkpoint and data and draws them
with the pure `kith.tools.plots` functions under `run_dir/plots/`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kith.data.images import decode_image, resize_uint8
from kith.data.sources import load_splits
from kith.data.spec import image_spec
from kith.evaluation.probe import extract_features
from kith.evaluation.readers import load_eval_target
from kith.memory import chunked_topk
from kith.runs.checkpoint import CHECKPOINT
from kith.runs.metrics import read_metrics
from kith.tools.plots import plot_curves, plot_embedding, plot_retrieval, subsample
from kith.utils.device import resolve_device
from kith.utils.errors import UserError
from kith.utils.files import check_no_symlink

PLOTS = ("curves", "embedding", "retrieval")


def _images_at(data, index: torch.Tensor, size: int) -> torch.Tensor:
    """Un-normalised uint8 images (N, 3, size, size) of `data` at `index`, as the network saw them (clean)."""
    if data.images is not None:
        return resize_uint8(data.images[index], size)
    arrays = [decode_image(data.files[i], size, data.max_pixels) for i in index.tolist()]
    arrays = [a if a is not None else np.zeros((size, size, 3), np.uint8) for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def plot_run(run_dir: str | Path, which: Sequence[str] = PLOTS, umap: bool = False, max_points: int = 2000,
             num_queries: int = 8, num_neighbours: int = 8, seed: int = 0, device: str = "auto",
             overrides: list[str] | None = None, progress: bool = False) -> list[Path]:
    """Write the chosen pictures of a run folder under `run_dir/plots/`; returns their paths.

    embedding: backbone features of at most `max_points` test images (seeded subset).
    retrieval: `num_queries` seeded random test images and, for each, the `num_neighbours`
    training images with the most cosine-similar backbone features.
    """
    run_dir = Path(run_dir)
    unknown = [w for w in which if w not in PLOTS]
    if unknown:
        raise UserError(f"unknown plot '{unknown[0]}'; choose from {', '.join(PLOTS)}")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"'{run_dir}' is not a kith run folder (no config.yaml or metrics.jsonl)")
    wants_model = bool({"embedding", "retrieval"} & set(which))
    if wants_model and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"'{run_dir}' has no checkpoint yet, so only its curves can be drawn: "
                        f"kith plot {run_dir} --only curves")
    out_dir = run_dir / "plots"
    check_no_symlink(out_dir, run_dir)  # the figures stay inside the run folder
    written = []
    title = None
    if "curves" in which:
        rows = read_metrics(run_dir)
        start = next((r for r in rows if r.get("kind") == "start"), {})
        if start:
            title = f"{start.get('method')} on {start.get('data')}"
        written.append(plot_curves(rows, out_dir / "curves.png", title))
    if not wants_model:
        return written

    backbone, cfg, _ = load_eval_target(run_dir, overrides)
    dev = resolve_device(device)
    backbone = backbone.to(dev)
    train, test = load_splits(cfg.data, cfg.seed)
    spec, bs = image_spec(cfg.data), cfg.eval.batch_size
    size = spec.size
    classes = list(test.classes) or list(train.classes) or None
    if "embedding" in which:
        idx = torch.as_tensor(subsample(len(test), max_points, seed))
        part = test.subset(idx)
        feats = extract_features(backbone, part, spec, dev, bs, progress, "test features")
        written.append(plot_embedding(feats.cpu(), part.labels, out_dir / "embedding.png", classes,
                                      method="umap" if umap else "tsne", max_points=max_points, seed=seed,
                                      title=f"{'UMAP' if umap else 't-SNE'} of {len(part)} test images "
                                            f"({cfg.method.name}, {cfg.data.name})"))
    if "retrieval" in which:
        gen = torch.Generator().manual_seed(seed)
        q_idx = torch.randperm(len(test), generator=gen)[:num_queries].sort().values
        queries = test.subset(q_idx)
        q_feats = extract_features(backbone, queries, spec, dev, bs)
        bank = extract_features(backbone, train, spec, dev, bs, progress, "train features")
        k = min(num_neighbours, len(train))
        _, nn_idx = chunked_topk(F.normalize(q_feats, dim=1), F.normalize(bank, dim=1), k)
        nn_idx = nn_idx.cpu()
        q_labels, n_labels = queries.labels, train.labels[nn_idx]
        match = None
        if (q_labels >= 0).all() and (n_labels >= 0).all():
            match = (n_labels == q_labels[:, None]).numpy()
        neighbours = _images_at(train, nn_idx.flatten(), size).view(len(q_idx), k, 3, size, size)
        written.append(plot_retrieval(_images_at(queries, torch.arange(len(queries)), size), neighbours,
                                      match, out_dir / "retrieval.png"))
    return written
