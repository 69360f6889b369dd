"""MLP heads: every projector and predictor in kith is built by `mlp`."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False,
        bn: bool = True) -> nn.Sequential:
    """`Linear -> BN -> ReLU` repeated `layers - 1` times, then `Linear` (+ `BN` when `last_bn`).

    `bn=False` drops the hidden BatchNorms (ReSSL's projector). With `layers=3`,
    `mlp(512, 2048, 256, 3)` is 512-2048-2048-256.
    """
    if layers < 1:
        raise ValueError("an mlp needs at least one layer")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(dim, hidden_dim, bias=not bn))
        if bn:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*modules)
