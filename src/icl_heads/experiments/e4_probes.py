"""E4 runner: layer-wise probes for a checkpoint, its pruned version and comparison models, to a run folder.

The probes are :mod:`icl_heads.analysis.probes`; this module loads, runs and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..analysis.ablation import REFERENCE_STREAM, make_ablations, parse_ablations
from ..analysis.importance import assess_heads_kinds
from ..analysis.probes import ALPHAS, probe_layers
from ..analysis.pruning import default_policy, parse_policy, prune_gates
from ..claims.keys import AblationKind, ModelKey, Variant, in_context_n_min
from ..config import ConfigError, Preset
from ..evaluation import evaluate
from ..io import read_json, save_figure, write_csv, write_json, write_provenance
from ..model import Transformer
from ..plotting import new_figure
from ..tasks import fixed_prompts
from .loading import load_for_analysis


def run_e4(ckpt: str | Path, out: str | Path, prune: str | None = None, compare: Sequence[str | Path] = (),
           preset: Preset | str | None = None, n_prompts: int | None = None, seed: int | None = None,
           device: str = "cpu", ablations: str | Sequence[str] = ("zero",),
           ranking_from: str | Path | None = None) -> dict[str, Any]:
    """E4: probes for the model in ``ckpt``, its pruned version (``prune`` policy) and ``compare`` models.

    ``prune="default"`` means all heads in layer 1, the top head in every later layer; heads are
    ranked by E2 importance on "val" prompts, under each ablation kind in ``ablations``, and the
    pruned heads are ablated the same way (model label ``h=H pruned``, plus `` (mean)`` /
    `` (resample)`` for those kinds). All models are probed on the same prompts.
    ``ranking_from``: a finished E3 folder of the same checkpoint; where it ranked the heads as E4 would
    (same checkpoint, seed, prompts, policy and kind: :func:`e3_pruned_gates`), its pruned gates are used
    instead of ranking again (the main job: the ranking is the same work, done once).
    """
    out = Path(out)
    kinds = parse_ablations(ablations)
    if prune not in (None, "default"):
        parse_policy(prune)
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_test
    fit, test = fixed_prompts(pre.task, n, seed, "probe"), fixed_prompts(pre.task, n, seed, "test")
    # (label, model, gates, fit values, test values, checkpoint)
    runs: list[tuple[str, Transformer, Any, Any, Any, str]] = [(ModelKey(model.cfg.n_heads).e4_label, model, None, None,
                                                                None, str(ckpt))]
    kind_of: dict[str, str] = {}  # pruned model label -> the ablation kind that ranked and pruned it
    policy = None
    if prune is not None:
        policy = default_policy(model.cfg.n_layers) if prune == "default" else prune
        abls = make_ablations(model, kinds, pre.task, n, seed)
        gates = e3_pruned_gates(ranking_from, ckpt, policy, kinds, n, seed) if ranking_from else None
        if gates is None:
            imps = assess_heads_kinds(model, fixed_prompts(pre.task, n, seed, "val"), pre.task, list(abls.values()),
                                      n_min=in_context_n_min(pre.task.d), keep=False)  # ranked as E3 ranks them
            gates = {kind: prune_gates(imps[kind], policy) for kind in kinds}
        for kind, abl in abls.items():
            label = ModelKey(model.cfg.n_heads, Variant.PRUNED, AblationKind(kind)).e4_label
            kind_of[label] = kind
            runs.append((label, model, gates[kind], abl.repaired(seed + 1).values(n), abl.values(n), str(ckpt)))
    for other in compare:
        m2, _, _ = load_for_analysis(other, pre, device)
        if m2.cfg.n_layers != model.cfg.n_layers:
            raise ConfigError(f"compare: {other} has {m2.cfg.n_layers} layers, {ckpt} has {model.cfg.n_layers}")
        label = ModelKey(m2.cfg.n_heads).e4_label
        if any(label == r[0] for r in runs):
            label = f"{label} ({Path(other).name})"
        runs.append((label, m2, None, None, None, str(other)))
    rows: list[dict[str, Any]] = []
    gates_used = {}
    for label, m, g, fit_v, test_v, path in runs:
        rows += probe_layers(m, fit, test, pre.task, gates=g, labels=dict(model=label, checkpoint=path),
                             fit_values=fit_v, test_values=test_v)
        gates_used[label] = None if g is None else g.tolist()
        # the model's own read-out on the same test prompts, as a reference panel
        rows += [{**r, "layer_index": m.cfg.n_layers + 1, "alpha": float("nan")}
                 for r in evaluate(m, test, pre.task, head_gates=g, head_values=test_v).rows(
                     model=label, checkpoint=path, layer="model output")]
    write_csv(out / "probes.csv", rows)
    plot_probes(rows, out / "probes.png", f"E4 linear probes of <w*, x_q> ({pre.name})")
    mean = _mean_by_layer(rows)
    per_model = {label: {"gates": gates_used[label], "mean_probe_risk_norm": mean[label]} for label, *_ in runs}
    summary = dict(experiment="E4", checkpoint=str(ckpt), compare=[str(c) for c in compare], prune_policy=policy,
                   ablations=list(kinds), reference_stream=REFERENCE_STREAM,
                   n_fit=n, n_test=n, fit_stream="probe", test_stream="test",
                   probe="one RidgeCV per (layer, n) on standardised features",
                   models={label: v for label, v in per_model.items() if label not in kind_of},
                   by_ablation={kind: {label: per_model[label] for label, k in kind_of.items() if k == kind}
                                for kind in kinds} if kind_of else {})
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E4", checkpoint=str(ckpt), compare=[str(c) for c in compare],
                     prune_policy=policy, alphas=ALPHAS, ablations=list(kinds), reference_stream=REFERENCE_STREAM)
    return summary


def e3_pruned_gates(e3_dir: str | Path, ckpt: str | Path, policy: str, kinds: Sequence[str], n: int,
                    seed: int) -> dict[str, torch.Tensor] | None:
    """The pruned gates ``(L, h)`` per ablation kind of a finished E3 run, if it ranked the heads exactly as E4
    ranks them: same checkpoint, seed, number of "val" prompts and policy, and every kind present (E3 ranks
    over ``n >= d/2``, as E4 does). Otherwise None, and E4 ranks them itself."""
    folder = Path(e3_dir)
    if not (folder / "summary.json").exists() or not (folder / "config.json").exists():
        return None
    summary, config = read_json(folder / "summary.json"), read_json(folder / "config.json")
    same = (summary.get("checkpoint") == str(ckpt) and summary.get("policy") == policy
            and summary.get("n_prompts") == n and config.get("seed") == seed
            and summary.get("finetune_steps") == 0 and set(kinds) <= set(summary.get("by_ablation", {})))
    if not same:
        return None
    return {kind: torch.tensor(summary["by_ablation"][kind]["gates"]["pruned"], dtype=torch.float32)
            for kind in kinds}


def summary_models(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every probed model of an E4 ``summary.json`` by label: the unpruned ones and each kind's pruned one."""
    return {**summary["models"], **{label: v for by in summary["by_ablation"].values() for label, v in by.items()}}


def _mean_by_layer(rows: list[dict[str, Any]], n_min: int = 1) -> dict[str, dict[str, float]]:
    """Per model and layer: normalised probe risk averaged over ``n >= n_min``."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["n"] >= n_min:
            acc.setdefault(r["model"], {}).setdefault(str(r["layer"]), []).append(r["risk_norm"])
    return {m: {l: float(np.mean(v)) for l, v in d.items()} for m, d in acc.items()}


def plot_probes(rows: list[dict[str, Any]], path: str | Path, title: str, n_min: int = 1) -> Path:
    """:func:`probes_figure` saved to ``path``."""
    return save_figure(probes_figure(rows, title, n_min), path)


def probes_figure(rows: list[dict[str, Any]], title: str, n_min: int = 1) -> Figure:
    """Left: probe risk vs layer (mean over n >= n_min), one line per model. Then one panel per
    layer (probe risk vs n) and a last panel with the models' own outputs."""
    layers = sorted({(r["layer_index"], str(r["layer"])) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(1, len(layers) + 1, figsize=(3.0 * (len(layers) + 1), 3.4), squeeze=False)
    summary = _mean_by_layer(rows, n_min)
    ax0 = axes[0][0]
    for i, m in enumerate(models):
        ax0.plot(range(len(layers)), [summary[m].get(name, np.nan) for _, name in layers], "o-", color=f"C{i}", label=m)
    ax0.set_xticks(range(len(layers)), [name if name != "model output" else "out" for _, name in layers])
    ax0.set_yscale("log")
    ax0.set_xlabel("layer")
    ax0.set_ylabel(f"normalised probe excess risk (mean n >= {n_min})")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=7)
    lo_all = min(max(r["ci_low"], 1e-6) for r in rows if r["n"] >= n_min)
    hi_all = max(r["ci_high"] for r in rows if r["n"] >= n_min)
    for ax, (li, name) in zip(axes[0][1:], layers):
        for i, m in enumerate(models):
            sel = sorted((r for r in rows if r["model"] == m and r["layer_index"] == li and r["n"] >= n_min),
                         key=lambda r: r["n"])
            if not sel:
                continue
            n = [r["n"] for r in sel]
            (line,) = ax.plot(n, [r["risk_norm"] for r in sel], label=m, color=f"C{i}")
            ax.fill_between(n, [max(r["ci_low"], 1e-6) for r in sel], [r["ci_high"] for r in sel],
                            color=line.get_color(), alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_ylim(lo_all * 0.8, hi_all * 1.25)
        ax.set_title(name if name in ("embed", "model output") else f"after layer {name}", fontsize=9)
        ax.set_xlabel("context length n")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
