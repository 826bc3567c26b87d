"""icl-heads: how trained transformers use attention heads for in-context sparse linear regression."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Loaded", "load", "__version__"]


def __getattr__(name: str) -> Any:
    """``icl_heads.load`` and ``icl_heads.Loaded``, imported on first use: importing the package stays light
    (no torch), so ``icl-heads --version`` answers at once and a Ctrl-C at start-up is one line."""
    if name in ("Loaded", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'icl_heads' has no attribute {name!r}")
