"""The methods, one module each (SPCL a package); importing this package registers every built-in one.
May import: utils, losses, memory, nn, data (the Batch type); never runs, training, evaluation, tools."""

from __future__ import annotations

import importlib
import pkgutil

from kith.methods.base import METHODS, Method, MethodConfig, MomentumConfig, register
from kith.utils.errors import UserError, did_you_mean


def _import_all() -> None:
    """Import every module in this package so each method registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "context"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; `kith methods` lists them")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodConfig", "MomentumConfig", "get_method_class", "register"]
