"""Training the zoo: every missing model of a configuration with its recipe (:func:`train_zoo`, one
process or one job per model, each exported as it lands), and the accumulating (wsd) configurations'
trainer (:func:`accumulate_zoo`: the stable run grows by doublings, a cool-down branch is exported at
each, all members breadth first, stopping cleanly on the wall clock and resuming from the state folder).

The workers (:func:`_train_member`, :func:`_accumulate_member`) are module-level functions of this module:
``workers.run_in_processes`` forks them from a server that has imported it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import META_FILE, load_meta
from ..config import ExecutorConfig, Preset
from ..io import write_json
from ..training import Member, TrainSpec, is_finished, train, train_members
from ..training.executors import run_calls, with_folder
from ..workers import run_in_processes
from .export import export, export_cooldown
from .machine import CPU_CLOCK, cpu_seconds
from .registry import (STATE_DIR, ZOO_DIR, ZooConfig, cooldown_dir, cooldown_preset, member_status, milestones,
                       model_path, stable_preset, state_path)


def _progress_line(tag: str, what: Callable[[dict[str, float]], str]) -> Callable[[dict[str, float]], None]:
    """A worker's ``on_eval``: one line per evaluation -- time, member, step, ``what(row)``, the risks."""
    def show(row: dict[str, float]) -> None:
        print(f"{time.strftime('%H:%M:%S')} {tag} step {row['step']} {what(row)} "
              + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("r@")), flush=True)
    return show


def _train_member(config: ZooConfig, seed: int, h: int, work: str, threads: int) -> str:
    """Worker: train (or resume) one member of a configuration into ``work``; progress lines to stdout."""
    torch.set_num_threads(threads)
    tag = f"{config.name}/seed{seed}/h{h}"
    run = Path(work) / config.name / f"seed{seed}" / f"h{h}"
    t0 = time.perf_counter()

    show = _progress_line(tag, lambda row: f"wall {row['wall_s']:.0f}s")

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

def _timed_train(preset: Preset, h: int, out: Path, deadline: float, show: Any, init_from: Path | None = None,
                 device: str = "cpu") -> bool:
    """Train (resume) ``out`` until it finishes or the deadline; its CPU clock adds up. True when finished."""
    c0, cpu0 = time.process_time(), cpu_seconds(out)
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

    show = _progress_line(tag, lambda row: f"lr {row['lr']:.2e}")

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
        # a finished cool-down is exported as it is: its optimizer state is gone once exported (so a zoo that
        # lost or never got that export, e.g. one restored from git, gets it again without retraining)
        if not is_finished(cool) and not _timed_train(cooldown_preset(config, seed, t), h, cool, deadline, show,
                                                       init_from=member / "stable", device=device):
            return f"{tag}: stopped (cool-down at {t})"
        export_cooldown(config, seed, h, member, t, Path(zoo_root))
    return f"{tag}: {member_status(config, seed, h, Path(zoo_root))}"


def _exported_at(config: ZooConfig, seed: int, h: int, zoo_root: str | Path) -> int:
    path = model_path(config.name, seed, h, Path(zoo_root))
    return int(load_meta(path)["zoo"].get("stable_steps", 0)) if (path / META_FILE).exists() else 0


def accumulate_zoo(configs: list[ZooConfig], minutes: float, jobs: int, root: Path = ZOO_DIR,
                   state_root: Path = STATE_DIR, device: str = "cpu",
                   heads: tuple[int, ...] | None = None) -> list[str]:
    """Train the accumulating ``configs`` for ``minutes`` of wall time on ``jobs`` processes, breadth first:
    every member reaches a milestone (and exports its cool-down) before any member goes on to the next, so
    all seeds stand at the same training length whenever the time is up. Members go in the configurations'
    order (seed by seed, largest head count first); each stops at its next checkpoint after the time is up
    and resumes from ``state_root`` on the next call. Returns each member's last status line. On a GPU
    (``device="cuda"``) the ``jobs`` processes share the device, one model each (a resumed run continues on
    any device; bit-identity holds only on CPU). ``heads`` trains only those head counts (e.g. ``(4,)``: the
    claims' largest models first, as issue 23 orders A and E); the others wait for a later call."""
    stop = time.time() + 60 * minutes
    last: dict[tuple[str, int, int], str] = {}
    for t in sorted({m for c in configs for m in milestones(c)}):
        todo = [(c, k, h) for c in configs for k, h in c.members()
                if member_status(c, k, h, root) not in ("converged", "capped") and _exported_at(c, k, h, root) < t
                and t in milestones(c) and (heads is None or h in heads)]
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
            for c in configs for k, h in c.members() if heads is None or h in heads]
