"""The one rule that derives random generators from (seed, step, rank): every random stream of a
run is a pure function of those numbers, so any step can be replayed after a resume.

Streams (each a different integer mix, so they never coincide):

- ``augment``: the batched augmentations of global step ``step`` on ``rank``;
- ``partners``: SPCL's prototype-partner draws of ``step`` on ``rank`` (the augment mix, salted);
- ``epoch``: the data order of epoch ``step`` (the same on every rank: ``rank`` is not mixed in).

The constants are those kith has always used: changing one changes every run's numbers.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

Stream = Literal["augment", "partners", "epoch"]


def derive_seed(stream: Stream, seed: int, step: int, rank: int = 0) -> int:
    """The integer seed of `stream` at (seed, step, rank)."""
    if stream == "epoch":
        return seed * 100_003 + step
    mixed = (seed * 1_000_003 + step) * 1009 + rank
    if stream == "augment":
        return mixed
    if stream == "partners":
        return (mixed * 7919 + 17) % (2**63 - 1)
    raise ValueError(f"unknown random stream '{stream}'")


def generator(stream: Stream, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for `stream` at (seed, step, rank); see `derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(stream, seed, step, rank))


def reseed(gen: torch.Generator, stream: Stream, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """`gen` (on any device) reseeded for `stream` at (seed, step, rank): on a CPU generator the same
    draws as `generator(...)`; one generator reseeded every step is what a CUDA graph can replay (a
    replay draws from its registered generator's seed at the time of the replay)."""
    return gen.manual_seed(derive_seed(stream, seed, step, rank))


def view_seed(step_seed: int, position: int, view: int) -> int:
    """Seed of one sample's crop for one view: a pure function of the step's augmentation seed (the
    (seed, step, rank) rule of the resident path), the sample's position in the rank's batch and the
    view's index, so crops do not depend on which worker decodes the sample, nor on how many there are."""
    return int(np.random.SeedSequence([step_seed, position, view]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (model initialisation, queue contents)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global generators' states, for a checkpoint: tensors and plain types only, so the checkpoint
    loads with `torch.load(weights_only=True)` (numpy's state tuple holds an ndarray, which does not)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        # this process's own CUDA generator only: every device's (`get_rng_state_all`) would make a
        # checkpoint of an 8-GPU machine fail on one with fewer GPUs (rank r drives device r alone)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def plain_rng_state(state: dict) -> dict:
    """`state` with numpy's and Python's states in `rng_state`'s plain form (older kith pickled numpy's
    tuple)."""
    state = dict(state)
    if isinstance(state.get("numpy"), tuple):
        kind, key, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = {"kind": kind, "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if isinstance(state.get("python"), tuple):
        version, internal, gauss = state["python"]
        state["python"] = [version, list(internal), gauss]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved. The states are CPU tensors (a checkpoint is loaded on the CPU:
    `torch.set_rng_state` refuses a ByteTensor on a GPU). The CUDA state restores this process's
    current device's generator; older kith saved every device's list, of which this device's entry is
    taken (none when that machine had fewer devices)."""
    state = plain_rng_state(state)
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older kith: every device's state
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())
