"""Training many models: one process per model on CPU, or one stack per architecture (CUDA).

:func:`train_members` is the entry point of every sweep (E1's head counts, the architecture
sweep, the zoo): finished members are reused, unfinished ones resumed. With an ``executor``
other than ``local`` (:mod:`.executors`) the same calls run in this process (``debug``) or as
Slurm jobs, one per model or per stack.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ExecutorConfig
from ..workers import run_in_processes
from .executors import is_local, job_device, job_threads, run_calls, with_folder
from .loop import is_finished, train, train_stack
from .spec import Member, TrainSpec, group_stacks, stack_dir_for


def _train_one(spec: TrainSpec, path: str, device: str, threads: int, position: int, progress: bool = True) -> float:
    """Worker: train (or resume) one model; returns the wall time of this call."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train(spec, None, path, device, resume=True, progress=progress, position=position)
    return time.perf_counter() - t0


def train_separately(items: Sequence[tuple[TrainSpec, str | Path]], device: str = "cpu", workers: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train each ``(TrainSpec, out)`` alone: one process per model on CPU, one after another on CUDA.

    On CPU the models train *concurrently*, one process per model with
    ``max(1, cores // processes)`` torch threads each: on the 2-core machine two
    single-thread processes ran ~1.3x faster in total than one two-thread process
    (measured, ``docs/training.md``), and three processes on two cores finish
    together instead of leaving a core idle for the last model; more than ``cores + 1``
    models queue (seven at once ran slower in total).
    """
    cores = os.cpu_count() or 1
    # at most cores + 1 processes: 7 concurrent quick trainings on 2 cores ran at 36 model-steps/s in
    # total, 3 at ~47 (measured; docs/training.md), so more models queue
    n_proc = min(len(items), cores + 1) if workers is None else max(1, min(workers, len(items)))
    if device != "cpu":
        n_proc = 1
    walls: dict[str, float] = {}
    if n_proc == 1:
        threads = items[0][0].train.threads or (os.cpu_count() or 1) if device == "cpu" else 1
        for spec, path in items:
            walls[str(path)] = _train_one(spec, str(path), device, threads, 0, progress)
    else:
        threads = max(1, cores // n_proc)
        # slowest first (more heads train slower on CPU), so the lone last job is a fast one
        order = sorted(items, key=lambda it: -it[0].model.n_heads)
        got = run_in_processes(_train_one, [(spec, str(path), device, threads, i, progress)
                                            for i, (spec, path) in enumerate(order)], n_proc)
        walls = {str(path): w for (_, path), w in zip(order, got)}
    return {"call_wall_s": walls, "processes": n_proc, "threads_each": threads}


def _stack_root(todo: Sequence[Member], stack_root: str | Path | None) -> Path:
    """``stack_root``, by default ``<common parent of the members>/stacks``."""
    if stack_root is not None:
        return Path(stack_root)
    return Path(os.path.commonpath([m.out.resolve().parent for m in todo])) / "stacks"


def _train_stack(group: list[Member], sdir: str, device: str, threads: int) -> float:
    """Job: train (or resume) one stack; returns the wall time of this call."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_stack(group, sdir, device, resume=True, progress=False)
    return time.perf_counter() - t0


def submit_members(todo: Sequence[Member], device: str, stacked: bool, root: Path,
                   executor: ExecutorConfig) -> dict[str, Any]:
    """``todo`` through a ``debug`` or ``slurm`` executor: one job per model, or per stack when ``stacked``."""
    threads = job_threads(executor, os.cpu_count() or 1)  # debug: as one model trained here
    if stacked:
        groups = group_stacks(todo)
        sdirs = [str(stack_dir_for(g, root)) for g in groups]
        walls = run_calls(_train_stack, [(g, s, device, threads) for g, s in zip(groups, sdirs)], sdirs, executor)
        return {"stacks": dict(zip(sdirs, walls))}
    calls = [(m.spec, str(m.out), device, m.spec.train.threads or threads, 0, False) for m in todo]
    walls = run_calls(_train_one, calls, [str(m.out) for m in todo], executor)
    return {"call_wall_s": {str(m.out): w for m, w in zip(todo, walls)}, "processes": 1, "threads_each": threads}


def train_members(members: Sequence[Member], device: str = "cpu", stacked: bool | None = None,
                  stack_root: str | Path | None = None, workers: int | None = None,
                  progress: bool = True, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse when finished) every member; the entry point for sweeps.

    ``stacked`` (default: on CUDA only, where one stack costs about one model)
    trains one stack per architecture (:func:`group_stacks`), each with its state
    under ``stack_root`` (default: ``<common parent of the members>/stacks``);
    otherwise every member trains alone (:func:`train_separately`: one process per
    model on CPU). ``executor`` (default ``local``, the above): ``debug`` or ``slurm`` run the same
    models or stacks as jobs (:mod:`.executors`; on Slurm on ``cuda`` when a job has GPUs, so
    stacked by default there). Returns per-member info and wall time.
    """
    device = job_device(device, executor)
    stacked = device.startswith("cuda") if stacked is None else stacked
    todo = [m for m in members if not is_finished(m.out)]
    info: dict[str, Any] = {"members": {str(m.out): {"reused": m not in todo} for m in members},
                            "stacked": stacked}
    t0 = time.perf_counter()
    if todo and not is_local(executor):  # the job folder defaults to <stack root's parent>/jobs
        root = _stack_root(todo, stack_root)
        got = submit_members(todo, device, stacked, root, with_folder(executor, root.parent / "jobs"))
        for sdir, group in zip(got.get("stacks", {}), group_stacks(todo) if stacked else []):
            for m in group:
                info["members"][str(m.out)]["stack"] = sdir
        info.update({k: v for k, v in got.items() if k != "stacks"})
    elif todo and stacked:
        for group in group_stacks(todo):
            sdir = stack_dir_for(group, _stack_root(todo, stack_root))
            train_stack(group, sdir, device, resume=True, progress=progress)
            for m in group:
                info["members"][str(m.out)]["stack"] = str(sdir)
    elif todo:
        info.update(train_separately([(m.spec, m.out) for m in todo], device, workers, progress))
    info["train_wall_s"] = time.perf_counter() - t0
    return info
