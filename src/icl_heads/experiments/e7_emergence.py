"""E7 runner: E2 and E3 on a checkpoint's training snapshots, written to a run folder.

The statistics are :mod:`icl_heads.analysis.emergence` (``snapshot_rows``, ``trend``); this module
finds the snapshots under ``<checkpoint>/snapshots/step{N}/``, loads them, writes ``emergence.csv``,
``summary.json`` and provenance, and reads several seeds' tables back for the report's figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.emergence import claim_stat_rows, late_steps, snapshot_rows, trend
from ..config import ConfigError, Preset
from ..io import read_csv, save_figure, write_csv, write_json, write_provenance
from ..plotting import new_figure
from ..runs import layout
from ..tasks import fixed_prompts
from .loading import load_for_analysis, resolve_preset

SNAPSHOT_DIR = "snapshots"
TREND_PROMPTS = 500  # prompts per set for the claims' statistics per snapshot (their CIs are not what trends use)


def snapshot_dirs(ckpt: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every snapshot of ``ckpt``, by step."""
    root = Path(ckpt) / SNAPSHOT_DIR
    found = [(int(p.name.removeprefix("step")), p) for p in root.glob("step*") if (p / "meta.json").exists()]
    return sorted(found)


def run_e7(ckpt: str | Path, out: str | Path, preset: Preset | str | None = None, n_prompts: int | None = None,
           seed: int | None = None, device: str = "cpu", n_boot: int = 1000, claims: bool = True,
           trend_prompts: int = TREND_PROMPTS, single_ckpt: str | Path | None = None) -> list[dict[str, Any]]:
    """E7 for one checkpoint's snapshots: ``emergence.csv`` and ``summary.json`` in ``out``; with ``claims``,
    also ``emergence_claims.csv``: claims 1b and 2a's key statistics under every ablation kind at the late
    snapshots (:func:`~icl_heads.analysis.emergence.late_steps`) on ``trend_prompts`` prompts per set, which
    the trend verdicts read. ``single_ckpt`` (the same seed's h = 1 checkpoint): where it has a snapshot at a
    late step, that step's rows add the fraction of the multi-head advantage pruning loses."""
    out = Path(out)
    snaps = snapshot_dirs(ckpt)
    if not snaps:
        raise ConfigError(f"snapshots: {ckpt} has no training snapshots (train with train.snapshots > 0)")
    pre = resolve_preset(snaps[0][1], preset)  # every snapshot of a run shares its task and seed
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_emergence
    val, test = fixed_prompts(pre.task, n, seed, "val"), fixed_prompts(pre.task, n, seed, "test")
    m = min(n, trend_prompts)  # the claims' statistics cost ~8 E7 passes per snapshot: fewer prompts there
    tval, ttest, fit = (fixed_prompts(pre.task, m, seed, s) for s in ("val", "test", "probe"))
    late = late_steps([s for s, _ in snaps]) if claims else []
    singles = dict(snapshot_dirs(single_ckpt)) if single_ckpt is not None and claims else {}
    rows: list[dict[str, Any]] = []
    claim_rows: list[dict[str, Any]] = []
    for step, path in snaps:
        model, _, _ = load_for_analysis(path, pre, device)
        rows += snapshot_rows(model, pre.task, step, val, test, seed, n_boot)
        if step in late:  # claims 1b and 2a's statistics under every ablation kind, for the trend verdicts
            one = load_for_analysis(singles[step], pre, device)[0] if step in singles else None
            claim_rows += claim_stat_rows(model, pre.task, step, tval, ttest, fit, seed, n_boot=n_boot, single=one)
    write_csv(out / layout.E7_CSV, rows)
    if claim_rows:
        write_csv(out / layout.E7_CLAIMS_CSV, claim_rows)
    write_json(out / layout.E7_SUMMARY, {"experiment": "E7", "checkpoint": str(ckpt), "steps": [s for s, _ in snaps],
                                      "trend_steps": late, "trend": trend(rows)})
    write_provenance(out, pre, seed, experiment="E7", checkpoint=str(ckpt),
                     snapshots=[str(p) for _, p in snaps], share_stream="val", ratio_stream="test",
                     trend_steps=late, trend_prompts=m if claims else None,
                     single_checkpoint=None if single_ckpt is None else str(single_ckpt),
                     single_snapshot_steps=sorted(set(singles) & set(late)))
    return rows


def read_emergence(paths: Sequence[Path]) -> dict[int, list[dict[str, Any]]]:
    """``seed index -> numeric rows`` from several seeds' ``emergence.csv``."""
    out = {}
    for k, p in enumerate(paths):
        out[k] = [{key: (float(v) if key not in ("ablation",) else v) for key, v in r.items()} for r in read_csv(p)]
    return out


def _yerr(rs: Sequence[dict[str, Any]], mid: str, lo: str, hi: str) -> np.ndarray:
    """Error bars from CI columns; a percentile bootstrap CI need not contain the point, so clip at 0."""
    e = np.array([[r[mid] - r[lo] for r in rs], [r[hi] - r[mid] for r in rs]], dtype=float)
    return np.nan_to_num(np.clip(e, 0, None))


def plot_emergence(per_seed: dict[int, list[dict[str, Any]]], seeds: Sequence[int], path: str | Path,
                   title: str) -> Path:
    """:func:`emergence_figure` saved to ``path``."""
    return save_figure(emergence_figure(per_seed, seeds, title), path)


def emergence_figure(per_seed: dict[int, list[dict[str, Any]]], seeds: Sequence[int], title: str) -> Figure:
    """Left: top-head share per layer vs training step (every seed, log x); middle: risk at n = d;
    right: pruned/full risk."""
    fig, (ax, ax2, ax3) = new_figure(1, 3, figsize=(15, 4.2))
    markers = "osd^v<>"
    for k, rows in per_seed.items():
        layers = sorted({int(r["layer"]) for r in rows})
        for l in layers:
            rs = sorted((r for r in rows if int(r["layer"]) == l), key=lambda r: r["step"])
            x = [r["step"] for r in rs]
            ax.errorbar(x, [r["top_share"] for r in rs],
                        yerr=_yerr(rs, "top_share", "ci_low", "ci_high"),
                        color=f"C{l - 1}", marker=markers[k % len(markers)], ms=4, capsize=2, lw=1,
                        label=f"layer {l}" if k == 0 else None)
        rs = sorted((r for r in rows if int(r["layer"]) == 1), key=lambda r: r["step"])
        x = [r["step"] for r in rs]
        ax2.plot(x, [r["risk_norm_at_d"] for r in rs], marker=markers[k % len(markers)], label=f"seed {seeds[k]}")
        ax3.errorbar(x, [r["pruned_ratio"] for r in rs],
                     yerr=_yerr(rs, "pruned_ratio", "pruned_ci_low", "pruned_ci_high"),
                     marker=markers[k % len(markers)], capsize=2, label=f"seed {seeds[k]}")
    for a in (ax, ax2, ax3):
        a.set_xscale("log")
        a.set_xlabel("training step")
        a.grid(True, which="both", alpha=0.3)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_ylabel("top-head share of layer importance")
    ax.set_title("E2 on snapshots (markers: seeds)")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("normalised risk at n = d")
    ax2.set_title("risk")
    ax2.legend(fontsize=8)
    ax3.axhline(1.25, color="k", lw=0.6, ls=":")
    ax3.set_yscale("log")
    ax3.set_ylabel("pruned / full risk (own read-out)")
    ax3.set_title("E3 on snapshots")
    ax3.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
