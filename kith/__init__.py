"""kith: self-supervised visual representation learning from an image's kin."""

# The submodule kith.evaluate shares its name with the API function kith.evaluate(): load the
# module first, so that its first import does not later rebind `kith.evaluate` to the module.
import kith.evaluate  # noqa: F401  isort: skip
from kith.api import evaluate, load_backbone, pretrain
from kith.errors import UserError
from kith.methods import METHODS

__version__ = "0.1.0"
__all__ = ["METHODS", "UserError", "__version__", "evaluate", "load_backbone", "pretrain"]
