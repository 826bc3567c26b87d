"""icl-heads: how trained transformers use attention heads for in-context sparse linear regression."""

from .api import Loaded, load

__version__ = "0.1.0"
__all__ = ["Loaded", "load", "__version__"]
