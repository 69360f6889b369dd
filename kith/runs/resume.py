"""Resume policy: which config keys a resume may change, and the one-line refusal naming the ones
it may not."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kith.config import build_config, key_policy, keys_at_least
from kith.utils.errors import UserError
from kith.utils.keys import RESUMABLE

# keys a resume may change (declared RESUMABLE or NO_EFFECT on their config fields): they take effect and
# are logged as a `resume` row of metrics.jsonl. Every other key (method, backbone, data, batch size,
# seed, augmentations...) fixes what the checkpoint holds or what its data order and random streams
# replay, so changing it on resume is refused.
RESUMABLE_KEYS = keys_at_least(RESUMABLE)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: DictConfig, new: DictConfig) -> dict[str, dict]:
    """`{key: {"from": old value, "to": new value}}` for every leaf that differs."""
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    return {k: {"from": a.get(k), "to": b.get(k)}
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def resume_changes(saved_config: str, cfg: DictConfig) -> dict[str, dict]:
    """The keys `cfg` changes against the config the checkpoint was trained with (its YAML text);
    a one-line UserError naming them when any of them may not change on resume."""
    old = build_config([], base=OmegaConf.create(saved_config))
    changed = config_changes(old, cfg)
    refused = [k for k in changed if key_policy(cfg, k) < RESUMABLE]
    if refused:
        what = ", ".join(f"{k} ({changed[k]['from']} -> {changed[k]['to']})" for k in refused)
        raise UserError(f"cannot change {what} on resume: the checkpoint was trained with the old value "
                        "(model shapes, method, data, batch and random streams are fixed for a run); start a "
                        "new run with --run-dir, or resume without it (resume may change train.epochs, "
                        "train.lr, logging, eval and device keys)")
    return changed
