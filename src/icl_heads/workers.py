"""Worker processes that end with their parent, and signals that end a run cleanly (issue 18).

``kill -TERM`` to ``reproduce`` used to leave three training workers and the resource
tracker running under PID 1, and Ctrl-C waited for the models to finish (the pool's
``shutdown(wait=True)``). Here the parent turns SIGTERM into :class:`Terminated` (a
``KeyboardInterrupt``, so every ``finally`` runs and locks are released) and, on any
exception, :func:`run_in_processes` terminates its workers instead of waiting for them.
Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group) and leave on
SIGTERM quietly: the parent ends them, so they print no traceback of their own. Checkpoints are written atomically,
so a killed worker leaves its last checkpoint, from which the rerun resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Sequence


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread like Ctrl-C's KeyboardInterrupt."""


class JobsSubmitted(Exception):
    """``--no-wait``: the jobs are submitted (``training.executors``); the command stops here and the
    CLI prints the job ids and the command that collects the results (the same one, without ``--no-wait``).
    Here, beside :class:`Terminated`, because the CLI's entry point catches it without importing torch."""

    def __init__(self, job_ids: Sequence[str], folder: str, jobs: Sequence[Any] = ()) -> None:
        super().__init__(f"submitted {len(job_ids)} jobs (logs in {folder})")
        self.job_ids, self.folder, self.jobs = list(job_ids), folder, list(jobs)


class JobsFailed(RuntimeError):
    """Some submitted jobs failed; the message (one line) names the first, its log and how to resubmit."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def install_term_handler() -> Any:
    """Make SIGTERM unwind the main thread (``finally`` blocks run) instead of killing it outright.

    Returns the previous handler (to restore when the CLI runs in-process, e.g. under pytest);
    ``None`` off the main thread, where Python cannot install signal handlers.
    """
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None


def restore_term_handler(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _exit_now(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which terminates them) and end on SIGTERM through ``SystemExit``,
    so their ``finally`` blocks run (the checkpoint folder's lock is released).

    tqdm's default lock is a multiprocessing lock per process (a worker shares it with no one);
    a worker killed while holding one leaves a "leaked semaphore" warning, so workers use a thread lock.
    """
    from tqdm import tqdm  # the progress bars' library, only in a worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_now)
    tqdm.set_lock(threading.RLock())


# glibc's mallopt parameters and the environment variables it reads at start (malloc(3), mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of handing it back to the OS; ``False`` where there is no glibc.

    Why: glibc serves blocks over 32 MB (the cap of its dynamic mmap threshold) by ``mmap`` and unmaps
    them on free, so every large activation of an analysis pass is page-faulted in afresh. Measured on
    the 2-core VM (one thread): allocating and filling a 63 MB tensor took 38 ms, 5 ms with this; one
    forward pass of the quick h = 4 model over 2000 prompts 543 ms, 380 ms with this, bitwise the same
    result (only where memory comes from changes). The cost: a process keeps its peak heap until it ends.
    Applies to this process (``mallopt``) and, through the environment, to the processes it spawns.
    Called by the CLI's entry point and the benchmarks, never on import.
    """
    import ctypes
    import ctypes.util

    os.environ.update(_KEEP_MEMORY_ENV)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _child(fn: Callable[..., Any], args: tuple[Any, ...], conn: Connection) -> None:
    """Worker body: run ``fn(*args)`` and send back ``(True, result)`` or ``(False, exception)``."""
    _worker_init()
    try:
        msg: tuple[bool, Any] = (True, fn(*args))
    except SystemExit as e:  # SIGTERM: the stack has unwound (locks released); skip the interpreter's
        os._exit(e.code if isinstance(e.code, int) else 1)  # teardown, seconds of CPU with torch loaded
    except Exception as e:  # re-raised in the parent, as a pool's future would
        msg = (False, e)
    try:
        conn.send(msg)
    except Exception as e:  # an unpicklable exception: its text still gets through
        conn.send((False, RuntimeError(f"{type(msg[1]).__name__}: {msg[1]}") if not msg[0] else e))
    conn.close()
    _leave(0 if msg[0] else 1)


def _leave(code: int) -> None:
    """End the worker without the interpreter's teardown: the result is sent and every file written atomically.

    Why: a worker otherwise runs atexit and torch's library finalizers, about 0.5 s of CPU per
    worker on the 2-core VM (measured: ``import torch, icl_heads.cli`` then exit, 1.5-1.6 s; with
    ``os._exit``, 1.0 s), while its parent waits for it; and a worker told to stop in that teardown
    printed a traceback from inside an atexit callback.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


def _context(fn: Callable[..., Any]) -> BaseContext:
    """Workers forked from a server that has imported ``fn``'s module (torch, scikit-learn, ... with it).

    Why: a spawned worker imports the package afresh, about 1.2 s of CPU per worker on the 2-core VM;
    forked from the server, a worker starts in 16 ms (measured: ``run_in_processes`` of a function of
    ``icl_heads.zoo.reproduce``, two calls at once, 32 ms once the server runs; its start costs 2 s,
    once per process). The main job starts one worker per (configuration, seed), the tests dozens.
    The server is a fresh interpreter that only imports (no torch threads or CUDA context exist yet),
    so forking it is safe; it ends with its parent. It is started once per process with the first
    call's module (a later call's other module is imported in its workers). Not ``"__main__"`` nor the
    CLI: Python 3.11's forkserver never passes the main path, and a worker re-runs ``-m icl_heads``
    (``icl_heads.__main__``) as its main module, which warns if the server has imported it. Where fork is
    missing, spawn.
    """
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([fn.__module__])
    return ctx


def run_in_processes(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], n_proc: int,
                     on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]``, at most ``n_proc`` worker processes at a time, results in order.

    Not a ``ProcessPoolExecutor``: its ``shutdown`` waits for running work (Ctrl-C took 28 s), its
    workers have no public handle to terminate, and a pool torn down mid-run leaves its queues'
    semaphores to a resource-tracker warning. Here each call is one daemon process with a pipe back;
    when anything raises (a worker's error, Ctrl-C, SIGTERM) every running worker is terminated.
    """
    ctx = _context(fn)
    todo, running, results = list(enumerate(calls)), {}, {}
    try:
        while todo or running:
            while todo and len(running) < n_proc:
                i, args = todo.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, tuple(args), send), daemon=True)
                proc.start()
                send.close()
                running[proc.sentinel] = (i, proc, recv)
            for sentinel in wait(list(running)):
                i, proc, recv = running.pop(sentinel)
                results[i] = _collect(proc, recv)
                if on_done is not None:
                    on_done(i, results[i])
    except BaseException:
        stop_processes([proc for _, proc, _ in running.values()])
        raise
    return [results[i] for i in range(len(calls))]


def _collect(proc: BaseProcess, recv: Connection) -> Any:
    """The result a finished worker sent, or its exception raised here."""
    try:
        ok, value = recv.recv() if recv.poll() else (False, None)
    except EOFError:
        ok, value = False, None
    recv.close()
    proc.join()
    if ok:
        return value
    raise value if isinstance(value, BaseException) else RuntimeError(f"worker exited with code {proc.exitcode}")


def stop_processes(procs: Sequence[BaseProcess], grace_s: float = 5.0) -> None:
    """Terminate ``procs`` (SIGTERM; SIGKILL for any still alive ``grace_s`` later) and reap them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
