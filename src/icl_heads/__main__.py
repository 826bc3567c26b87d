"""``python -m icl_heads``: the ``icl-heads`` command line.

:func:`run` is also the console script's entry point. It imports the command line (torch with it, a second
or more) with SIGINT held: a Ctrl-C that lands inside an import can abort the process from C++ (torch's
pybind11: "terminate called after throwing ... KeyboardInterrupt"), leave a half-initialised module behind
or be swallowed by a library, all seen. So the interrupt is noted, the import finishes, and the command
then ends with one line, exit 130, before doing anything. Once the command has ended, SIGINT is ignored:
one landing in the interpreter's teardown printed a torch finaliser's traceback after the command's line.
"""

from __future__ import annotations

import signal
import sys
import threading


def run() -> None:
    pending: list[int] = []
    held = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum)) if held else None
    try:
        from .cli import main
    except KeyboardInterrupt:  # where the signal could not be held (not the main thread)
        pending.append(signal.SIGINT)
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if pending:
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    try:
        main()
    finally:  # the command has said its last line: a Ctrl-C during the interpreter's teardown is not news
        if held:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
