"""Shared figure helpers: every experiment plots normalised excess risk vs n the same way.

Figures are plain :class:`matplotlib.figure.Figure` objects (:func:`new_figure`): no pyplot, so
importing or plotting never switches matplotlib's backend and a notebook's backend stays its own;
functions that return a Figure leave saving to :func:`icl_heads.io.save_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from matplotlib.figure import Figure

from .io import save_figure

PLOT_CAP = 10.0  # normalised risk shown at most this (zero predictor = 1); a diverged fixed-step run reaches 1e100+


def display_rows(rows: Iterable[Mapping[str, Any]], cap: float = PLOT_CAP) -> list[dict[str, Any]]:
    """Copies of ``rows`` with risk and CI clipped to ``cap`` (NaN -> cap), for display only: CSVs keep raw values."""
    return [dict(r, **{k: min(float(r[k]), cap) if float(r[k]) == float(r[k]) else cap
                       for k in ("risk_norm", "ci_low", "ci_high")}) for r in rows]


def new_figure(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A backend-free Figure and its axes (``Figure.subplots``; ``figsize`` etc. go to the Figure)."""
    fig_kw = {k: kw.pop(k) for k in ("figsize", "dpi", "layout") if k in kw}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(nrows, ncols, **kw)


def risk_vs_n(curves: Mapping[str, Iterable[Mapping[str, float]]], path: str | Path, title: str,
              styles: Mapping[str, Mapping[str, object]] | None = None, n_min: int = 1) -> Path:
    """:func:`risk_vs_n_figure` saved to ``path``."""
    return save_figure(risk_vs_n_figure(curves, title, styles, n_min), path)


def risk_vs_n_figure(curves: Mapping[str, Iterable[Mapping[str, float]]], title: str,
                     styles: Mapping[str, Mapping[str, object]] | None = None, n_min: int = 1) -> Figure:
    """Log-y plot of ``risk_norm`` vs ``n`` with 95% bands (rows as written by ``RiskCurve.rows``).

    Values above ``PLOT_CAP`` are clipped (the title says so); a band whose lower edge is not positive is drawn
    down to the bottom of the axis, which is set from the smallest plotted risk, not from the band.
    """
    fig, ax = new_figure(figsize=(7, 4.5))
    shown = {label: display_rows(r for r in rows if int(r["n"]) >= n_min) for label, rows in curves.items()}
    risks = [r["risk_norm"] for rows in shown.values() for r in rows if r["risk_norm"] > 0]
    bottom = min(risks) / 3 if risks else 1e-3
    for label, rows in shown.items():
        n = [int(r["n"]) for r in rows]
        style = dict((styles or {}).get(label, {}))
        (line,) = ax.plot(n, [r["risk_norm"] for r in rows], label=label, **style)
        lo = [max(r["ci_low"], bottom) for r in rows]
        ax.fill_between(n, lo, [r["ci_high"] for r in rows], color=line.get_color(), alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    if any(float(r[k]) > PLOT_CAP for rows in curves.values() for r in rows for k in ("risk_norm", "ci_high")):
        title += f" (clipped at {PLOT_CAP:g})"
    ax.set_xlabel("context length n")
    ax.set_ylabel("normalised excess risk")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig
