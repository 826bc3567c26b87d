"""The model zoo: converged reference models shipped in the repository (``zoo/``, ``zoo/README.md``).

A *configuration* is the ``quick`` task with one architecture and its training recipe
(:data:`CONFIGS`): ``A`` paired tokens, attention-only (the quick model); ``B`` paired
tokens with MLP (GPT-2 blocks); ``C`` interleaved tokens with MLP (Garg et al.'s
format). Each model lives in ``zoo/<config>/seed{k}/h{h}/`` as a checkpoint without
optimizer state (``model.safetensors`` + ``meta.json``); the largest-head model also
keeps its log-spaced training snapshots (``snapshots/step*/``, for E7).
``zoo/SHA256SUMS`` (``sha256sum -c`` format) lists every file; :func:`verify`
checks them all.

A model enters the zoo through :func:`export`, from a finished training folder
made with the configuration's recipe (``icl-heads zoo train``); its meta records
the recipe (``zoo.overrides``), the convergence check (:func:`convergence`), the
machine and the wall time, so retraining it from scratch is one call
(:func:`spec_of`) and reproduces it step for step on CPU (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import META_FILE, MODEL_FILE, CheckpointError, load_meta, load_model
from .config import ConfigError, ExecutorConfig, ModelConfig, Preset, TaskConfig, TrainConfig, get_preset
from .io import atomic_write_text, write_json
from .tasks import fixed_prompts
from .training import Member, TrainSpec, is_finished, marker_ns, snapshot_dir, snapshot_steps, train, train_members
from .training.executors import run_calls, with_folder

ZOO_DIR = Path(__file__).resolve().parents[2] / "zoo"
SUMS_FILE = "SHA256SUMS"
CPU_CLOCK = "cpu_clock.json"  # CPU seconds of a training run (time_to_quality.py and zoo train write it)
CONVERGENCE_TOL = 0.03  # a run is converged when r@d and r@2d improve by < 3% over the last doubling of steps


@dataclass(frozen=True)
class ZooConfig:
    """One configuration of the factor study: preset overrides (architecture + recipe) and what to train."""

    name: str
    title: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    heads: tuple[int, ...]
    extra: tuple[tuple[int, int], ...] = ()  # (seed, h) trained besides seeds x heads (E1's h=2 curve)
    base: str = "quick"  # the preset the overrides apply to (tests use smoke)

    def preset(self, seed: int = 0) -> Preset:
        return get_preset(self.base, **{**self.overrides, "seed": seed})

    def members(self) -> list[tuple[int, int]]:
        """Every ``(seed, h)`` of the configuration, seed by seed (so seeds complete in order); within a
        seed the head counts the claims need first, largest (slowest) first, then the extras."""
        pairs = {(k, h) for k in self.seeds for h in self.heads} | set(self.extra)
        return sorted(pairs, key=lambda kh: (kh[0], kh[1] not in self.heads, -kh[1]))


_SNAP = {"train.snapshots": 8, "train.eval_every": 1000, "train.checkpoint_every": 1000}
CONFIGS: dict[str, ZooConfig] = {c.name: c for c in (
    ZooConfig("A", "paired tokens, attention-only, L = 3",
              {"model.mlp": False, "train.steps": 16000, "train.lr": 4e-3, **_SNAP},
              seeds=(0, 1, 2, 3, 4), heads=(1, 4), extra=((0, 2),)),
    ZooConfig("B", "paired tokens, MLP (GPT-2 blocks), L = 3",
              {"model.mlp": True, "train.steps": 16000, "train.lr": 1e-3, **_SNAP},
              seeds=(0, 1, 2), heads=(1, 4)),
    ZooConfig("C", "interleaved tokens, MLP (Garg et al.), L = 3",
              {"model.mlp": True, "model.token_format": "interleaved", "train.steps": 16000, "train.lr": 1e-3,
               "train.curriculum": True, "train.curriculum_d": True, **_SNAP},
              seeds=(0, 1, 2), heads=(1, 4)),
    # the deeper variant (issue 14, 2.): is depth what keeps A above ridge at n >= d? Twice A's layers,
    # half its lr (the L = 6 trial: 0.143 at n = d after 8k steps, against A's 0.165), twice its steps
    ZooConfig("D", "paired tokens, attention-only, L = 6",
              {"model.mlp": False, "model.n_layers": 6, "train.steps": 32000, "train.lr": 2e-3, **_SNAP},
              seeds=(0, 1, 2), heads=(1, 4)),
)}


def get_config(name: str) -> ZooConfig:
    if name not in CONFIGS:
        raise ConfigError(f"config: unknown zoo configuration {name!r} (choose from {', '.join(CONFIGS)})")
    return CONFIGS[name]


def model_path(config: str, seed: int, h: int, root: Path = ZOO_DIR) -> Path:
    return Path(root) / config / f"seed{seed}" / f"h{h}"


def available(config: str, root: Path = ZOO_DIR) -> list[tuple[int, int]]:
    """The ``(seed, h)`` of ``config`` present in the zoo."""
    base = Path(root) / config
    out = []
    for meta in sorted(base.glob(f"seed*/h*/{META_FILE}")):
        out.append((int(meta.parent.parent.name[4:]), int(meta.parent.name[1:])))
    return out


def complete_seeds(config: ZooConfig, root: Path = ZOO_DIR) -> list[int]:
    """Seeds of ``config`` whose every head count the claims need is in the zoo."""
    have = set(available(config.name, root))
    return [k for k in config.seeds if all((k, h) in have for h in config.heads)]


# --------------------------------------------------------------------------- convergence

def snapshot_errors(run: Path, step: int, test: Any, ns: list[int], scale: float) -> np.ndarray:
    """Per-prompt normalised squared excess error ``(B, len(ns))`` of the snapshot at ``step``."""
    model, _ = load_model(snapshot_dir(run, step) if step else run)
    model.eval()
    with torch.no_grad():
        pred = model(test.x.float(), test.y.float())
    return ((pred[:, ns] - test.f[:, ns].float()) ** 2 / scale).numpy()


def convergence(run: Path, preset: Preset, tol: float = CONVERGENCE_TOL, n_boot: int = 2000) -> dict[str, Any]:
    """The last-doubling test on the *test* prompts: risk at n = d/2, d, 2d of the snapshot at ``S/2``
    and at ``S`` (the last two log-spaced snapshots), the relative improvement with a paired bootstrap
    95% CI over prompts; converged when the improvement at n = d and at n = 2d is below ``tol``."""
    task = preset.task
    ns = marker_ns(task)
    steps = snapshot_steps(preset.train)
    if len(steps) < 2:
        raise ConfigError("train.snapshots: the convergence test needs at least 2 snapshots")
    test = fixed_prompts(task, preset.eval.n_test, preset.seed, "test")
    scale = task.s * task.tau ** 2
    half, full = (snapshot_errors(run, s, test, ns, scale) for s in steps[-2:])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(full), size=(n_boot, len(full)))
    out: dict[str, Any] = {"tol": tol, "from_step": steps[-2], "to_step": steps[-1], "n_test": len(full), "at": {}}
    decisive = {min(task.d, task.n_max), min(2 * task.d, task.n_max)}
    ok = True
    for j, n in enumerate(ns):
        imp = 1 - full[:, j].mean() / half[:, j].mean()
        boots = 1 - full[idx, j].mean(1) / half[idx, j].mean(1)
        se = full[:, j].std(ddof=1) / np.sqrt(len(full))
        out["at"][str(n)] = {"risk": float(full[:, j].mean()), "ci": [float(full[:, j].mean() - 1.96 * se),
                                                                       float(full[:, j].mean() + 1.96 * se)],
                             "risk_half": float(half[:, j].mean()), "improvement": float(imp),
                             "improvement_ci": [float(x) for x in np.quantile(boots, [0.025, 0.975])]}
        if n in decisive:
            ok = ok and bool(imp < tol)
    out["converged"] = ok
    return out


# --------------------------------------------------------------------------- export, verify

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
    keep_snaps = h == max(config.heads) if snapshots is None else snapshots
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


def cpu_vendor() -> str:
    """The CPU vendor (``GenuineIntel``, ``AuthenticAMD``): MKL takes other code paths on each, so the
    same AVX512 kernels round differently (measured: the smoke run's first E1 CI bound differs at 4e-4)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kernels() -> str:
    """What decides CPU float rounding: architecture, the kernels torch dispatches (e.g. AVX512), the
    CPU vendor and the torch version. A retrain is bit-identical only where this matches the model's record."""
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {cpu_vendor()} torch {torch.__version__}"


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}".strip()


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
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    for rel, digest in listed.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {SUMS_FILE} but missing")
        if _sha(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted or changed)")
    extra = [p.relative_to(root).as_posix() for p in _files(root) if p.relative_to(root).as_posix() not in listed]
    if extra:
        raise CheckpointError(f"{root / extra[0]}: not listed in {SUMS_FILE}")
    return len(listed)


def listing(root: Path = ZOO_DIR) -> list[dict[str, Any]]:
    """One row per zoo model: configuration, seed, h, steps, converged, risk at n = d/2, d, 2d."""
    rows = []
    for name in CONFIGS:
        for seed, h in available(name, root):
            meta = load_meta(model_path(name, seed, h, root))
            conv = meta.get("zoo", {}).get("convergence", {})
            row = {"config": name, "seed": seed, "h": h, "steps": meta.get("step"), "converged": conv.get("converged")}
            row.update({f"r@{n}": v["risk"] for n, v in conv.get("at", {}).items()})
            rows.append(row)
    return rows


def spec_of(path: Path) -> Any:
    """The :class:`~icl_heads.training.TrainSpec` recorded in a zoo model's meta (to retrain it).

    Bit-identical retraining also needs the recorded torch thread count (``meta["zoo"]["threads"]``,
    1 for every zoo model): CPU matmuls split their sums differently with more threads."""
    meta = load_meta(path)
    return TrainSpec(TaskConfig.model_validate(meta["task"]), ModelConfig.model_validate(meta["model_config"]),
                     TrainConfig.model_validate(meta["train"]), int(meta["seed"]), meta.get("preset"))


# --------------------------------------------------------------------------- training the zoo

def _train_member(config: ZooConfig, seed: int, h: int, work: str, threads: int) -> str:
    """Worker: train (or resume) one member of a configuration into ``work``; progress lines to stdout."""
    torch.set_num_threads(threads)
    tag = f"{config.name}/seed{seed}/h{h}"
    run = Path(work) / config.name / f"seed{seed}" / f"h{h}"
    t0 = time.perf_counter()

    def show(row: dict[str, float]) -> None:
        print(f"{time.strftime('%H:%M:%S')} {tag} step {row['step']} wall {row['wall_s']:.0f}s "
              + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("r@")), flush=True)

    clock = run / CPU_CLOCK
    cpu0 = json.loads(clock.read_text())["cpu_s"] if clock.exists() else 0.0
    c0 = time.process_time()
    try:
        train(config.preset(seed), h, run, "cpu", resume=True, progress=False, on_eval=show)
    finally:  # CPU seconds add up over resumed calls (the wall clock of a niced job says little)
        run.mkdir(parents=True, exist_ok=True)
        write_json(clock, {"cpu_s": cpu0 + time.process_time() - c0})
    print(f"{time.strftime('%H:%M:%S')} {tag} finished in {time.perf_counter() - t0:.0f}s", flush=True)
    return str(run)


def train_zoo(configs: list[ZooConfig], work: Path, jobs: int, root: Path = ZOO_DIR,
              on_export: Any = None, device: str = "cpu", stacked: bool = False,
              executor: ExecutorConfig | None = None) -> list[Path]:
    """Train every missing member of ``configs`` and export each into the zoo; resumable.

    On CPU: ``jobs`` processes at once (one torch thread each), each model exported as soon as it
    finishes. ``stacked`` (the GPU path): every member in stacks (``icl_heads.training.train_stack``, one per
    architecture and recipe), exported when the stacks are done. ``executor`` (default ``local``, the
    above): ``debug`` trains here, ``slurm`` submits one job per model (one per stack when ``stacked``;
    job folder ``work/jobs``); every model is exported here as its job ends, as after local training.
    """
    # seed by seed across configurations, so every configuration gets seed k before any gets k + 1
    todo = sorted(((c, k, h) for c in configs for k, h in c.members()
                   if not (model_path(c.name, k, h, root) / META_FILE).exists()),
                  key=lambda t: (t[1], configs.index(t[0]), t[0].members().index((t[1], t[2]))))
    runs = {(c.name, k, h): Path(work) / c.name / f"seed{k}" / f"h{h}" for c, k, h in todo}
    done: list[Path] = []

    def land(c: ZooConfig, k: int, h: int) -> None:
        dest = export(runs[(c.name, k, h)], c, k, h, root)
        conv = load_meta(dest)["zoo"]["convergence"]
        print(f"exported {dest} (converged={conv['converged']}; "
              + ", ".join(f"r@{m}={v['risk']:.4f} ({v['improvement']:+.1%})" for m, v in conv["at"].items())
              + ")", flush=True)
        done.append(dest)
        if on_export is not None:
            on_export(dest)

    executor = with_folder(executor, Path(work) / "jobs")
    if stacked:
        members = [Member(TrainSpec.from_preset(c.preset(k), h), runs[(c.name, k, h)]) for c, k, h in todo]
        if members:
            train_members(members, device, stacked=True, stack_root=Path(work) / "stacks", executor=executor)
        for c, k, h in todo:
            land(c, k, h)
        return done
    # workers.run_in_processes, not a ProcessPoolExecutor: SIGTERM or Ctrl-C must end the running
    # trainings (they resume from their last checkpoint), not wait hours for them to finish
    for t in [t for t in todo if is_finished(runs[t[0].name, t[1], t[2]])]:  # trained by an earlier run's jobs
        todo.remove(t)
        land(*t)
    # (every zoo model trains with one torch thread: bit-identical retraining needs the recorded count)
    run_calls(_train_member, [(c, k, h, str(work), 1) for c, k, h in todo], [str(runs[t[0].name, t[1], t[2]])
              for t in todo], executor, max(1, jobs), on_done=lambda i, _: land(*todo[i]))
    return done
