"""Shared figure helpers: every experiment plots normalised excess risk vs n the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import save_figure  # noqa: E402


def risk_vs_n(curves: Mapping[str, Iterable[Mapping[str, float]]], path: str | Path, title: str,
              styles: Mapping[str, Mapping[str, object]] | None = None, n_min: int = 1) -> Path:
    """Log-y plot of ``risk_norm`` vs ``n`` with 95% bands (rows as written by ``RiskCurve.rows``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in curves.items():
        rows = [r for r in rows if int(r["n"]) >= n_min]
        n = [int(r["n"]) for r in rows]
        style = dict((styles or {}).get(label, {}))
        (line,) = ax.plot(n, [float(r["risk_norm"]) for r in rows], label=label, **style)
        lo = [max(float(r["ci_low"]), 1e-6) for r in rows]
        ax.fill_between(n, lo, [float(r["ci_high"]) for r in rows], color=line.get_color(), alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("context length n")
    ax.set_ylabel("normalised excess risk")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    out = save_figure(fig, path)
    plt.close(fig)
    return out
