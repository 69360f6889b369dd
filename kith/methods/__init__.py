"""Registered methods. Importing this package registers every built-in method."""

from __future__ import annotations

from kith.errors import UserError, did_you_mean
from kith.methods.base import METHODS, Method, MethodConfig, MomentumConfig, register


def _import_all() -> None:
    """Import every module in this package so each method registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'{did_you_mean(name, METHODS)}; `kith methods` lists them")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodConfig", "MomentumConfig", "get_method_class", "register"]
