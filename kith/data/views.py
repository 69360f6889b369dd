"""The views of one training step: a method's two global views (`method.views`) and its extra,
student-only crops (`method.extra_views`, multi-crop), the extra crops grouped by crop size so that a
method runs one encoder forward per distinct size, never one per crop.

`ViewPlan.of` says which recipe each crop uses and in which tensor it lands; `make_views` makes them:

- the global views exactly as before multi-crop (one `BatchAugment` call each, drawn first), so a run
  without extra views is unchanged, and adding extra views leaves the global views' draws alone;
- then one tensor ``(n * B, 3, s, s)`` per distinct extra size s, crop-major (rows ``k * B + b``: crop k
  of image b), each run of consecutive crops with the same recipe made by one batched call: on
  resident images `BatchAugment(..., copies=n)` cuts all n crops of every image in one ``grid_sample``;
  on streamed batches the workers already cut every crop from the full image (`Batch.extra`) and only
  the photometric part runs here, on the run's crops concatenated.

A fixed config gives a fixed set of shapes, so a compiled step compiles once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kith.data.loader import Batch, augment_views

__all__ = ["CropGroup", "ViewPlan", "make_views"]


@dataclass(frozen=True)
class CropGroup:
    """The extra crops of one size: their recipe names and their positions in `method.extra_views`."""

    size: int
    names: tuple[str, ...]
    positions: tuple[int, ...]

    def runs(self) -> list[tuple[str, int]]:
        """`(recipe, count)` for each run of consecutive crops with the same recipe: one batched call each."""
        out: list[tuple[str, int]] = []
        for name in self.names:
            if out and out[-1][0] == name:
                out[-1] = (name, out[-1][1] + 1)
            else:
                out.append((name, 1))
        return out


@dataclass(frozen=True)
class ViewPlan:
    """`views`: the global recipe names; `groups`: the extra crops by size, in order of first appearance."""

    views: tuple[str, ...]
    groups: tuple[CropGroup, ...] = ()

    @classmethod
    def of(cls, augment: Mapping[str, Any], views: Sequence[str], extra_views: Sequence[str] = (),
           size: int = 32) -> ViewPlan:
        """The plan for recipes `augment` (name → ViewConfig), a recipe's size being its own or `size`."""
        by_size: dict[int, list[tuple[str, int]]] = {}
        for pos, name in enumerate(extra_views):
            by_size.setdefault(augment[name].size or size, []).append((name, pos))
        groups = tuple(CropGroup(s, tuple(n for n, _ in crops), tuple(p for _, p in crops))
                       for s, crops in by_size.items())
        return cls(tuple(views), groups)

    @property
    def names(self) -> list[str]:
        """Every recipe the plan uses, once each."""
        return list(dict.fromkeys([*self.views, *(n for g in self.groups for n in g.names)]))


def make_views(batch: Batch, augments: Mapping[str, Any], plan: ViewPlan, generator: torch.Generator
               ) -> list[torch.Tensor]:
    """The step's normalised views: one ``(B, 3, S, S)`` tensor per global view, then one
    ``(n * B, 3, s, s)`` tensor per extra crop size (crop-major), from the `BatchAugment` of each
    recipe in `augments`."""
    out = augment_views(batch, augments, list(plan.views), generator)
    for group in plan.groups:
        parts, start = [], 0
        for name, n in group.runs():
            if batch.views is None:  # resident: cut here, every crop of the run in one call
                parts.append(augments[name](batch.images, generator, copies=n))
            else:  # streamed: the workers cut them; photometric part only
                crops = [batch.extra[p] for p in group.positions[start:start + n]]
                parts.append(augments[name](crops[0] if n == 1 else torch.cat(crops), generator, crop=False))
            start += n
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return out
