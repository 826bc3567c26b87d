"""Models into the zoo, and the zoo's checksums.

A model enters the zoo through :func:`export` (a finished fixed-length run) or :func:`export_cooldown`
(an accumulating configuration's cool-down branch), as a checkpoint without optimizer state
(``model.safetensors`` + ``meta.json``); its meta records the recipe (``zoo.overrides``), the convergence
test, the machine and the CPU time, so retraining it is one call (:func:`~icl_heads.zoo.registry.spec_of`).
``SHA256SUMS`` (``sha256sum -c`` format) lists every file of the zoo; :func:`verify` checks them all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from ..checkpoint import META_FILE, MODEL_FILE, STATE_FILE, CheckpointError, load_meta
from ..config import ConfigError, TrainConfig
from ..io import atomic_write_text, write_json
from ..training import marker_ns
from .convergence import compare_models, convergence
from .machine import CPU_CLOCK, cpu_kernels, cpu_seconds, machine
from .registry import ZOO_DIR, ZooConfig, cooldown_dir, cooldown_steps, model_path, stable_preset

SUMS_FILE = "SHA256SUMS"


def export(run: Path, config: ZooConfig, seed: int, h: int, root: Path = ZOO_DIR,
           snapshots: bool | None = None) -> Path:
    """Copy a finished training run into the zoo (weights and meta, no optimizer state) and record
    its recipe, convergence, machine and wall time in ``meta.json``; refreshes ``SHA256SUMS``."""
    meta = load_meta(run)
    if not meta.get("finished"):
        raise CheckpointError(f"{run}: training has not finished")
    preset = config.preset(seed)
    want = {"train": preset.train.model_dump(), "task": preset.task.model_dump(), "seed": seed,
            "model_config": preset.model_config_for(h).model_dump()}
    for key, value in want.items():
        got = meta.get(key)
        if key == "train" and isinstance(got, dict):
            got = TrainConfig.model_validate(got).model_dump()
        if got != value:
            raise ConfigError(f"{key}: {run} was not trained with configuration {config.name}'s recipe")
    dest = model_path(config.name, seed, h, root)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(Path(run) / MODEL_FILE, dest / MODEL_FILE)
    keep_snaps = config.keeps_snapshots(h) if snapshots is None else snapshots
    if keep_snaps and (Path(run) / "snapshots").is_dir():
        shutil.copytree(Path(run) / "snapshots", dest / "snapshots")
    meta["sha256"] = {MODEL_FILE: meta["sha256"][MODEL_FILE]}
    meta["zoo"] = {"config": config.name, "title": config.title, "overrides": config.overrides, "seed": seed,
                   "h": h, "convergence": convergence(Path(run), preset), "wall_s": meta.get("wall_s"),
                   "cpu_s": json.loads((Path(run) / CPU_CLOCK).read_text())["cpu_s"]
                   if (Path(run) / CPU_CLOCK).exists() else None,
                   "machine": machine(), "cpu": cpu_kernels(), "threads": 1}
    write_json(dest / META_FILE, meta)
    write_sums(root)
    return dest



def add_snapshots(run: Path, config: ZooConfig, seed: int, h: int, root: Path = ZOO_DIR) -> Path:
    """Give a zoo model exported without snapshots the snapshots of ``run``, a retraining of it with the same
    recipe and seed: only if ``run``'s final weights are byte-identical to the zoo model's (then the
    snapshots are those of the very run the model came from; same seed, same numbers on CPU). The model's
    own files and meta are kept; ``SHA256SUMS`` is refreshed."""
    dest = model_path(config.name, seed, h, root)
    if not (dest / MODEL_FILE).exists():
        raise CheckpointError(f"{dest}: no zoo model to add snapshots to")
    if not load_meta(run).get("finished"):
        raise CheckpointError(f"{run}: training has not finished")
    if (Path(run) / MODEL_FILE).read_bytes() != (dest / MODEL_FILE).read_bytes():
        raise CheckpointError(f"{run}: its final weights differ from {dest}'s, so its snapshots are not that "
                              "model's history (another recipe, seed, code or machine)")
    snaps = Path(run) / "snapshots"
    if not snaps.is_dir():
        raise CheckpointError(f"{run}: no snapshots (train with train.snapshots > 0)")
    tmp = dest / ".snapshots.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(snaps, tmp)
    shutil.rmtree(dest / "snapshots", ignore_errors=True)
    os.replace(tmp, dest / "snapshots")
    write_sums(root)
    return dest


def export_cooldown(config: ZooConfig, seed: int, h: int, member: Path, t: int, root: Path = ZOO_DIR) -> Path:
    """Export the cool-down at stable step ``t`` into the zoo (weights, meta, the stable run's snapshots for
    the claims' head counts) with the convergence test against the cool-down at ``t / 2``; keeps only the
    two latest cool-downs' weights in the state folder. Serialised across processes by a lock on the zoo."""
    cool = cooldown_dir(member, t)
    prev = cooldown_dir(member, t // 2)
    preset = stable_preset(config, seed, t)
    conv = compare_models(prev if (prev / META_FILE).exists() else None, cool, preset)
    conv.update(from_step=t // 2 if conv["at"][str(marker_ns(preset.task)[0])]["improvement"] is not None else None,
                to_step=t)
    state = "converged" if conv["converged"] else ("capped" if 2 * t > config.max_steps else "training")
    cpu = cpu_seconds(member / "stable") + sum(cpu_seconds(c) for c in member.glob("cool*"))
    meta = load_meta(cool)
    meta["sha256"] = {MODEL_FILE: meta["sha256"][MODEL_FILE]}
    meta["zoo"] = {"config": config.name, "title": config.title, "overrides": config.overrides, "seed": seed, "h": h,
                   "schedule": "wsd", "stable_steps": t, "cooldown_steps": cooldown_steps(config, t),
                   "max_steps": config.max_steps, "state": state, "convergence": conv, "wall_s": meta.get("wall_s"),
                   "cpu_s": cpu, "machine": machine(), "cpu": cpu_kernels(), "threads": 1}
    dest = model_path(config.name, seed, h, root)
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".export.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cool / MODEL_FILE, dest / f".{MODEL_FILE}.tmp")
        os.replace(dest / f".{MODEL_FILE}.tmp", dest / MODEL_FILE)
        snaps = member / "stable" / "snapshots"
        if config.keeps_snapshots(h) and snaps.is_dir():
            for snap in sorted(snaps.iterdir()):
                if not (dest / "snapshots" / snap.name / META_FILE).exists():
                    shutil.copytree(snap, dest / "snapshots" / snap.name, dirs_exist_ok=True)
        write_json(dest / META_FILE, meta)
        write_sums(root)
    for old in member.glob("cool*"):  # the state keeps the two latest cool-downs (the next test needs this one)
        if old.name not in (cool.name, prev.name) and old.is_dir():
            shutil.rmtree(old)
    if (cool / STATE_FILE).exists():
        (cool / STATE_FILE).unlink()  # a finished branch is never resumed: its weights are all the next test needs
    print(f"exported {dest} at {t} + {cooldown_steps(config, t)} steps ({state}; "
          + ", ".join(f"r@{n}={v['risk']:.4f}" + ("" if v["improvement"] is None else f" ({v['improvement']:+.1%})")
                      for n, v in conv["at"].items()) + ")", flush=True)
    return dest


def _files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name not in (SUMS_FILE, "README.md")
                  and not p.name.startswith("."))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sums(root: Path = ZOO_DIR) -> Path:
    """``SHA256SUMS`` over every file of the zoo (paths relative to ``root``)."""
    lines = [f"{_sha(p)}  {p.relative_to(root).as_posix()}" for p in _files(root)]
    return atomic_write_text(Path(root) / SUMS_FILE, "\n".join(lines) + ("\n" if lines else ""))


def verify(root: Path = ZOO_DIR) -> int:
    """Check every file against ``SHA256SUMS``; returns the number checked, raises on the first problem."""
    root = Path(root)
    sums = root / SUMS_FILE
    if not sums.exists():
        raise CheckpointError(f"{sums}: no checksum manifest")
    listed = read_sums(sums)
    inside = root.resolve()
    for rel, digest in listed.items():
        path = root / rel
        if inside not in path.resolve().parents:  # a link out of the zoo is not the zoo's file
            raise CheckpointError(f"{path}: listed in {SUMS_FILE} but leads outside the zoo")
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {SUMS_FILE} but missing")
        if _sha(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted or changed)")
    extra = [p.relative_to(root).as_posix() for p in _files(root) if p.relative_to(root).as_posix() not in listed]
    if extra:
        raise CheckpointError(f"{root / extra[0]}: not listed in {SUMS_FILE}")
    return len(listed)


def read_sums(sums: Path) -> dict[str, str]:
    """``SHA256SUMS`` as ``{relative path: digest}``; a malformed line, or a path that is absolute, climbs out
    of the zoo (``..``) or is listed twice, is one error naming the line (a listed ``../../etc/hostname`` was
    verified and counted, issue 26)."""
    listed: dict[str, str] = {}
    try:
        text = sums.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{sums}: not a text file") from None
    for i, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        where = f"{sums}: line {i} ({line[:80]!r})"
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not rel:
            raise CheckpointError(f"{where}: expected '<64 hex digits>  <relative path>'")
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or "\\" in rel or ".." in parts or "." in parts or rel != PurePosixPath(rel).as_posix():
            raise CheckpointError(f"{where}: the path must be relative and inside the zoo")
        if rel in listed:
            raise CheckpointError(f"{where}: {rel} is listed twice")
        listed[rel] = digest
    return listed

