"""kith: self-supervised visual representation learning from an image's kin."""

from kith.api import evaluate, load_backbone, pretrain
from kith.methods import METHODS
from kith.utils.errors import UserError

__version__ = "0.1.0"
__all__ = ["METHODS", "UserError", "__version__", "evaluate", "load_backbone", "pretrain"]
