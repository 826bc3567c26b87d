"""The zoo's convergence test: a model's risk at n = d/2, d, 2d on the test prompts against the same
model at half the steps (paired bootstrap over prompts); converged when the gain at n = d and 2d is
below :data:`CONVERGENCE_TOL`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import ConfigError, Preset
from ..tasks import fixed_prompts
from ..training import marker_ns, snapshot_dir, snapshot_steps
from .registry import on_plateau

CONVERGENCE_TOL = 0.03  # a run is converged when r@d and r@2d improve by < 3% over the last doubling of steps


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
    the improvement at n = d and at n = 2d is below ``tol`` (without ``old``: not converged) and ``new`` has
    left the plateau (:func:`~.registry.on_plateau`): a model at n = d above 0.5 changes little between doublings because
    it has learned nothing yet, and may still leave the plateau (``plateau`` in the result)."""
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
    out["plateau"] = on_plateau(out, task)
    out["converged"] = ok and not out["plateau"]
    return out


def convergence(run: Path, preset: Preset, tol: float = CONVERGENCE_TOL, n_boot: int = 2000) -> dict[str, Any]:
    """The last-doubling test of a fixed-length (cosine) run: :func:`compare_models` of the snapshot at
    ``S/2`` against the one at ``S`` (the last two log-spaced snapshots)."""
    steps = snapshot_steps(preset.train)
    if len(steps) < 2:
        raise ConfigError("train.snapshots: the convergence test needs at least 2 snapshots")
    out = compare_models(snapshot_dir(run, steps[-2]), snapshot_dir(run, steps[-1]), preset, tol, n_boot)
    return {"tol": tol, "from_step": steps[-2], "to_step": steps[-1], **{k: v for k, v in out.items() if k != "tol"}}

