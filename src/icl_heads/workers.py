"""Worker processes that end with their parent, and signals that end a run cleanly (issue 18).

``kill -TERM`` to ``reproduce`` used to leave three training workers and the resource
tracker running under PID 1, and Ctrl-C waited for the models to finish (the pool's
``shutdown(wait=True)``). Here the parent turns SIGTERM into :class:`Terminated` (a
``KeyboardInterrupt``, so every ``finally`` runs and locks are released) and, on any
exception, :func:`process_pool` terminates its workers instead of waiting for them.
Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group): the parent
ends them, so they print no traceback of their own. Checkpoints are written atomically,
so a killed worker leaves its last checkpoint, from which the rerun resumes.
"""

from __future__ import annotations

import signal
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def install_term_handler() -> None:
    """Make SIGTERM unwind the main thread (``finally`` blocks run) instead of killing it outright."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which terminates them) and take SIGTERM's default: die at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def process_pool(n: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context pool of ``n`` processes that, when the block raises, is killed rather than awaited."""
    ex = ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_worker_init)
    try:
        yield ex
    except BaseException:
        stop_pool(ex)
        raise
    ex.shutdown(wait=True)


def stop_pool(ex: ProcessPoolExecutor, grace_s: float = 3.0) -> None:
    """Terminate every worker of ``ex`` (SIGTERM, then SIGKILL after ``grace_s``) and drop queued work."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # the pool keeps no public handle on them
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(grace_s)
    ex.shutdown(wait=False, cancel_futures=True)
