"""E6 runner: the mechanism analysis of one checkpoint (and its single-head partner), written to a run folder.

The statistics are :mod:`icl_heads.analysis.mechanism` (E6a decoders, E6b readouts vs algorithms,
E6c's construction check); this module loads the checkpoints, runs them and writes the CSVs,
figures, ``summary.json`` and provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.mechanism import (ALGORITHMS, ALPHAS, BASELINES, C_GRID, DIRECTION_R2, E6C_SETTINGS, ETA_GRID,
                                  FEATURE_TARGETS, PathCache, analyse_model, construct_deviation, summarise_e6b,
                                  verdicts)
from ..claims.keys import ModelKey
from ..config import ConfigError, Preset
from ..io import save_figure, write_csv, write_json, write_provenance
from ..plotting import new_figure
from ..runs import layout
from ..tasks import fixed_prompts
from .loading import load_for_analysis


def run_e6c(out: str | Path, settings: Sequence[tuple] = E6C_SETTINGS, seed: int = 0) -> list[dict[str, Any]]:
    """Write ``e6c_construct.csv``: the construction's deviation from (grouped) PtO for a few settings."""
    rows = [construct_deviation(*s, seed=seed) for s in settings]
    write_csv(Path(out) / "e6c_construct.csv", rows)
    return rows


def run_e6(ckpt: str | Path, out: str | Path, single_ckpt: str | Path | None = None, *,
           preset: Preset | str | None = None, n_prompts: int | None = None, n_probe: int | None = None,
           n_val: int | None = None, n_test: int | None = None, seed: int | None = None, device: str = "cpu",
           with_construct: bool = True, with_any_t: bool = True) -> dict[str, Any]:
    """E6 for the model in ``ckpt`` (and the single-head ``single_ckpt``): CSVs, figures, summary JSON.

    Prompts: "probe" (decoders, probes), "val" (step sizes), "test" (scores), from the task
    recorded in the checkpoint (or ``preset``) and the preset's seed, as in E2-E4; each set has ``n_prompts`` prompts, by default the preset's
    ``eval.n_test`` (probe, test) and ``eval.n_val`` (val). ``with_construct`` adds E6c;
    ``with_any_t`` the final-output-vs-any-T context (``final_output_any_t``, half of E6's time
    on quick; ``reproduce`` runs it for the first seed only, as E6c, since no verdict reads it).
    """
    out = Path(out)
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    models = [(ckpt, model)]
    if single_ckpt is not None:
        single, _, pre_s = load_for_analysis(single_ckpt, preset, device)
        if pre_s.task != pre.task:
            raise ConfigError(f"single_ckpt: trained on another task ({pre_s.task!r} vs {pre.task!r})")
        models.append((single_ckpt, single))
    seed = pre.seed if seed is None else seed  # as E2-E4: every replicate is scored on the same prompts
    sizes = dict(n_probe=n_probe or n_prompts or pre.eval.n_test, n_val=n_val or n_prompts or pre.eval.n_val,
                 n_test=n_test or n_prompts or pre.eval.n_test)
    for k, v in sizes.items():
        if v < 3:
            raise ConfigError(f"{k}: need at least 3 prompts (got {v})")
    probe, val, test = (fixed_prompts(pre.task, sizes[f"n_{s}"], seed, s) for s in ("probe", "val", "test"))
    results: dict[str, Any] = {"r2": [], "r2_position": [], "agreement": [], "final_any_t": [], "detail": {}}
    labels: list[str] = []
    cache: PathCache = {}
    for path, m in models:
        base = ModelKey(m.cfg.n_heads).e6_label
        label = base + ("" if base not in labels else f"_{len(labels)}")
        labels.append(label)
        for k, v in analyse_model(m, pre.task, probe, val, test, label, cache=cache, with_any_t=with_any_t).items():
            if k == "detail":
                results[k].update(v)
            else:
                results[k] += v
    summary = summarise_e6b(results["agreement"])
    verdict = verdicts(results["detail"], pre.task.d, seed=seed)
    write_csv(out / "e6a_r2.csv", results["r2"])
    write_csv(out / "e6a_r2_by_position.csv", results["r2_position"])
    write_csv(out / "e6b_agreement.csv", results["agreement"])
    write_csv(out / "e6b_summary.csv", summary)
    write_csv(out / "e6b_verdict.csv", verdict)
    write_csv(out / "e6b_final_any_t.csv", results["final_any_t"])
    figs = [plot_e6a(results["r2"], out / "e6a_r2.png", results["r2_position"])]
    figs += [plot_e6b(results["agreement"], lab, out / f"e6b_agreement_{lab}.png") for lab in labels]
    e6c = run_e6c(out) if with_construct else []
    headline = dict(experiment="E6",
        checkpoints={lab: str(p) for lab, (p, _) in zip(labels, models)}, seed=seed, **sizes,
        e6a_mean_r2={f"{r['model']}/{r['source']}/{r['target']}": r["r2"]
                     for r in results["r2"] if r["feature"] == "mean"},
        e6a_directions={f"{r['model']}/{r['source']}/{r['target']}": r["r2"]
                        for r in results["r2"] if r["feature"] == "directions"},
        e6a_direction_r2_cutoff=DIRECTION_R2,
        e6b_verdict=verdict,
        e6b_final_best_t={f"{m}/{a}": min((r for r in results["final_any_t"] if (r["model"], r["algorithm"]) == (m, a)),
                                          key=lambda r: r["mean_rel_err"])
                          for m in labels for a in ALGORITHMS} if with_any_t else {},
        e6c_max_abs_dev=max((r["max_abs_dev"] for r in e6c), default=None),
        figures=[str(f) for f in figs],
    )
    write_json(out / layout.E6_SUMMARY, headline)
    write_provenance(out, pre, seed, experiment="E6", checkpoints=headline["checkpoints"], sizes=sizes,
                     eta_grid=ETA_GRID, c_grid=C_GRID, decoder_alphas=ALPHAS.tolist())
    return headline


def plot_e6a(rows: Sequence[dict[str, Any]], path: str | Path,
             by_position: Sequence[dict[str, Any]] = ()) -> Path:
    """:func:`e6a_figure` saved to ``path``."""
    return save_figure(e6a_figure(rows, by_position), path)


def e6a_figure(rows: Sequence[dict[str, Any]], by_position: Sequence[dict[str, Any]] = ()) -> Figure:
    """Left: mean R^2 per target, one bar per (model, source). Right: layer-1 R^2 of ``r_j x_ij`` vs position."""
    mean = [r for r in rows if r["feature"] == "mean"]
    series = list(dict.fromkeys((r["model"], r["source"]) for r in mean))
    fig, (ax, ax2) = new_figure(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / max(1, len(series))
    for i, (m, s) in enumerate(series):
        vals = [next((r["r2"] for r in mean if (r["model"], r["source"], r["target"]) == (m, s, t)), np.nan)
                for t in FEATURE_TARGETS]
        ax.bar(np.arange(len(FEATURE_TARGETS)) + i * width, vals, width, label=f"{m}, {s}",
               hatch="//" if s == "embed" else None, alpha=0.6 if s == "embed" else 1.0)
    ax.set_xticks(np.arange(len(FEATURE_TARGETS)) + width * (len(series) - 1) / 2)
    ax.set_xticklabels(["r_j x_ij (prefix r)", "r_j x_ij (full r)", "y_i x_ij", "x_ij"])
    ax.set_ylabel("held-out R^2 (mean over j)")
    ax.set_ylim(min(0.0, np.nanmin([r["r2"] for r in mean]) - 0.05), 1.05)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_title("E6a: linear decoding of features at context tokens")
    ax.legend(fontsize=8)
    for m, s in series:
        for tgt, ls in (("pto_prefix", "-"), ("pto_full", ":")):
            rs = sorted((r for r in by_position if (r["model"], r["source"], r["target"]) == (m, s, tgt)),
                        key=lambda r: r["position"])
            if rs and s == "layer1":
                ax2.plot([r["position"] for r in rs], [r["r2"] for r in rs], ls=ls, marker="o", ms=3,
                         label=f"{m}, {'prefix' if tgt == 'pto_prefix' else 'full'} r")
    ax2.set_xlabel("context position i")
    ax2.set_ylabel("R^2 of r_j x_ij from layer 1")
    ax2.set_title("by position (pooled decoder)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    return fig


def plot_e6b(rows: Sequence[dict[str, Any]], model: str, path: str | Path, readout: str = "probe",
             eta_fit: str = "match") -> Path:
    """:func:`e6b_figure` saved to ``path``."""
    return save_figure(e6b_figure(rows, model, readout, eta_fit), path)


def e6b_figure(rows: Sequence[dict[str, Any]], model: str, readout: str = "probe", eta_fit: str = "match") -> Figure:
    """Relative error (top) and correlation (bottom) vs n, one column per layer >= 2, one line per algorithm."""
    sel = [r for r in rows if r["model"] == model and r["readout"] == readout and r["eta_fit"] == eta_fit]
    layers = sorted({r["layer"] for r in sel})
    fig, axes = new_figure(2, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 6.5), squeeze=False)
    for c, l in enumerate(layers):
        for alg in [*ALGORITHMS, *BASELINES]:
            rs = sorted((r for r in sel if r["layer"] == l and r["algorithm"] == alg), key=lambda r: r["n"])
            if not rs:
                continue
            style = dict(ls=":" if alg in BASELINES else "-" if alg.startswith("pto") else "--",
                         marker="o" if "fixed" in alg else "s", ms=3)
            n = [r["n"] for r in rs]
            axes[0, c].plot(n, [r["rel_err"] for r in rs], label=alg, **style)
            axes[1, c].plot(n, [r["corr"] for r in rs], label=alg, **style)
        axes[0, c].set_yscale("log")
        axes[0, c].set_title(f"layer {l} vs {l - 1} step(s)")
        axes[1, c].set_xlabel("context length n")
        for ax in axes[:, c]:
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("relative error")
    axes[1, 0].set_ylabel("correlation")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"E6b: {model}, {readout} readout vs algorithms (step fitted: {eta_fit})")
    return fig
