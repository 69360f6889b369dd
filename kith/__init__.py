"""kith: self-supervised visual representation learning from an image's kin."""

from kith.api import evaluate, load_backbone, pretrain
from kith.errors import UserError
from kith.methods import METHODS

__version__ = "0.1.0"
__all__ = ["pretrain", "evaluate", "load_backbone", "METHODS", "UserError", "__version__"]
