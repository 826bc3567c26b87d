"""Atomic result writing and the provenance written beside every result.

Everything goes through :func:`atomic_write_bytes` (temp file in the same
folder, fsync, ``os.replace``) so an interrupted run never leaves a half file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

PACKAGES = ("icl-heads", "torch", "numpy", "scikit-learn", "matplotlib", "click", "pydantic", "safetensors")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 would hide results from others


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file being written, not the temporary name nobody asked for
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGUSR2 until the block ends, then deliver them (in arrival order).

    Why: each file is written atomically, but a checkpoint is several files with ``meta.json``
    (holding the others' SHA-256) written last. A SIGTERM between two of them left new weights
    beside the old ``meta.json``: the rerun stopped on "checksum mismatch" (seen on CI). Handlers
    are swapped at the Python level, not masked with ``pthread_sigmask``, because the OS may hand a
    process-directed signal to any thread (torch's pool threads included). Off the main thread,
    where handlers cannot be installed, the block runs unprotected. SIGKILL cannot be held: a
    checkpoint cut by it fails its checksum with a clear error rather than loading mixed files.
    SIGUSR2 is submitit's preemption and time-limit signal (``training.executors``): its handler
    requeues the Slurm job and exits, so it must not land between two files of a checkpoint either.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    # a handler installed outside Python (getsignal gives None) could not be put back: left as it is
    held = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None))
            if s is not None and signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def sha256s(files: Mapping[str, bytes]) -> dict[str, str]:
    """Each file's SHA-256 (hex), as ``meta.json`` records them."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def write_files_then_meta(folder: str | Path, files: Mapping[str, bytes], meta_name: str,
                          meta: Mapping[str, Any]) -> Path:
    """Write ``files``, then the JSON ``meta_name``, into ``folder``: each atomically, all with SIGINT
    and SIGTERM held, so a folder's meta (which records the files' :func:`sha256s`) matches its files."""
    folder = Path(folder)
    with signals_held():
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
        write_json(folder / meta_name, meta)
    return folder


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = list(rows)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def git_commit() -> str | None:
    """The commit of the source tree the package was imported from (with ``-dirty``), if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Package versions, Python, platform, torch threads/CUDA and git commit."""
    import torch

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }


def write_provenance(out: str | Path, config: Any, seed: int, **extra: Any) -> Path:
    """``out/config.json``: the resolved config, seed, environment and anything else worth keeping."""
    cfg = config.model_dump() if hasattr(config, "model_dump") else config
    return write_json(Path(out) / "config.json", {"config": cfg, "seed": seed, "environment": environment(), **extra})


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
