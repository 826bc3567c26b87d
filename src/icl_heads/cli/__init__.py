"""The ``icl-heads`` command line (:mod:`.app`: the commands; :mod:`.errors`: exit codes and failures).

Every command fails fast on bad input with one line ``error: <field>: <why>`` and a non-zero exit, never
a traceback (:data:`~.errors.EXIT_CODES`). The work modules are imported inside the commands so that
``--help`` and a bad argument answer at once.
"""

from __future__ import annotations

from typing import Optional

from .app import app
from .errors import handle

__all__ = ["app", "main"]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point (``icl-heads``, ``python -m icl_heads``): run :data:`app` under :func:`~.errors.handle`
    (every expected failure one line on stderr; Ctrl-C and SIGTERM one line saying what a rerun does)."""
    handle(app, argv)
