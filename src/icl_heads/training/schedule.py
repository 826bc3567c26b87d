"""What a training step sees: the learning-rate schedule, the curriculum, fresh prompts, snapshot steps.

Pure functions of the config and the step (no state), so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TaskConfig, TrainConfig
from ..tasks import Prompts, sample_prompts

EVAL_STREAM = "eval"  # validation prompts used *during* training (never the E5 "val"/"test" streams)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine to ``min_lr_frac * lr`` at ``steps``
    (``schedule="cosine"``) or constant (``"wsd"``: warmup-stable-decay, Hägele et al. 2024). A wsd
    *cool-down branch* (``cooldown_from = T``) decays linearly from ``lr`` at step ``T`` to ~0 at ``steps``.

    A wsd run's lr never depends on ``steps`` before a cool-down, so the run can be extended at will and
    a cool-down taken from any of its checkpoints is a model trained to the end of a schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        if cfg.cooldown_from and step >= cfg.cooldown_from:
            return cfg.lr * (cfg.steps - step) / (cfg.steps - cfg.cooldown_from)
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _ramp(step: int, cfg: TrainConfig, full: int) -> int:
    start = max(1, math.ceil(cfg.curriculum_start_frac * full))
    span = cfg.curriculum_ramp_steps or cfg.curriculum_steps_frac * cfg.steps
    t = min(step / max(span, 1), 1.0)
    return min(full, start + round(t * (full - start)))


def curriculum(step: int, cfg: TrainConfig, task: TaskConfig) -> tuple[int, int]:
    """``(n, d)`` used at ``step``: the curriculum values, or ``(n_max, d)`` without curriculum."""
    n = _ramp(step, cfg, task.n_max) if cfg.curriculum else task.n_max
    d = _ramp(step, cfg, task.d) if cfg.curriculum_d else task.d
    return n, d


def train_prompts(task: TaskConfig, batch: int, gen: torch.Generator, n: int, d: int) -> Prompts:
    """Fresh training prompts with ``n + 1`` examples and only the first ``d`` coordinates active."""
    if d == task.d:
        return sample_prompts(task, batch, gen, n=n)
    sub = task.model_copy(update={"d": d, "s": min(task.s, d)})
    p = sample_prompts(sub, batch, gen, n=n)
    pad = task.d - d
    return Prompts(F.pad(p.x, (0, pad)), p.y, F.pad(p.w, (0, pad)), p.f)


def snapshot_steps(cfg: TrainConfig) -> list[int]:
    """The ``cfg.snapshots`` steps at which a snapshot is kept: halvings back from the last step.

    ``step_i = steps // 2**(k-1-i)`` for ``i = 0..k-1`` (``k = cfg.snapshots``), so
    consecutive snapshots are a factor ~2 apart and the last one is ``cfg.steps``
    (e.g. 8000 steps, k=8: 62, 125, 250, ..., 4000, 8000). Where short runs make
    these collide or hit 0, each is pushed to one step after its predecessor and
    the list is then capped from the end so that it still ends at ``cfg.steps``;
    with ``k >= steps`` every step is a snapshot.
    """
    k, steps = cfg.snapshots, cfg.steps
    if k == 0:
        return []
    if k >= steps:
        return list(range(1, steps + 1))
    out: list[int] = []
    for i in range(k):
        out.append(max(steps // 2 ** (k - 1 - i), out[-1] + 1 if out else 1))
    for i in range(k - 1, -1, -1):  # cap from the end: step_i <= steps - (k-1-i)
        out[i] = min(out[i], steps - (k - 1 - i))
    return out


def snapshot_dir(out: str | Path, step: int) -> Path:
    """Folder of the snapshot at ``step`` of the run in ``out``."""
    return Path(out) / "snapshots" / f"step{step:06d}"


def marker_names(task: TaskConfig) -> dict[int, str]:
    """The context lengths every summary reports, ``{n: name}`` in increasing n: ``d/2`` (at least 1), ``d``
    and ``2d``, each capped at ``n_max``. The one place this rule is written (the training log's ``r@n``,
    the commands' last lines, the report's tables, the zoo's convergence test all read it).

    A length is named ``d``, ``2d`` or ``d/2`` only where n is that length (``d`` first: with d = 1, n = 1 is
    ``d``); one capped at ``n_max`` is called ``n_max`` (``--n-max 1`` with d = 5 labelled n = 1 "d/2",
    issue 26)."""
    capped = {min(max(task.d // 2, 1), task.n_max), min(task.d, task.n_max), min(2 * task.d, task.n_max)}
    names: dict[int, str] = {}
    for name, n in (("d", task.d), ("2d", 2 * task.d), ("d/2", max(task.d // 2, 1))):
        if n <= task.n_max:
            names.setdefault(n, name)
    return {n: names.get(n, "n_max") for n in sorted(capped)}


def marker_ns(task: TaskConfig) -> list[int]:
    """The context lengths of :func:`marker_names`, in increasing order."""
    return list(marker_names(task))
