"""What a command's end looks like when it does not succeed: one line and an exit code.

:func:`handle` runs the command line so that every expected failure is one line on stderr, never a
traceback -- ``error: <field>: <why>`` for refused input (exit 2), ``error: <path>: <why>`` when the system
fails the command (exit 1) -- and Ctrl-C or SIGTERM (the handler from :mod:`icl_heads.workers`) unwinds
the command and ends in one line saying what a rerun does (exit 130 / 143).
"""

from __future__ import annotations

import errno
import shlex
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

import click

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..workers import (JobsFailed, JobsSubmitted, Terminated, install_term_handler, keep_freed_memory,
                       restore_term_handler)

EXIT_CODES = """exit codes: 0 done; 2 refused (bad input, a damaged checkpoint, an unusable --out, a diverged
run), one line 'error: <field>: <why>'; 1 the system failed the command (disk full, no permission),
one line 'error: <path>: <why>'; 130 Ctrl-C, 143 SIGTERM, one line saying what a rerun does."""


def handle(app: click.Group, argv: Optional[list[str]] = None) -> None:
    """Run ``app``, turning every expected failure into one line on stderr (exit codes: :data:`EXIT_CODES`).

    Ctrl-C and SIGTERM unwind the command (locks released, workers terminated: ``icl_heads.workers``)
    and end in one line saying what a rerun does, exit 130 (SIGINT) or 143 (SIGTERM) -- at any moment,
    start-up included (``icl_heads.__main__`` catches one that lands while this module is imported).
    """
    interrupted: Optional[int] = None
    try:
        keep_freed_memory()
        previous = install_term_handler()
        try:
            app.main(args=argv, prog_name="icl-heads", standalone_mode=False)
        finally:
            restore_term_handler(previous)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        interrupted = 143 if terminated(e) else 130
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code or 2)
    except (ConfigError, CheckpointError) as e:
        fail(str(e), 2)
    except OSError as e:  # the system, not the input: a full disk, a read-only or vanished folder
        if not interrupt_in(e):
            fail(os_error_line(e), 1)
        interrupted = 143 if terminated(e) else 130
    except JobsSubmitted as e:  # --no-wait: the jobs are queued; the same command without it collects them
        click.echo(f"submitted {len(e.job_ids)} jobs: {' '.join(e.job_ids)} (logs in {e.folder})")
        click.echo(f"collect the results with: {collect_command(argv)}")
    except JobsFailed as e:
        fail(str(e), 1)
    except Exception as e:  # a Ctrl-C inside a lazy import leaves a half-initialised module behind: whatever
        if not interrupt_in(e):  # fails next (an AttributeError of numpy, seen) is the interrupt's doing
            raise
        interrupted = 143 if terminated(e) else 130
    if interrupted is not None:
        click.echo(f"interrupted: {resume_hint(argv, app.commands)}", err=True)
        sys.exit(interrupted)


def fail(message: str, code: int) -> None:
    """One line ``error: ...`` on stderr (only its first line: a message is never a paragraph), then exit."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


def os_error_line(e: OSError) -> str:
    """``<path>: <why>`` for an OSError (errno names the common ones plainly)."""
    why = {errno.ENOSPC: "no space left on the device (disk full)", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}.get(e.errno or -1, e.strerror or str(e))
    where = e.filename if e.filename is not None else "output"
    return f"{where}: {why}"


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or during (cycle-safe)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def interrupt_in(e: BaseException) -> bool:
    return any(isinstance(x, KeyboardInterrupt) for x in chain(e))


def terminated(e: BaseException) -> bool:
    """Whether ``e`` or what it unwound from is the SIGTERM handler's :class:`~icl_heads.workers.Terminated`."""
    return any(isinstance(x, Terminated) for x in chain(e))


def collect_command(argv: Optional[list[str]]) -> str:
    """The command line that waits for ``--no-wait``'s jobs and lands their results: the same, without it."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["icl-heads", *[a for a in args if a != "--no-wait"]])


def resume_hint(argv: Optional[list[str]], commands: Iterable[str]) -> str:
    """What a rerun does, said only where it is true: ``train`` continues a checkpoint with ``--resume`` (if one
    was written), ``reproduce``, the sweeps and ``zoo train`` keep finished stages and models; an analysis keeps
    nothing of an interrupted run and starts again."""
    args = sys.argv[1:] if argv is None else list(argv)
    cmd = next((a for a in args if not a.startswith("-")), "")
    if cmd == "train":
        out = option_value(args, "--out")
        if out is None or not (Path(out) / "meta.json").exists():
            return "no checkpoint was written yet; rerun the same command to start again"
        if "--resume" in args:
            return "rerun the same command to continue the checkpoint"
        return "rerun the same command with --resume to continue the checkpoint"
    if cmd in ("reproduce", "sweep-heads", "sweep-arch") or args[:2] == ["zoo", "train"]:
        return "rerun the same command to resume (finished work is kept)"
    if cmd in commands and cmd != "zoo":
        return "nothing of this run is kept; rerun the same command to start it again"
    return "nothing was started"


def option_value(args: list[str], name: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None

