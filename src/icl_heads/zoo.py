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

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from .checkpoint import META_FILE, MODEL_FILE, STATE_FILE, CheckpointError, load_meta, load_model
from .config import ConfigError, ExecutorConfig, ModelConfig, Preset, TaskConfig, TrainConfig, get_preset
from .io import atomic_write_text, write_json
from .tasks import fixed_prompts
from .training import Member, TrainSpec, is_finished, marker_ns, snapshot_dir, snapshot_steps, train, train_members
from .training.executors import run_calls, with_folder
from .workers import run_in_processes

ZOO_DIR = Path(__file__).resolve().parents[2] / "zoo"
STATE_DIR = ZOO_DIR.parent / "zoo_state"  # resumable stable runs and last cool-downs of accumulating configurations
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
    max_steps: int = 0  # > 0: the recipe accumulates (wsd): stable run doubled from train.steps up to this cap
    cooldown_frac: float = 0.2  # a cool-down branch at stable step T runs round(frac * T) steps

    @property
    def accumulates(self) -> bool:
        return self.max_steps > 0

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
    # the format contrast with A (issue 23): interleaved tokens, attention-only; the recipe accumulates (wsd,
    # cool-down branches at 16k, 32k, 64k, ... steps) and its curriculum over the active coordinates is what
    # took it off the predict-zero plateau in the recipe study (docs/training.md)
    ZooConfig("E", "interleaved tokens, attention-only, L = 3",
              {"model.mlp": False, "model.token_format": "interleaved", "train.steps": 16000, "train.lr": 1e-3,
               "train.schedule": "wsd", "train.curriculum_d": True, "train.curriculum_ramp_steps": 8000, **_SNAP},
              seeds=(0, 1, 2, 3, 4), heads=(1, 4), max_steps=256000),
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

def model_errors(path: Path, test: Any, ns: list[int], scale: float) -> np.ndarray:
    """Per-prompt normalised squared excess error ``(B, len(ns))`` of the checkpoint in ``path``."""
    model, _ = load_model(path)
    model.eval()
    with torch.no_grad():
        pred = model(test.x.float(), test.y.float())
    return ((pred[:, ns] - test.f[:, ns].float()) ** 2 / scale).numpy()


def snapshot_errors(run: Path, step: int, test: Any, ns: list[int], scale: float) -> np.ndarray:
    """:func:`model_errors` of the snapshot at ``step`` of ``run`` (0: the run's last checkpoint)."""
    return model_errors(snapshot_dir(run, step) if step else run, test, ns, scale)


def compare_models(old: Path | None, new: Path, preset: Preset, tol: float = CONVERGENCE_TOL,
                   n_boot: int = 2000) -> dict[str, Any]:
    """Risk of ``new`` at n = d/2, d, 2d on the *test* prompts (95% CI), and, with ``old``, the relative
    improvement ``1 - risk_new / risk_old`` with a paired bootstrap 95% CI over prompts; converged when
    the improvement at n = d and at n = 2d is below ``tol`` (without ``old``: not converged)."""
    task = preset.task
    ns = marker_ns(task)
    test = fixed_prompts(task, preset.eval.n_test, preset.seed, "test")
    scale = task.s * task.tau ** 2
    full = model_errors(new, test, ns, scale)
    half = None if old is None else model_errors(old, test, ns, scale)
    idx = np.random.default_rng(0).integers(0, len(full), size=(n_boot, len(full)))
    out: dict[str, Any] = {"tol": tol, "n_test": len(full), "at": {}}
    decisive = {min(task.d, task.n_max), min(2 * task.d, task.n_max)}
    ok = half is not None
    for j, n in enumerate(ns):
        se = full[:, j].std(ddof=1) / np.sqrt(len(full))
        row: dict[str, Any] = {"risk": float(full[:, j].mean()),
                               "ci": [float(full[:, j].mean() - 1.96 * se), float(full[:, j].mean() + 1.96 * se)],
                               "risk_half": None, "improvement": None, "improvement_ci": None}
        if half is not None:
            imp = 1 - full[:, j].mean() / half[:, j].mean()
            boots = 1 - full[idx, j].mean(1) / half[idx, j].mean(1)
            row.update(risk_half=float(half[:, j].mean()), improvement=float(imp),
                       improvement_ci=[float(x) for x in np.quantile(boots, [0.025, 0.975])])
            if n in decisive:
                ok = ok and bool(imp < tol)
        out["at"][str(n)] = row
    out["converged"] = ok
    return out


def convergence(run: Path, preset: Preset, tol: float = CONVERGENCE_TOL, n_boot: int = 2000) -> dict[str, Any]:
    """The last-doubling test of a fixed-length (cosine) run: :func:`compare_models` of the snapshot at
    ``S/2`` against the one at ``S`` (the last two log-spaced snapshots)."""
    steps = snapshot_steps(preset.train)
    if len(steps) < 2:
        raise ConfigError("train.snapshots: the convergence test needs at least 2 snapshots")
    out = compare_models(snapshot_dir(run, steps[-2]), snapshot_dir(run, steps[-1]), preset, tol, n_boot)
    return {"tol": tol, "from_step": steps[-2], "to_step": steps[-1], **{k: v for k, v in out.items() if k != "tol"}}


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


# --------------------------------------------------------------------------- accumulating training (wsd)

def milestones(config: ZooConfig) -> list[int]:
    """Stable steps at which an accumulating configuration takes a cool-down: ``train.steps`` doubled
    up to ``max_steps``."""
    t, out = config.preset(0).train.steps, []
    while t <= config.max_steps:
        out.append(t)
        t *= 2
    return out


def cooldown_steps(config: ZooConfig, t: int) -> int:
    return max(1, round(config.cooldown_frac * t))


def stable_preset(config: ZooConfig, seed: int, t: int) -> Preset:
    return get_preset(config.base, **{**config.overrides, "seed": seed, "train.steps": t})


def cooldown_preset(config: ZooConfig, seed: int, t: int) -> Preset:
    """The cool-down branch at stable step ``t``: lr from its value to ~0 over ``cooldown_frac * t`` steps."""
    return get_preset(config.base, **{**config.overrides, "seed": seed, "train.steps": t + cooldown_steps(config, t),
                                      "train.cooldown_from": t, "train.snapshots": 0})


def state_path(config: str, seed: int, h: int, state_root: Path = STATE_DIR) -> Path:
    return Path(state_root) / config / f"seed{seed}" / f"h{h}"


def cooldown_dir(member: Path, t: int) -> Path:
    return member / f"cool{t:07d}"


def member_status(config: ZooConfig, seed: int, h: int, root: Path = ZOO_DIR) -> str:
    """``missing``, ``training`` (exported, not converged, below the cap), ``converged`` or ``capped``."""
    path = model_path(config.name, seed, h, root)
    if not (path / META_FILE).exists():
        return "missing"
    return str(load_meta(path).get("zoo", {}).get("state", "capped"))


def _cpu(folder: Path) -> float:
    clock = folder / CPU_CLOCK
    return float(json.loads(clock.read_text())["cpu_s"]) if clock.exists() else 0.0


def _timed_train(preset: Preset, h: int, out: Path, deadline: float, show: Any, init_from: Path | None = None,
                 device: str = "cpu") -> bool:
    """Train (resume) ``out`` until it finishes or the deadline; its CPU clock adds up. True when finished."""
    c0, cpu0 = time.process_time(), _cpu(out)
    try:
        res = train(preset, h, out, device, resume=True, progress=False, on_eval=show, init_from=init_from,
                    deadline=deadline)
    finally:
        if (out / META_FILE).exists():
            write_json(out / CPU_CLOCK, {"cpu_s": cpu0 + time.process_time() - c0})
    return bool(res.meta.get("finished")) and int(res.meta["step"]) >= preset.train.steps


def _accumulate_member(config: ZooConfig, seed: int, h: int, state_root: str, zoo_root: str, stop_epoch: float,
                       threads: int, upto: int | None = None, device: str = "cpu") -> str:
    """Worker: grow one member's stable run milestone by milestone (up to ``upto``), cool down and export at
    each, until it converges, reaches ``max_steps`` or the wall clock reaches ``stop_epoch`` (``time.time()``)."""
    torch.set_num_threads(threads)
    deadline = time.monotonic() + (stop_epoch - time.time())
    member = state_path(config.name, seed, h, Path(state_root))
    tag = f"{config.name}/seed{seed}/h{h}"

    def show(row: dict[str, float]) -> None:
        print(f"{time.strftime('%H:%M:%S')} {tag} step {row['step']} lr {row['lr']:.2e} "
              + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("r@")), flush=True)

    for t in milestones(config):
        if upto is not None and t > upto:
            break
        if member_status(config, seed, h, Path(zoo_root)) in ("converged", "capped"):
            break
        if _exported_at(config, seed, h, zoo_root) >= t:
            continue
        cool = cooldown_dir(member, t)
        if time.monotonic() >= deadline:
            return f"{tag}: stopped before step {t}"
        if not (cool / META_FILE).exists() and not _timed_train(stable_preset(config, seed, t), h, member / "stable",
                                                                 deadline, show, device=device):
            return f"{tag}: stopped (stable run)"
        if not _timed_train(cooldown_preset(config, seed, t), h, cool, deadline, show, init_from=member / "stable",
                            device=device):
            return f"{tag}: stopped (cool-down at {t})"
        export_cooldown(config, seed, h, member, t, Path(zoo_root))
    return f"{tag}: {member_status(config, seed, h, Path(zoo_root))}"


def _exported_at(config: ZooConfig, seed: int, h: int, zoo_root: str | Path) -> int:
    path = model_path(config.name, seed, h, Path(zoo_root))
    return int(load_meta(path)["zoo"].get("stable_steps", 0)) if (path / META_FILE).exists() else 0


def export_cooldown(config: ZooConfig, seed: int, h: int, member: Path, t: int, root: Path = ZOO_DIR) -> Path:
    """Export the cool-down at stable step ``t`` into the zoo (weights, meta, the stable run's snapshots for
    the largest head count) with the convergence test against the cool-down at ``t / 2``; keeps only the
    two latest cool-downs' weights in the state folder. Serialised across processes by a lock on the zoo."""
    cool = cooldown_dir(member, t)
    prev = cooldown_dir(member, t // 2)
    preset = stable_preset(config, seed, t)
    conv = compare_models(prev if (prev / META_FILE).exists() else None, cool, preset)
    conv.update(from_step=t // 2 if conv["at"][str(marker_ns(preset.task)[0])]["improvement"] is not None else None,
                to_step=t)
    state = "converged" if conv["converged"] else ("capped" if 2 * t > config.max_steps else "training")
    cpu = _cpu(member / "stable") + sum(_cpu(c) for c in member.glob("cool*"))
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
        if h == max(config.heads) and snaps.is_dir():
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


def accumulate_zoo(configs: list[ZooConfig], minutes: float, jobs: int, root: Path = ZOO_DIR,
                   state_root: Path = STATE_DIR, device: str = "cpu") -> list[str]:
    """Train the accumulating ``configs`` for ``minutes`` of wall time on ``jobs`` processes, breadth first:
    every member reaches a milestone (and exports its cool-down) before any member goes on to the next, so
    all seeds stand at the same training length whenever the time is up. Members go in the configurations'
    order (seed by seed, largest head count first); each stops at its next checkpoint after the time is up
    and resumes from ``state_root`` on the next call. Returns each member's last status line. On a GPU
    (``device="cuda"``) the ``jobs`` processes share the device, one model each (a resumed run continues on
    any device; bit-identity holds only on CPU)."""
    stop = time.time() + 60 * minutes
    last: dict[tuple[str, int, int], str] = {}
    for t in sorted({m for c in configs for m in milestones(c)}):
        todo = [(c, k, h) for c in configs for k, h in c.members()
                if member_status(c, k, h, root) not in ("converged", "capped") and _exported_at(c, k, h, root) < t
                and t in milestones(c)]
        todo.sort(key=lambda m: (m[1], configs.index(m[0]), m[0].members().index((m[1], m[2]))))
        if not todo:
            continue
        if time.time() >= stop:
            break
        lines = run_in_processes(_accumulate_member,
                                 [(c, k, h, str(state_root), str(root), stop, 1, t, device) for c, k, h in todo],
                                 max(1, jobs))
        last.update({(c.name, k, h): line for (c, k, h), line in zip(todo, lines)})
    return [last.get((c.name, k, h), f"{c.name}/seed{k}/h{h}: {member_status(c, k, h, root)}")
            for c in configs for k, h in c.members()]
