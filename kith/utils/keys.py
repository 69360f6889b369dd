"""Config key metadata: each dataclass field of a config section carries its allowed range, its
ordering against a sibling and its resume policy next to its default, so that validation, resume and
the study tool all read one declaration instead of lists kept by hand in several modules.

    @dataclass
    class QueueConfig:
        queue_size: int = count(4096)                     # an int >= 1
        temperature: float = positive(0.2)                # > 0
        num_neighbours: int = count(5, at_most="queue_size")
        lr: float = positive(0.1, policy=RESUMABLE)       # a resume may change it

A field declared without metadata (a plain `x: int = 3`) gets the defaults: range >= 0, FIXED.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_META = "kith"  # the key of our entry in a dataclass field's metadata mapping


class Policy(enum.IntEnum):
    """What changing a key between two runs of one config means. Ordered: each level includes the
    ones below it (a key with no effect on the result may also change on resume)."""

    FIXED = 0  # fixes what a checkpoint holds or what its data order and random streams replay
    RESUMABLE = 1  # may change on resume: takes effect from there and is logged as a `resume` row
    NO_EFFECT = 2  # changes how a run is carried out (logging, device, workers), not what it computes


FIXED, RESUMABLE, NO_EFFECT = Policy.FIXED, Policy.RESUMABLE, Policy.NO_EFFECT


@dataclass(frozen=True)
class Range:
    """The interval a numeric value (or each item of a numeric list) must lie in; `high=None` is unbounded."""

    low: float = 0
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        """The interval as the range error message words it: `>= 0`, `> 0`, `in (0, 1]`."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


NON_NEGATIVE = Range()
POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)


@dataclass(frozen=True)
class KeyMeta:
    """What `key` records on a field. `at_most`: a sibling field this one must not exceed; `choices`: the
    values a string key may take (empty: any)."""

    range: Range = NON_NEGATIVE
    policy: Policy = FIXED
    at_most: str | None = None
    choices: tuple[str, ...] = ()


def key(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
        range: Range = NON_NEGATIVE, policy: Policy = FIXED, at_most: str | None = None,
        choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with `default` (or `factory`) and its metadata. A list or dict default is
    deep-copied for every instance, as a dataclass needs for a mutable default."""
    meta = {_META: KeyMeta(range, policy, at_most, tuple(choices))}
    if factory is None and isinstance(default, (list, dict)):
        factory = functools.partial(copy.deepcopy, default)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def count(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """An int (or list of ints) >= 1: sizes, dimensions, steps, k."""
    return key(default, range=AT_LEAST_1, **kwargs)


def positive(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A number > 0: learning rates, temperatures, scales."""
    return key(default, range=POSITIVE, **kwargs)


def fraction(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A number in [0, 1]: probabilities, EMA coefficients."""
    return key(default, range=UNIT, **kwargs)


@functools.lru_cache(maxsize=None)
def _field_metas(section: type) -> dict[str, KeyMeta]:
    return {f.name: f.metadata.get(_META, KeyMeta()) for f in dataclasses.fields(section)}


def has_key(section: Any, name: str) -> bool:
    """Whether `section` (a dataclass type) declares a field `name`."""
    return isinstance(section, type) and dataclasses.is_dataclass(section) and name in _field_metas(section)


def key_meta(section: Any, name: str) -> KeyMeta:
    """The metadata of field `name` of dataclass type `section`; the defaults for any other field or type."""
    return _field_metas(section).get(name, KeyMeta()) if has_key(section, name) else KeyMeta()


def leaf_policies(section: Any, prefix: str = "") -> Iterator[tuple[str, Policy]]:
    """`(dotted key, policy)` of every leaf field of a dataclass instance, recursing into fields that
    hold dataclass instances (a dict or list field is one leaf)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from leaf_policies(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", key_meta(type(section), f.name).policy
