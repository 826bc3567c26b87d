"""icl-heads: how trained transformers use attention heads for in-context sparse linear regression."""

__version__ = "0.1.0"
