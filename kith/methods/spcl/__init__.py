"""SPCL: the method, its prototype state and the spherical k-means that refreshes the prototypes.
May import: what any method may (kith.utils, kith.losses, kith.memory, kith.nn, kith.methods.base)."""

from kith.methods.spcl.method import SPCL, SPCLConfig

__all__ = ["SPCL", "SPCLConfig"]
