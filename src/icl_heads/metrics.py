"""Excess risk per context length, with 95% confidence bands over prompts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import TaskConfig

Z95 = 1.959963984540054


@lru_cache(maxsize=16)
def boot_counts(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_prompts)`` prompt-resample counts of a paired bootstrap (``multinomial`` from
    ``default_rng(seed)``), float64 and read-only: ``counts @ per_prompt / n_prompts`` is every resample's mean.

    Why cached: one draw for 2000 prompts takes 0.12 s, and one (configuration, seed) of the main job asks
    for the same counts dozens of times (every statistic of E2, E3 and E7 pairs its resamples this way).
    The counts are exactly those of a fresh draw, so every interval is unchanged."""
    counts = np.random.default_rng(seed).multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=n_boot)
    counts = counts.astype(np.float64)
    counts.setflags(write=False)
    return counts


@dataclass
class RiskCurve:
    """Excess risk at every context length ``n = 0..N-1`` (mean and 95% normal CI over prompts)."""

    n: np.ndarray
    risk: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    norm: float  # E||w*||^2 = s tau^2

    @property
    def risk_norm(self) -> np.ndarray:
        return self.risk / self.norm

    def rows(self, **labels: object) -> list[dict[str, object]]:
        """Tidy rows: one per n, with normalised risk and CI (CI columns are normalised too)."""
        return [
            dict(labels, n=int(k), risk=float(r), risk_norm=float(r / self.norm),
                 ci_low=float(lo / self.norm), ci_high=float(hi / self.norm))
            for k, r, lo, hi in zip(self.n, self.risk, self.ci_low, self.ci_high)
        ]


def squared_errors(pred: torch.Tensor, f: torch.Tensor) -> np.ndarray:
    """Per-prompt, per-n squared error ``(yhat - <w*, x>)^2`` as float64 numpy, shape (B, N)."""
    return ((pred.detach().double().cpu() - f.detach().double().cpu()) ** 2).numpy()


def risk_curve(pred: torch.Tensor, f: torch.Tensor, task: TaskConfig) -> RiskCurve:
    return curve_from_errors(squared_errors(pred, f), task)


def curve_from_errors(err: np.ndarray, task: TaskConfig) -> RiskCurve:
    mean = err.mean(axis=0)
    half = Z95 * err.std(axis=0, ddof=1) / np.sqrt(err.shape[0])
    return RiskCurve(np.arange(err.shape[1]), mean, mean - half, mean + half, task.s * task.tau**2)
