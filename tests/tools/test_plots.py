"""The pure plotting functions: panel layout, figure sizes in pixels, retrieval frame colours."""

from __future__ import annotations

import numpy as np
import torch

from kith.tools.plots import (
    DPI,
    EMBEDDING_SIZE,
    curve_panels,
    curves_figure_pixels,
    plot_curves,
    plot_embedding,
    plot_retrieval,
    retrieval_figure_pixels,
)
from tests.helpers import clusters, png_size


# ---- plots ------------------------------------------------------------------------------
def test_plot_curves_panels_and_size(tmp_path):
    rows = [{"kind": "start", "step": 0, "method": "x"}]
    for step in range(1, 61):
        rows.append({"kind": "train", "step": step, "epoch": 1 + step // 20, "loss": 5.0 / step,
                     "loss_inst": 1.0, "lr": 0.1, "tau": 0.99, "z_std": 0.06, "nn_acc": None})
        if step % 20 == 0:
            rows.append({"kind": "knn", "step": step, "knn_top1@20": 10.0 + step, "knn_top1@200": 9.0 + step})
    rows.append({"kind": "epoch_start", "step": 20, "epoch": 1, "nmi": 0.3})
    titles = [t for t, _ in curve_panels(rows)]
    assert titles[:3] == ["loss", "loss_inst", "kNN top-1 (%)"]
    assert len(titles) == 7  # loss, loss_inst, kNN, lr, tau, z_std, nmi (nn_acc only None: left out)
    path = plot_curves(rows, tmp_path / "curves.png")
    assert path.stat().st_size > 0
    assert png_size(path) == curves_figure_pixels(7) == (1280, 500)

def test_plot_embedding_size(tmp_path):
    x, y = clusters(15, 3, 20, 0.5, seed=6)
    y[0] = -1  # unlabelled point drawn grey
    path = plot_embedding(x, y, tmp_path / "emb.png", classes=["a", "b", "c"])
    assert path.stat().st_size > 0
    assert png_size(path) == (round(EMBEDDING_SIZE[0] * DPI), round(EMBEDDING_SIZE[1] * DPI))

def test_plot_retrieval_size_and_frame_colours(tmp_path):
    gen = torch.Generator().manual_seed(7)
    queries = torch.randint(0, 256, (3, 3, 16, 16), generator=gen, dtype=torch.uint8)
    neighbours = torch.randint(0, 256, (3, 4, 3, 16, 16), generator=gen, dtype=torch.uint8)
    match = np.array([[True, False, True, True]] * 3)
    path = plot_retrieval(queries, neighbours, match, tmp_path / "ret.png")
    assert path.stat().st_size > 0
    width, height = retrieval_figure_pixels(3, 4)
    assert (width, height) == (5 * (64 + 8 + 4) + 12, 24 + 3 * (64 + 8 + 4))
    assert png_size(path) == (width, height)
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    row_top = 24 + 2 + 1  # header, pad, then inside the 4-pixel frame
    green_x = (64 + 8 + 4) + 12 + 2 + 1  # first neighbour's frame
    red_x = 2 * (64 + 8 + 4) + 12 + 2 + 1  # second neighbour's frame
    assert img[row_top, green_x, 1] > 0.5 and img[row_top, green_x, 0] < 0.3
    assert img[row_top, red_x, 0] > 0.7 and img[row_top, red_x, 1] < 0.3
