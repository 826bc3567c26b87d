"""``python -m icl_heads``: the ``icl-heads`` command line.

:func:`run` is also the console script's entry point. It imports the command line (torch with it, a second
or more) inside its own ``try``, so a Ctrl-C during start-up is one line, not a traceback of the imports.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
