"""Pictures of a run: training curves, a 2-D embedding of test features, nearest-neighbour retrieval.

Pure functions of arrays and tensors (matplotlib, Agg backend, no display needed); reading a run
folder for `kith plot` is `kith.tools.run_plots.plot_run`.

- `plot_curves(rows, path)`: one small panel per logged quantity of metrics.jsonl rows.
- `plot_embedding(features, labels, path, classes)`: t-SNE (or UMAP) of features, coloured by class.
- `plot_retrieval(query_images, neighbour_images, match, path)`: each query next to its
  nearest training images, framed green (same label) or red (different label).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn.functional as F

from kith.utils.errors import UserError
from kith.utils.files import atomic_write

DPI = 100
PANEL_SIZE = (3.2, 2.5)  # inches per curve panel -> 320 x 250 pixels
CURVE_COLUMNS = 4
EMBEDDING_SIZE = (7.2, 6.0)  # inches -> 720 x 600 pixels

# diagnostics shown after the loss terms and the kNN monitor, in this order
DIAGNOSTICS = ("lr", "tau", "z_std", "nn_acc", "purity")
_SKIP = {"kind", "step", "epoch"}
_TITLES = {"lr": "learning rate", "tau": "EMA τ", "z_std": "embedding std (collapse monitor)",
           "nn_acc": "nearest-neighbour label acc.", "purity": "neighbour purity", "loss": "loss"}


def _numeric_keys(rows: Sequence[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _smooth(y: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average (TensorBoard-style, bias-corrected) of a noisy curve."""
    out, avg = np.empty_like(y), 0.0
    for i, v in enumerate(y):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def curve_panels(rows: Sequence[dict]) -> list[tuple[str, list[tuple[str, Sequence[dict], str]]]]:
    """The panels `plot_curves` draws: `[(title, [(label, rows, key), ...]), ...]`.

    Order: `loss`, every other logged training term, the kNN monitor (all k in one
    panel, the final evaluation as stars), then lr, tau, z_std, nn_acc, purity when logged,
    then per-epoch metrics (`epoch_start` rows, e.g. clustering NMI) and anything else.
    """
    train = [r for r in rows if r.get("kind") == "train"]
    knn = [r for r in rows if r.get("kind") == "knn"]
    epoch_rows = [r for r in rows if r.get("kind") == "epoch_start"]
    train_keys = _numeric_keys(train)
    panels: list[tuple[str, list]] = []
    if "loss" in train_keys:
        panels.append(("loss", [("loss", train, "loss")]))
    terms = [k for k in train_keys if k != "loss" and k not in DIAGNOSTICS]
    terms.sort(key=lambda k: (0 if "loss" in k else 1, k))
    panels += [(k, [(k, train, k)]) for k in terms]
    final = [r for r in rows if r.get("kind") == "final"]
    knn_keys = sorted({k for k in _numeric_keys(knn) + _numeric_keys(final) if k.startswith("knn_top1@")},
                      key=lambda k: int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0)
    if knn_keys:
        title = f"kNN@{knn_keys[0].split('@')[1]} top-1 (%)" if len(knn_keys) == 1 else "kNN top-1 (%)"
        lines = [(k.replace("knn_top1@", "k="), knn, k) for k in knn_keys if any(k in r for r in knn)]
        lines += [(k.replace("knn_top1@", "final k="), final, k)
                  for k in knn_keys if any(k in r for r in final)]
        panels.append((title, lines))
    panels += [(_TITLES.get(k, k), [(k, train, k)]) for k in DIAGNOSTICS if k in train_keys]
    panels += _grouped_panels(epoch_rows)
    return panels


def _grouped_panels(rows: Sequence[dict]) -> list[tuple[str, list]]:
    """One panel per key, except that keys differing only in a `k<number>/` part (SPCL's
    `cluster/k100/nmi`, `cluster/k200/nmi`, ...) share a panel with one line per number."""
    groups: dict[str, list] = {}
    for key in _numeric_keys(rows):
        m = re.match(r"^(.*?)k(\d+)/(.+)$", key)
        title, label = (f"{m.group(1)}{m.group(3)}", f"k={m.group(2)}") if m else (key, key)
        groups.setdefault(title, []).append((label, rows, key))
    return list(groups.items())


def curves_figure_pixels(num_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of `plot_curves` for `num_panels` panels (4 per row)."""
    cols = max(1, min(CURVE_COLUMNS, num_panels))
    rows = max(1, math.ceil(num_panels / cols))
    return round(PANEL_SIZE[0] * cols * DPI), round(PANEL_SIZE[1] * rows * DPI)


def plot_curves(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """One small panel per quantity of metrics.jsonl `rows` (see `curve_panels`), against the step.

    Noisy training curves (more than 50 points) are drawn faintly with an exponential
    moving average on top. Size: `curves_figure_pixels(len(curve_panels(rows)))`.
    """
    panels = curve_panels(rows)
    if not panels:
        raise UserError("no training metrics to plot (metrics.jsonl has no train or knn rows)")
    cols = max(1, min(CURVE_COLUMNS, len(panels)))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * nrows), dpi=DPI,
                             squeeze=False)
    for ax, (panel_title, lines) in zip(axes.flat, panels):
        monitor = sum(1 for label, _, _ in lines if not label.startswith("final"))
        for i, (label, source, key) in enumerate(lines):
            x, y = _series(source, key)
            if len(x) == 0:
                continue
            color = f"C{i}"
            if label.startswith("final"):
                same = next((j for j, (lb, _, _) in enumerate(lines[:monitor])
                             if lb == label[len("final "):]), None)
                ax.plot(x, y, linestyle="none", marker="*", markersize=9, label=label,
                        color=f"C{same}" if same is not None else f"C{i}")
            elif len(lines) > 1 or len(x) <= 2:
                ax.plot(x, y, marker="o", markersize=3, color=color, label=label, linewidth=1.2)
            elif len(x) > 50:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, _smooth(y), color=color, linewidth=1.4)
            else:
                ax.plot(x, y, color=color, linewidth=1.4)
        if len(lines) > 1:
            ax.legend(fontsize=7, frameon=False)
        if panel_title == _TITLES["lr"]:
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_title(panel_title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at DPI (creating the folder; atomically: `kith.utils.files`) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=DPI, format="png"))
    finally:
        plt.close(fig)
    return path


def _to_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_points` of `n` items, drawn with a seeded generator."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def embed_2d(features, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) embedding of (N, F) features: L2-normalised (cosine geometry, as kNN), PCA to 50 dims,
    then t-SNE or UMAP."""
    x = F.normalize(torch.as_tensor(_to_numpy(features), dtype=torch.float32), dim=1).numpy()
    n = len(x)
    if n < 3:
        raise UserError(f"an embedding plot needs at least 3 points, got {n}")
    if x.shape[1] > 50 and n > 50:
        from sklearn.decomposition import PCA

        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("--umap needs umap-learn: pip install umap-learn (the viz extra), or use the "
                            "default t-SNE") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, metric="euclidean")
        return reducer.fit_transform(x)
    if method != "tsne":
        raise UserError(f"unknown embedding method '{method}'; tsne or umap")
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def plot_embedding(features, labels, path: str | Path, classes: Sequence[str] | None = None,
                   method: str = "tsne", max_points: int = 2000, seed: int = 0,
                   title: str | None = None) -> Path:
    """2-D t-SNE (default) or UMAP embedding of (N, F) `features`, points coloured by `labels` (N,).

    At most `max_points` points (a seeded random subset) are embedded. Label -1 is drawn
    grey ("unlabelled"). With up to 20 classes a legend names them (`classes[i]`, else the
    index). Size: `EMBEDDING_SIZE` at `DPI` (720 x 600 pixels).
    """
    features, labels = _to_numpy(features), _to_numpy(labels).astype(int).reshape(-1)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} features but {len(labels)} labels")
    idx = subsample(len(features), max_points, seed)
    features, labels = features[idx], labels[idx]
    xy = embed_2d(features, method, seed)
    fig = plt.figure(figsize=EMBEDDING_SIZE, dpi=DPI)
    ax = fig.add_axes([0.04, 0.05, 0.70, 0.87])
    present = sorted(set(labels.tolist()) - {-1})
    cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20" if len(present) <= 20 else "turbo")
    size = 10 if len(labels) > 500 else 24
    if (labels < 0).any():
        m = labels < 0
        ax.scatter(xy[m, 0], xy[m, 1], s=size, c="0.7", linewidths=0, label="unlabelled")
    for i, c in enumerate(present):
        m = labels == c
        color = cmap(i % cmap.N) if len(present) <= 20 else cmap(i / max(len(present) - 1, 1))
        name = classes[c] if classes is not None and 0 <= c < len(classes) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=color, linewidths=0, alpha=0.85, label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    name = "UMAP" if method == "umap" else "t-SNE"
    ax.set_title(title or f"{name} of {len(labels)} test features, coloured by class", fontsize=10)
    if len(present) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, markerscale=1.6)
    return save_figure(fig, path)


# ---- retrieval grid -------------------------------------------------------------------------
RETRIEVAL_TILE = 64  # pixels each image is drawn at
RETRIEVAL_BORDER = 4  # coloured frame
RETRIEVAL_PAD = 2  # white space around each framed tile
RETRIEVAL_GAP = 12  # extra space between the query column and the neighbours
RETRIEVAL_HEADER = 24
MATCH_COLOURS = {True: (0.13, 0.65, 0.24), False: (0.86, 0.13, 0.13), None: (0.35, 0.35, 0.35)}


def retrieval_figure_pixels(num_queries: int, num_neighbours: int,
                            tile: int = RETRIEVAL_TILE) -> tuple[int, int]:
    """(width, height) in pixels of `plot_retrieval`: cells of tile + 2·border + 2·pad pixels,
    (1 + neighbours) columns plus a gap after the query column, a header above the rows."""
    cell = tile + 2 * RETRIEVAL_BORDER + 2 * RETRIEVAL_PAD
    return (num_neighbours + 1) * cell + RETRIEVAL_GAP, RETRIEVAL_HEADER + num_queries * cell


def _as_float_images(images) -> torch.Tensor:
    """uint8 or float [0,1] images (..., 3, H, W) (or (..., H, W, 3)) -> float32 (..., 3, H, W) in [0, 1]."""
    x = torch.as_tensor(_to_numpy(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.shape[-1] in (1, 3) and x.shape[-3] not in (1, 3):
        x = x.movedim(-1, -3)
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x.clamp(0, 1)


def _resize(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, tile, tile): nearest for integer upscaling (crisp pixels), else bilinear."""
    h = x.shape[-1]
    if h == tile:
        return x
    if tile % h == 0:
        return F.interpolate(x, size=(tile, tile), mode="nearest")
    return F.interpolate(x, size=(tile, tile), mode="bilinear", antialias=tile < h, align_corners=False
                         ).clamp(0, 1)


def plot_retrieval(query_images, neighbour_images, match, path: str | Path, tile: int = RETRIEVAL_TILE,
                   title: str | None = None) -> Path:
    """A grid: each row a query image (grey frame) and its nearest training images, left to right.

    query_images: (Q, 3, H, W); neighbour_images: (Q, K, 3, H, W); uint8 or float in [0, 1]
    (un-normalised). match: (Q, K) bools, True = same label as the query (green frame),
    False = different (red frame); None when labels are unknown (grey frames).
    Size: `retrieval_figure_pixels(Q, K, tile)`.
    """
    queries = _as_float_images(query_images)
    neighbours = _as_float_images(neighbour_images)
    if queries.dim() != 4 or neighbours.dim() != 5 or len(queries) != len(neighbours):
        raise ValueError(f"expected query (Q, 3, H, W) and neighbour (Q, K, 3, H, W) images, got "
                         f"{tuple(queries.shape)} and {tuple(neighbours.shape)}")
    q, k = neighbours.shape[:2]
    match_arr = None if match is None else _to_numpy(match).astype(bool).reshape(q, k)
    queries = _resize(queries, tile)
    neighbours = _resize(neighbours.flatten(0, 1), tile).view(q, k, 3, tile, tile)
    width, height = retrieval_figure_pixels(q, k, tile)
    cell = tile + 2 * RETRIEVAL_BORDER + 2 * RETRIEVAL_PAD
    canvas = np.ones((height, width, 3), dtype=np.float32)

    def put(img: torch.Tensor, row: int, col: int, colour) -> None:
        top = RETRIEVAL_HEADER + row * cell + RETRIEVAL_PAD
        left = col * cell + (RETRIEVAL_GAP if col > 0 else 0) + RETRIEVAL_PAD
        span = tile + 2 * RETRIEVAL_BORDER
        canvas[top:top + span, left:left + span] = colour
        b = RETRIEVAL_BORDER
        canvas[top + b:top + b + tile, left + b:left + b + tile] = img.permute(1, 2, 0).numpy()

    for i in range(q):
        put(queries[i], i, 0, MATCH_COLOURS[None])
        for j in range(k):
            put(neighbours[i, j], i, j + 1,
                MATCH_COLOURS[None if match_arr is None else bool(match_arr[i, j])])
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    y_text = RETRIEVAL_HEADER / 2
    ax.text(cell / 2, y_text, "query", ha="center", va="center", fontsize=8)
    caption = title or (f"{k} nearest training images (cosine, backbone features)"
                        + ("" if match_arr is None else ": green = same class, red = different"))
    ax.text(cell + RETRIEVAL_GAP + k * cell / 2, y_text, caption, ha="center", va="center", fontsize=8)
    return save_figure(fig, path)


# ---- a run folder ---------------------------------------------------------------------------
