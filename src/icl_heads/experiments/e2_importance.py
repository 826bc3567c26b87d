"""E2 runner: head importance of one checkpoint, written to a run folder (CSVs, heat-maps, summary.json),
and the attention patterns of each layer's top head (``attention_patterns.png`` / ``.csv``).

The statistics are :mod:`icl_heads.analysis.importance` and :mod:`icl_heads.analysis.patterns`;
this module loads, runs and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.ablation import REFERENCE_STREAM, make_ablations, parse_ablations
from ..analysis.importance import ABLATE, KEEP, HeadImportance, assess_heads_kinds, per_layer_share
from ..analysis.patterns import PATTERN_PROMPTS, pattern_rows, query_attention, top_heads
from ..claims.keys import in_context_n_min
from ..config import Preset
from ..io import save_figure, write_csv, write_json, write_provenance
from ..metrics import curve_from_errors
from ..model import Transformer
from ..plotting import new_figure
from ..runs import layout
from ..tasks import Prompts, fixed_prompts
from .loading import load_for_analysis, model_label


def run_e2(ckpt: str | Path, out: str | Path, preset: Preset | str | None = None, n_prompts: int | None = None,
           seed: int | None = None, device: str = "cpu", n_boot: int = 1000,
           ablations: str | Sequence[str] = ("zero",)) -> dict[str, Any]:
    """E2 for one checkpoint: CSVs, heat-map figure, concentration with CIs, summary JSON.

    Several ``ablations`` share the base pass and go into the same CSVs (column ``ablation``);
    ``summary.json`` holds the run's settings and every kind's numbers under ``by_ablation``.
    """
    out = Path(out)
    kinds = parse_ablations(ablations)
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_test
    prompts = fixed_prompts(pre.task, n, seed, "test")
    abls = make_ablations(model, kinds, pre.task, n, seed)
    imps = assess_heads_kinds(model, prompts, pre.task, list(abls.values()))
    by_kind, rows, rows_n, concs, eff, c1b, eff_n = {}, [], [], [], [], [], []
    n_from = in_context_n_min(pre.task.d)
    for kind, imp in imps.items():
        conc = imp.concentration(n_boot=n_boot, seed=seed)
        r = imp.rows()
        rows, rows_n, concs = rows + r, rows_n + imp.rows_by_n(pre.task), concs + conc
        layer_rows, model_rows = imp.claim1b_stats(n_from, n_boot, seed)
        eff, c1b, eff_n = eff + layer_rows, c1b + model_rows, eff_n + imp.effective_heads_by_n()
        base = curve_from_errors(imp.base_err, pre.task)
        by_kind[kind] = dict(base_risk_norm_mean=float(base.risk_norm[imp.n_min:].mean()),
                             importance=imp.score(ABLATE).tolist(), keep_importance=imp.score(KEEP).tolist(),
                             concentration=conc)
    write_csv(out / "head_importance.csv", rows)
    write_csv(out / "head_importance_by_n.csv", rows_n)
    write_csv(out / "concentration.csv", concs)
    write_csv(out / "effective_heads.csv", eff)
    write_csv(out / "effective_heads_by_n.csv", eff_n)
    plot_effective_heads(eff_n, out / "effective_heads.png", n_from,
                         title=f"E2 effective heads per n, {model_label(model)} ({ckpt})")
    if c1b:
        write_csv(out / "claim1b.csv", c1b)
    plot_importance(imps, out / "head_importance.png", title=f"E2 head importance, {model_label(model)} ({ckpt})")
    if model.cfg.attention == "softmax":  # linear attention has no softmax pattern to show
        write_attention_patterns(model, prompts, imps.get("zero", imps[kinds[0]]), out,
                                 title=f"E2 attention of each layer's top head, {model_label(model)} ({ckpt})")
    summary = dict(experiment="E2", checkpoint=str(ckpt), n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads,
                   n_prompts=prompts.batch, n_min=1, ablations=list(kinds), reference_stream=REFERENCE_STREAM,
                   by_ablation=by_kind)
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E2", checkpoint=str(ckpt), n_prompts=prompts.batch,
                     n_boot=n_boot, stream="test", ablations=list(kinds), reference_stream=REFERENCE_STREAM,
                     pattern_prompts=min(PATTERN_PROMPTS, prompts.batch))
    return summary


def write_attention_patterns(model: Transformer, prompts: Prompts, imp: HeadImportance, out: Path,
                             title: str) -> list[dict[str, Any]]:
    """``attention_patterns.csv`` and ``.png``: each layer's top head by ``imp`` (E2's ranking), its attention at
    the longest-context query on the first ``PATTERN_PROMPTS`` prompts (:mod:`icl_heads.analysis.patterns`)."""
    att = query_attention(model, prompts.slice(0, PATTERN_PROMPTS), top_heads(imp))
    rows = pattern_rows(att, ranked_by=imp.ablation, n_prompts=att.weight.shape[0])
    write_csv(out / layout.E2_PATTERNS_CSV, rows)
    save_figure(attention_patterns_figure(rows, title), out / layout.E2_PATTERNS_PNG)
    return rows


def attention_patterns_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Left: mean attention on each context example k; right: mean attention vs |y_k| (quantile bins);
    one line per head (rows of :func:`icl_heads.analysis.patterns.pattern_rows`)."""
    fig, (ax, ax2) = new_figure(1, 2, figsize=(11, 4))
    heads = list(dict.fromkeys((r["layer"], r["head"]) for r in rows))
    for l, k in heads:
        for a, quantity in ((ax, "position"), (ax2, "abs_y")):
            rs = [r for r in rows if (r["layer"], r["head"], r["quantity"]) == (l, k, quantity)]
            a.plot([r["x"] for r in rs], [r["weight"] for r in rs], "o-", ms=3, label=f"layer {l}, head {k}")
    n = rows[0]["n_context"] if rows else 0
    for a in (ax, ax2):
        if rows:  # 1/(n+1) for paired tokens, 2/(2n+1) for interleaved ones (the query sees x and y tokens)
            a.axhline(rows[0]["uniform"], color="k", lw=0.6, ls=":", label="uniform" if a is ax else None)
        a.set_ylabel("attention weight (mean over prompts)")
        a.grid(True, alpha=0.3)
    ax.set_xlabel(f"context example k (query at n = {n})")
    ax2.set_xlabel("|y_k| (mean of a quantile bin)")
    ax.set_title("weight on each context example", fontsize=9)
    ax2.set_title("weight vs label size |y_k|", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_importance(imps: HeadImportance | dict[str, HeadImportance], path: str | Path, title: str) -> Path:
    """:func:`importance_figure` saved to ``path``."""
    return save_figure(importance_figure(imps, title), path)


def importance_figure(imps: HeadImportance | dict[str, HeadImportance], title: str) -> Figure:
    """Heat-maps (layers x heads): raw importance, normalised per layer, and keep-only risk change;
    one column per ablation kind, so the kinds sit side by side."""
    if isinstance(imps, HeadImportance):
        imps = {imps.ablation: imps}
    first = next(iter(imps.values()))
    L, h = first.shape
    K = len(imps)
    fig, axes = new_figure(3, K, figsize=(1.5 + (2.5 + 0.9 * h) * K, 3 * (1.2 + 0.8 * L)), squeeze=False)
    for j, (kind, imp) in enumerate(imps.items()):
        panels = [("importance: risk increase when ablated", imp.score(ABLATE), "magma"),
                  ("normalised per layer (share of positive total)", per_layer_share(imp.score(ABLATE)), "magma"),
                  ("keep only this head in its layer: risk increase", imp.score(KEEP), "viridis")]
        for ax, (name, val, cmap) in zip(axes[:, j], panels):
            _heatmap(fig, ax, val, cmap, f"{kind} ablation\n{name}")
    fig.suptitle(title + f" (normalised excess risk, mean over n >= {first.n_min})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_effective_heads(rows: list[dict[str, Any]], path: str | Path, n_from: int, title: str) -> Path:
    """:func:`effective_heads_figure` saved to ``path``."""
    return save_figure(effective_heads_figure(rows, n_from, title), path)


def effective_heads_figure(rows: list[dict[str, Any]], n_from: int, title: str) -> Figure:
    """N_eff (left) and keep-top ratio (right) vs n, one line per layer, one row of panels per ablation kind;
    a dotted line marks n = d/2, where the claims' regime starts."""
    kinds = list(dict.fromkeys(r["ablation"] for r in rows))
    fig, axes = new_figure(len(kinds), 2, figsize=(9, 3 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        sel = [r for r in rows if r["ablation"] == kind]
        for layer in sorted({r["layer"] for r in sel}):
            rs = sorted((r for r in sel if r["layer"] == layer), key=lambda r: r["n"])
            for ax, col in zip(axes[i], ("n_eff", "keep_top_ratio")):
                ax.plot([r["n"] for r in rs], [r[col] for r in rs], "o-", ms=3, label=f"layer {layer}")
        for ax, name in zip(axes[i], ("effective number of heads", "keep-top ratio (top head alone / model)")):
            ax.axvline(n_from, ls=":", color="k", lw=0.8)
            ax.set_title(f"{kind} ablation: {name}", fontsize=9)
            ax.set_xlabel("context length n")
            ax.grid(True, alpha=0.3)
        axes[i, 1].set_yscale("log")
        axes[i, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _heatmap(fig: Any, ax: Any, val: np.ndarray, cmap: str, title: str) -> None:
    L, h = val.shape
    im = ax.imshow(val, cmap=cmap, aspect="auto")
    lo, hi = (np.nanmin(val), np.nanmax(val)) if np.isfinite(val).any() else (0.0, 0.0)
    for l in range(L):
        for k in range(h):
            bright = np.isfinite(val[l, k]) and val[l, k] > lo + 0.6 * (hi - lo)
            ax.text(k, l, f"{val[l, k]:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_xticks(range(h), [str(k + 1) for k in range(h)])
    ax.set_yticks(range(L), [str(l + 1) for l in range(L)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
