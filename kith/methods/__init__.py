"""Registered methods. Importing this package registers every built-in method."""

from __future__ import annotations

from kith.errors import UserError, did_you_mean
from kith.methods.base import METHODS, Method, MethodConfig, MomentumConfig, register
from kith.methods import byol, simclr  # noqa: F401  (registration side effect)


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; `kith methods` lists them")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodConfig", "MomentumConfig", "register", "get_method_class"]
