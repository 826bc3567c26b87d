"""Layer-wise linear probes (E4): how much of ``<w*, x_q>`` each layer's residual stream holds.

For every layer (``embed`` = after the read-in, then after each block) and every context
length ``n``, a ridge probe maps the residual stream at the query token of context length
``n`` to the noiseless target ``f = <w*, x_q>``. Probes are fitted on the "probe" prompt
stream and scored on the "test" stream, so a probe's excess risk is an honest held-out
number on the same scale as the model's own risk.

One probe per (layer, n), not one per layer across n: the query representation at n = 2 and
at n = 20 need not be decoded the same way, and the paper probes per context length. The
regularisation is chosen per probe by efficient leave-one-out cross-validation on standardised
features: scikit-learn's ``StandardScaler`` + ``RidgeCV``, solved for every (layer, n) at once by
:func:`.ridge.ridge_cv` (checked against scikit-learn in ``tests/test_ridge.py``).

Pruned models are probed with their gates and, for mean/resample ablation, the replacement
head values (:mod:`.ablation`); fit and test prompts get different donor pairings.
:func:`final_readouts` (the model's own read-out and the probes after the last layer, before and
after the final LayerNorm, from one pass per prompt set) is what E3 uses to judge claim 2a;
:func:`final_probe_errors` computes one of those probes on its own (the notebook's, and the test's
independent reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..claims.keys import AblationKind, ModelKey, Variant, in_context_n_min
from ..config import ConfigError, Preset, TaskConfig
from ..io import write_csv, write_json, write_provenance
from ..evaluation import batches_with_cache
from ..metrics import curve_from_errors, squared_errors
from ..model import Transformer
from ..tasks import Prompts, fixed_prompts
from .ridge import ridge_cv

ALPHAS = np.logspace(-6, 6, 25)


def layer_names(n_layers: int) -> list[str]:
    """Cache names probed, in order: the read-in, then the residual stream after each block."""
    return ["embed"] + [f"blocks.{l}.resid_post" for l in range(n_layers)]


def layer_labels(n_layers: int) -> list[str]:
    return ["embed"] + [str(l + 1) for l in range(n_layers)]


@torch.no_grad()
def query_states(model: Transformer, prompts: Prompts, gates: torch.Tensor | None = None,
                 batch_size: int = 1024, values: torch.Tensor | None = None,
                 layers: Sequence[int] | None = None) -> np.ndarray:
    """Residual stream at the query tokens, ``(L + 1, P, N, D)`` float64 (``embed`` first).

    ``values``: head values for gated-off heads (see ``model``); ``layers``: indices into
    :func:`layer_names` to keep (default all), e.g. ``[-1]`` for the last layer only.
    """
    names = layer_names(model.cfg.n_layers)
    names = names if layers is None else [names[i] for i in layers]
    lay, _ = model.layout(prompts.x.shape[1], next(model.parameters()).device)
    out = [torch.stack([cache[nm][:, lay.query_index] for nm in names]).double().cpu()
           for _, cache in batches_with_cache(model, prompts, batch_size, gates, values)]
    return torch.cat(out, dim=1).numpy()


def probe_errors(fit_states: np.ndarray, fit_f: np.ndarray, test_states: np.ndarray,
                 alphas: np.ndarray = ALPHAS) -> tuple[np.ndarray, np.ndarray]:
    """Held-out predictions ``(L+1, P_test, N)`` and chosen alphas ``(L+1, N)`` of per-(layer, n) probes.

    ``fit_states``/``test_states`` are ``(L+1, P, N, D)`` from :func:`query_states`; ``fit_f``
    is ``(P_fit, N)``, the probe target at each query position.
    """
    n_layers, P, N, D = fit_states.shape
    stack = lambda s: np.swapaxes(s, 1, 2).reshape(n_layers * N, -1, D)  # noqa: E731  (L+1)*N problems
    fit = ridge_cv(stack(fit_states), np.broadcast_to(fit_f.T, (n_layers, N, P)).reshape(n_layers * N, P), alphas)
    pred = fit.predict(stack(test_states)).reshape(n_layers, N, -1)
    return np.swapaxes(pred, 1, 2), fit.alpha.reshape(n_layers, N)


def probe_layers(model: Transformer, fit_prompts: Prompts, test_prompts: Prompts, task: TaskConfig,
                 gates: torch.Tensor | None = None, alphas: np.ndarray = ALPHAS,
                 labels: dict[str, Any] | None = None, fit_values: torch.Tensor | None = None,
                 test_values: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """E4 on a loaded model: held-out probe excess risk per layer and n (tidy rows with 95% CIs).

    Rows carry ``layer`` (``embed``, ``1``..``L``), ``layer_index`` (0..L), ``n``, ``risk``,
    ``risk_norm``, ``ci_low``/``ci_high`` (normalised), ``alpha`` and any ``labels`` given.
    ``fit_values``/``test_values``: head values of gated-off heads on each prompt set.
    """
    _check_fit(fit_prompts)
    fit_s = query_states(model, fit_prompts, gates, values=fit_values)
    test_s = query_states(model, test_prompts, gates, values=test_values)
    pred, alpha = probe_errors(fit_s, fit_prompts.f.double().numpy(), test_s, alphas)
    names = layer_labels(model.cfg.n_layers)
    rows = []
    for l, name in enumerate(names):
        curve = curve_from_errors(squared_errors(torch.from_numpy(pred[l]), test_prompts.f), task)
        for r, a in zip(curve.rows(**(labels or {}), layer=name, layer_index=l), alpha[l]):
            rows.append({**r, "alpha": float(a)})
    return rows


def final_probe_errors(model: Transformer, fit_prompts: Prompts, test_prompts: Prompts,
                       gates: torch.Tensor | None = None, fit_values: torch.Tensor | None = None,
                       test_values: torch.Tensor | None = None, alphas: np.ndarray = ALPHAS,
                       after_ln: bool = False) -> np.ndarray:
    """Held-out squared errors ``(P_test, N)`` of the per-n probes after the last layer.

    ``after_ln``: probe the residual stream after the final LayerNorm, the basis the model's
    own read-out uses, instead of before it.
    """
    _check_fit(fit_prompts)
    fit_s = query_states(model, fit_prompts, gates, values=fit_values, layers=[-1])
    test_s = query_states(model, test_prompts, gates, values=test_values, layers=[-1])
    if after_ln:
        fit_s, test_s = final_norm(model, fit_s), final_norm(model, test_s)
    pred, _ = probe_errors(fit_s, fit_prompts.f.double().numpy(), test_s, alphas)
    return squared_errors(torch.from_numpy(pred[0]), test_prompts.f)


@torch.no_grad()
def _final_states(model: Transformer, prompts: Prompts, gates: torch.Tensor | None,
                  values: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: own predictions ``(P, N)``, and the last residual state at the queries before and
    after the final LayerNorm, each ``(1, P, N, D)`` float64."""
    lay, _ = model.layout(prompts.x.shape[1], next(model.parameters()).device)
    last = f"blocks.{model.cfg.n_layers - 1}.resid_post"
    pred, pre, post = [], [], []
    for p, cache in batches_with_cache(model, prompts, 1024, gates, values):
        pred.append(p.double().cpu())
        pre.append(cache[last][:, lay.query_index].double().cpu())
        post.append(cache["ln_final"].double().cpu())
    return tuple(torch.cat(t)[None].numpy() if i else torch.cat(t).numpy()  # type: ignore[return-value]
                 for i, t in enumerate((pred, pre, post)))


def final_readouts(model: Transformer, fit_prompts: Prompts, test_prompts: Prompts,
                   gates: torch.Tensor | None = None, fit_values: torch.Tensor | None = None,
                   test_values: torch.Tensor | None = None, alphas: np.ndarray = ALPHAS) -> dict[str, np.ndarray]:
    """Held-out squared errors ``(P_test, N)`` of the three read-outs E3 judges claim 2a by: the model's
    own (``model``) and the per-n probes after the last layer before (``probe``) and after (``probe_ln``)
    the final LayerNorm -- from one pass over each prompt set (the same numbers as :func:`.evaluation.predict`
    and :func:`final_probe_errors`)."""
    _check_fit(fit_prompts)
    _, fit_pre, fit_post = _final_states(model, fit_prompts, gates, fit_values)
    own, test_pre, test_post = _final_states(model, test_prompts, gates, test_values)
    f_fit = fit_prompts.f.double().numpy()
    out = {"model": squared_errors(torch.from_numpy(own), test_prompts.f)}
    for name, fs, ts in (("probe", fit_pre, test_pre), ("probe_ln", fit_post, test_post)):
        pred, _ = probe_errors(fs, f_fit, ts, alphas)
        out[name] = squared_errors(torch.from_numpy(pred[0]), test_prompts.f)
    return out


@torch.no_grad()
def final_norm(model: Transformer, states: np.ndarray) -> np.ndarray:
    """The model's final LayerNorm applied to residual states (float64 in and out)."""
    p = next(model.parameters())
    return model.ln_f(torch.from_numpy(states).to(p.device, p.dtype)).double().cpu().numpy()


def _check_fit(fit_prompts: Prompts) -> None:
    if fit_prompts.batch < 3:
        raise ConfigError(f"probe: need at least 3 fit prompts for cross-validation (got {fit_prompts.batch})")


def run_e4(ckpt: str | Path, out: str | Path, prune: str | None = None, compare: Sequence[str | Path] = (),
           preset: Preset | str | None = None, n_prompts: int | None = None, seed: int | None = None,
           device: str = "cpu", ablations: str | Sequence[str] = ("zero",)) -> dict[str, Any]:
    """E4: probes for the model in ``ckpt``, its pruned version (``prune`` policy) and ``compare`` models.

    ``prune="default"`` means all heads in layer 1, the top head in every later layer; heads are
    ranked by E2 importance on "val" prompts, under each ablation kind in ``ablations``, and the
    pruned heads are ablated the same way (model label ``h=H pruned``, plus `` (mean)`` /
    `` (resample)`` for those kinds). All models are probed on the same prompts.
    """
    from ..evaluation import evaluate
    from .ablation import REFERENCE_STREAM, make_ablations, parse_ablations
    from .heads import assess_heads_kinds, default_policy, load_for_analysis, parse_policy, prune_gates

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
    policy = None
    if prune is not None:
        policy = default_policy(model.cfg.n_layers) if prune == "default" else prune
        abls = make_ablations(model, kinds, pre.task, n, seed)
        imps = assess_heads_kinds(model, fixed_prompts(pre.task, n, seed, "val"), pre.task, list(abls.values()),
                                  n_min=in_context_n_min(pre.task.d), keep=False)  # ranked as E3 ranks them
        for kind, abl in abls.items():
            label = ModelKey(model.cfg.n_heads, Variant.PRUNED, AblationKind(kind)).e4_label
            runs.append((label, model, prune_gates(imps[kind], policy), abl.repaired(seed + 1).values(n), abl.values(n),
                         str(ckpt)))
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
    summary = dict(checkpoint=str(ckpt), compare=[str(c) for c in compare], prune_policy=policy,
                   ablations=list(kinds), reference_stream=REFERENCE_STREAM,
                   gates=gates_used, n_fit=n, n_test=n, fit_stream="probe", test_stream="test",
                   probe="one RidgeCV per (layer, n) on standardised features",
                   mean_probe_risk_norm=_mean_by_layer(rows))
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E4", checkpoint=str(ckpt), compare=[str(c) for c in compare],
                     prune_policy=policy, alphas=ALPHAS, ablations=list(kinds), reference_stream=REFERENCE_STREAM)
    return summary


def _mean_by_layer(rows: list[dict[str, Any]], n_min: int = 1) -> dict[str, dict[str, float]]:
    """Per model and layer: normalised probe risk averaged over ``n >= n_min``."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["n"] >= n_min:
            acc.setdefault(r["model"], {}).setdefault(str(r["layer"]), []).append(r["risk_norm"])
    return {m: {l: float(np.mean(v)) for l, v in d.items()} for m, d in acc.items()}


def plot_probes(rows: list[dict[str, Any]], path: str | Path, title: str, n_min: int = 1) -> Path:
    """Left: probe risk vs layer (mean over n >= n_min), one line per model. Then one panel per
    layer (probe risk vs n) and a last panel with the models' own outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    layers = sorted({(r["layer_index"], str(r["layer"])) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.0 * (len(layers) + 1), 3.4), squeeze=False)
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
    out = save_figure(fig, path)
    plt.close(fig)
    return out
