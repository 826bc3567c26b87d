"""One writer per folder, and no analysis writing over someone else's files (issue 18).

Two ``train --out SAME`` started together used to both exit 0 with seed 0's weights
beside seed 1's snapshots; ``assess-heads CKPT --out CKPT`` overwrote the checkpoint's
``config.json``. So every command that writes a folder holds :func:`folder_lock` on it
(an advisory ``.lock`` file with the owner's PID, host and start time; a lock whose
PID is no longer alive on this host is stale and taken over), and an analysis checks
its ``--out`` with :func:`check_analysis_out` before any work.

Issue 26: a command killed after its first CSV left a folder another command was let into, and
``--out`` could point into the zoo or a finished run. So every command, once it holds the lock,
:func:`claim_out`: the folder may not lie in a zoo or a run, and a stage folder records its owner
(``.owner.json``) before its first file, so a later command of another kind is refused even where
the first one died before writing ``config.json``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import ConfigError

LOCK_FILE = ".lock"
OWNER_FILE = ".owner.json"  # {"experiment": tag, "command": name}: who writes this folder
# files that make every folder below them someone else's: a zoo, a reproduce run (also the zoo main job's),
# a sweep, a checkpoint (its snapshots/)
ENCLOSING_MARKERS = {"SHA256SUMS": "the model zoo", "run.json": "a reproduce run", "manifest.json": "a reproduce run",
                     "zoo_run.json": "a reproduce run", "sweep.json": "a sweep", "meta.json": "a checkpoint",
                     "stage.json": "a reproduce run's stage"}
# files that say a folder belongs to a checkpoint (meta/model), a reproduce run (run/manifest) or a sweep
FOREIGN_MARKERS = ("meta.json", "model.safetensors", "state.safetensors", "run.json", "manifest.json", "sweep.json")
_held: dict[Path, int] = {}  # folders this process holds, with a nesting count (a lock is re-entrant)
_created: set[Path] = set()  # folders the lock created: removed again on release if still empty


class FolderLocked(ConfigError):
    """Another live process is writing the folder; the message names it."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (EPERM: it runs, as another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The holder recorded in ``folder/.lock`` (None if there is none or it is unreadable)."""
    try:
        holder = json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """A lock is stale when its PID is dead on this host; a half-written lock file counts as stale too."""
    if holder is None or not isinstance(holder.get("pid"), int):
        return True
    return holder.get("host") == socket.gethostname() and not _alive(holder["pid"])


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file exclusively (O_EXCL: of two racing writers exactly one wins)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    return True


def acquire(folder: str | Path) -> Path:
    """Take ``folder``'s lock (creating the folder), or raise :class:`FolderLocked` naming the holder."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        return folder
    if not folder.exists():
        _created.add(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
    path = folder / LOCK_FILE
    for _ in range(3):  # a stale lock is removed and the race retried
        if _try_create(path, record):
            _held[folder] = 1
            return folder
        holder = read_lock(folder)
        if not _is_stale(holder):
            assert holder is not None
            where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
            _drop_if_created(folder)
            raise FolderLocked(f"out: {folder} is being written by PID {holder['pid']}{where} "
                               f"(started {holder.get('started', '?')})")
        path.unlink(missing_ok=True)
    _drop_if_created(folder)
    raise FolderLocked(f"out: could not lock {folder} (lock file keeps changing)")


def release(folder: Path) -> None:
    """Drop one nesting level; the last one removes the lock file (if it is still ours)."""
    _held[folder] -= 1
    if _held[folder]:
        return
    del _held[folder]
    holder = read_lock(folder)
    if holder is not None and holder.get("pid") == os.getpid():
        (folder / LOCK_FILE).unlink(missing_ok=True)
    _drop_if_created(folder)


def _drop_if_created(folder: Path) -> None:
    """A command that failed before writing anything leaves no empty folder behind."""
    if folder in _created:
        _created.discard(folder)
        try:
            if [p.name for p in folder.iterdir()] == [OWNER_FILE]:  # only our own claim: nothing was written
                (folder / OWNER_FILE).unlink()
            folder.rmdir()
        except OSError:  # not empty: it holds results
            pass


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s advisory lock while the block writes into it."""
    held = acquire(folder)
    try:
        yield held
    finally:
        release(held)


def check_analysis_out(out: str | Path, reads: Sequence[str | Path], experiment: str) -> None:
    """Refuse an analysis ``--out`` that would write over files it does not own.

    ``reads``: the checkpoints the analysis reads (``out`` may be none of them nor a folder
    above one: a run folder holds its checkpoints below it); a folder holding a checkpoint,
    a run's or sweep's top level, or another command's results (``config.json`` of another
    ``experiment``) is refused. The command's own earlier output is fine: that is a rerun.
    """
    out = Path(out).resolve()
    for r in reads:
        r = Path(r).resolve()
        if out == r or out in r.parents:
            raise ConfigError(f"out: {out} holds the checkpoint {r} this command reads; use a new --out")
    found = [m for m in FOREIGN_MARKERS if (out / m).exists()]
    if found:
        raise ConfigError(f"out: {out} holds another command's files ({', '.join(found)}); use a new --out")
    owner = _experiment_of(out / "config.json")
    if owner is not None and owner != experiment:
        raise ConfigError(f"out: {out} holds the results of {owner}, not {experiment}; use a new --out")


# the tag each command records (the ``experiment`` of its config.json) and the files that mark a folder as its own
COMMANDS = {"train": "train", "reproduce": "reproduce", "E5": "estimators", "E1 heads sweep": "sweep-heads",
            "architecture sweep": "sweep-arch", "eval": "eval", "E2": "assess-heads", "E3": "prune", "E4": "probe",
            "E6": "mechanism", "E7": "emergence"}
_OWN_MARKERS = {"run.json": "reproduce", "manifest.json": "reproduce", "zoo_run.json": "reproduce",
                "stage.json": "reproduce", "sweep.json": "architecture sweep", "meta.json": "train",
                "model.safetensors": "train", "state.safetensors": "train"}


def owner_of(folder: Path) -> str | None:
    """Which command's folder this is (its tag): the recorded owner, else its marker files, else the
    ``experiment`` of its config.json; None for a folder no command of ours has written."""
    try:
        rec = json.loads((folder / OWNER_FILE).read_text())
        if isinstance(rec, dict) and isinstance(rec.get("experiment"), str):
            return rec["experiment"]
    except (OSError, ValueError):
        pass
    for marker, tag in _OWN_MARKERS.items():
        if (folder / marker).exists():
            return tag
    exp = _experiment_of(folder / "config.json")
    return None if exp == "?" else exp


def claim_out(out: str | Path, experiment: str) -> None:
    """Refuse an ``--out`` inside a zoo, a run, a sweep or a checkpoint, or owned by another command;
    else record ``experiment`` as its owner (before the command writes its first file). Call with the
    folder's lock held."""
    out = Path(out).resolve()
    for above in out.parents:
        found = [m for m in ENCLOSING_MARKERS if (above / m).is_file()]
        if found == ["sweep.json"] and _sweep_analysis(out, experiment):
            continue
        if found:
            raise ConfigError(f"out: {out} lies inside {ENCLOSING_MARKERS[found[0]]} ({above / found[0]}); "
                              "use a folder outside it")
    if (out / "SHA256SUMS").exists():
        raise ConfigError(f"out: {out} is the model zoo (SHA256SUMS); use a folder outside it")
    owner = owner_of(out)
    if owner is not None and owner != experiment:
        raise ConfigError(f"out: {out} belongs to `{COMMANDS.get(owner, owner)}`, not `{COMMANDS.get(experiment)}`; "
                          "use a new --out")
    if owner is None:  # O_EXCL as the lock: with the lock held nobody else creates it
        _try_create(out / OWNER_FILE, {"experiment": experiment, "command": COMMANDS.get(experiment, experiment)})


def _sweep_analysis(out: Path, experiment: str) -> bool:
    """The architecture sweep's own analysis folders, ``.../seed{k}/h{h}-e2`` (E2) and ``h{h}-e3`` (E3) beside
    their checkpoint, where ``sweep-arch --table`` reads them (``experiments.arch_sweep``)."""
    want = {"E2": "e2", "E3": "e3"}.get(experiment)
    return want is not None and re.fullmatch(rf"h\d+-{want}", out.name) is not None and out.parent.name.startswith("seed")


def _experiment_of(config: Path) -> str | None:
    """The ``experiment`` a ``config.json`` records (``"?"`` if it records none or is unreadable)."""
    if not config.exists():
        return None
    try:
        rec = json.loads(config.read_text())
    except (OSError, ValueError):
        return "?"
    return str(rec.get("experiment", "?")) if isinstance(rec, dict) else "?"
