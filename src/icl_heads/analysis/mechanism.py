"""E6: is the trained transformer running preprocess-then-optimise? (SPEC section 5, E6a-E6c).

**E6a, preprocessing readout.** Linear decoders (standardise + ``RidgeCV``, one alpha per
output) map the residual stream after block 0 (``blocks.0.hook_resid_post``) at the context
tokens to the preprocessed features ``r_j x_ij``. With the causal prefix mask, context
token ``i`` only sees examples ``0..i``, so the natural target uses ``r`` of that prefix,
``r^(i) = (1/(i+1)) sum_{k<=i} y_k x_k`` (``pto_prefix``); ``r`` of the whole context
(``pto_full``) is reported too (it is the right target for the full-mask construction of
E6c). Controls: ``x_ij`` (the skip connection carries it, so a positive control) and
``y_i x_ij`` (a product without the context average). The same decoders from the read-in
(``embed``) show what layer 1 adds. Decoders are fitted on the "probe" prompt stream,
pooled over context positions, and scored (R^2) on the "test" stream.

**E6b, optimisation readout.** For every layer ``l`` the prediction at the query tokens is
read out two ways: ``probe`` (a ridge probe per context length ``n`` from the residual
stream after block ``l-1`` to ``<w*, x_q>``, fitted on "probe" prompts, as in E4) and
``lens`` (the model's own final norm and read-out applied to that residual stream; at
``l = L`` it is the model's prediction). For ``l >= 2`` the readout is compared with PtO
and with plain GD after ``t = l - 1`` steps from :mod:`icl_heads.estimators` (each with a
fixed and a scale-free step rule). The step size is fitted per ``(n, t)`` on "val"
prompts in two ways: ``risk`` (the algorithm's own best excess risk, as a stand-alone
estimator) and ``match`` (the step that best matches that readout, the most favourable
choice for each algorithm). On "test" prompts we report the relative error
``E[(readout - alg)^2] / E[readout^2]`` (normalised by the readout, so it is comparable
across algorithms and step sizes), the Pearson correlation over prompts, and the
disagreement ``E[(readout - alg)^2] / (s tau^2)`` on the normalised-risk scale.
:func:`verdicts` pits the best PtO variant against the best GD variant for all n, ``n <= d``
and ``n > d``, with a paired-bootstrap CI over test prompts.

Caveat, measured on the construction: a linear ``probe`` is a weak test of *which* algorithm
a layer runs. Once layer 1 has written ``r_j x_qj`` at the query, a probe can sum them into
``<r, x_q>``, which *is* one GD step; so on the exact-PtO construction the layer-2 probe tracks
GD better than PtO, while ``lens`` recovers PtO exactly. Read the two readouts together.

Context (:func:`final_output_any_t`): the model's final prediction is also matched against
every algorithm at any ``T`` in a grid, to see whether it looks like few steps, many, or neither.

**E6c.** :func:`construct_deviation` checks the hand-built transformer of :mod:`icl_heads.analysis.construct`
against ``estimators.pto``/``pto_groups`` with the fixed step.

No file is read or written here: :mod:`icl_heads.experiments.e6_mechanism` is the runner (CLI,
``reproduce``) that loads checkpoints, writes the CSVs, figures and summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import r2_score

from ..config import TaskConfig
from .construct import pto_transformer
from ..estimators import FAMILIES, RIDGE_LAMBDAS, SCALE_FREE_CS, group_slices, pto, pto_groups
from ..evaluation import batches_with_cache
from ..model import Transformer, act_name
from ..tasks import Prompts, fixed_prompts
from .ridge import RidgeFit, ridge_cv

ALPHAS = np.logspace(-8, 4, 25)
FEATURE_TARGETS = ("pto_prefix", "pto_full", "yx", "x")
SOURCES = ("embed", "layer1")
READOUTS = ("probe", "lens")
ETA_FITS = ("match", "risk")
# Step-size grids for E6b. Wider than E5's tuning grids on purpose: with t <= L - 1 steps nothing
# needs to converge, so c > 2 (scale-free) or large fixed steps are legitimate few-step filters.
ETA_GRID = [float(10.0**e) for e in np.arange(-4.0, 1.001, 0.125)]  # fixed step sizes
C_GRID = [float(10.0**e) for e in np.arange(-2.5, 0.7501, 0.125)]  # scale-free: step c / lambda_max


@dataclass(frozen=True)
class Algorithm:
    """One comparison algorithm: an ``estimators`` family with one step rule and its grid."""

    name: str
    family: str  # key of estimators.FAMILIES
    step: str  # "fixed" | "scale_free"
    grid: tuple[float, ...]

    @property
    def key(self) -> str:
        return "c" if self.step == "scale_free" else "eta"

    @property
    def kind(self) -> str:
        return "pto" if self.family == "pto" else "gd"


ALGORITHMS = {a.name: a for a in (
    Algorithm("pto_scale_free", "pto", "scale_free", tuple(C_GRID)),
    Algorithm("pto_fixed", "pto", "fixed", tuple(ETA_GRID)),
    Algorithm("gd_scale_free", "gd", "scale_free", tuple(C_GRID)),
    Algorithm("gd_fixed", "gd", "fixed", tuple(ETA_GRID)),
)}


GD_MANY_T = 100
BASELINES = {  # name -> (step rule, grid): competent estimators beside PtO(l-1) and GD(l-1) in E6b
    "ridge": ("lambda", tuple(RIDGE_LAMBDAS)),  # E5's grids
    "gd_many": ("scale_free", tuple(SCALE_FREE_CS)),  # T = GD_MANY_T steps
}


def baseline_paths(task: TaskConfig, prompts: Prompts, cache: PathCache | None = None) -> dict[str, np.ndarray]:
    """``name -> (len(grid), B, N)`` predictions of ridge (over lambda) and of GD with ``GD_MANY_T`` steps."""
    key = (id(prompts), "baselines")
    if cache is not None and key in cache:
        return cache[key]
    x, y, w = prompts.x.double(), prompts.y.double(), prompts.w.double()
    out = {"ridge": FAMILIES["ridge"](task, [1]).predict(x, y, w, [{"lambda": l} for l in BASELINES["ridge"][1]]).numpy(),
           "gd_many": FAMILIES["gd"](task, [GD_MANY_T]).predict(
               x, y, w, [{"step": "scale_free", "c": c, "T": GD_MANY_T} for c in BASELINES["gd_many"][1]]).numpy()}
    if cache is not None:
        cache[key] = out
    return out


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """What E6 reads from one model on one prompt set (float64 numpy, CPU).

    ``context``: ``{"embed", "layer1"} -> (B, C, D)`` at the context tokens (examples ``ctx_pos``);
    ``query``: ``(L, B, Q, D)`` residual stream after each block at the query tokens;
    ``lens``: ``(L, B, Q)`` final norm + read-out of those; ``q_pos``/``q_n``: the example each
    query predicts and its context length.
    """

    context: dict[str, np.ndarray]
    query: np.ndarray
    lens: np.ndarray
    ctx_pos: np.ndarray
    q_pos: np.ndarray
    q_n: np.ndarray


@torch.no_grad()
def activations(model: Transformer, prompts: Prompts, batch_size: int = 500) -> Activations:
    """Run ``model`` (in its own dtype, float64 for the construction) and collect E6's activations."""
    lay, _ = model.token_layout(prompts.x.shape[1], next(model.parameters()).device)
    L = model.cfg.n_layers
    ctx, qry, lens = {s: [] for s in SOURCES}, [], []
    post = [act_name("resid_post", l) for l in range(L)]
    for _, cache in batches_with_cache(model, prompts, batch_size, names=[act_name("resid_pre", 0)] + post):
        ctx["embed"].append(cache[act_name("resid_pre", 0)][:, lay.context_index].double().cpu())
        ctx["layer1"].append(cache[post[0]][:, lay.context_index].double().cpu())
        q = torch.stack([cache[name][:, lay.query_index] for name in post])
        qry.append(q.double().cpu())
        lens.append(model.read_out(model.ln_f(q)).squeeze(-1).double().cpu())
    return Activations({k: torch.cat(v).numpy() for k, v in ctx.items()}, torch.cat(qry, 1).numpy(),
                       torch.cat(lens, 1).numpy(), lay.position[lay.context_index].cpu().numpy(),
                       lay.position[lay.query_index].cpu().numpy(), lay.query_n.cpu().numpy())


def _decoder(X: np.ndarray, Y: np.ndarray) -> RidgeFit:
    """Standardise + RidgeCV (efficient leave-one-out, one alpha per output column) as one batched fit."""
    return ridge_cv(X[None], Y[None], ALPHAS, alpha_per_target=True)


# ----------------------------------------------------------------------------------------------
# E6a
# ----------------------------------------------------------------------------------------------


def feature_targets(x: np.ndarray, y: np.ndarray, ctx_pos: np.ndarray, heads: int | None = None) -> dict[str, np.ndarray]:
    """E6a targets ``(B, C, d)`` at the context examples ``ctx_pos`` (see the module docstring).

    With ``heads = h < d`` also the h-group PtO features ``f_k = sum_{j in G_k} r_j x_j``
    (``(B, C, h)``, contiguous groups as in ``estimators.pto_groups``): what h heads can compute,
    so a model with h < d heads is not asked for ``diag(r) x``, which it cannot represent.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x[:, ctx_pos], y[:, ctx_pos]
    yx = yc[..., None] * xc
    r_prefix = np.cumsum(yx, axis=1) / np.arange(1, len(ctx_pos) + 1)[None, :, None]
    r_full = yx.mean(axis=1, keepdims=True)
    out = {"pto_prefix": r_prefix * xc, "pto_full": r_full * xc, "yx": yx, "x": xc}
    if heads is not None and heads < x.shape[-1]:
        groups = group_slices(x.shape[-1], heads)
        for k in ("pto_prefix", "pto_full"):
            out[f"{k}_groups"] = np.stack([out[k][..., g].sum(-1) for g in groups], axis=-1)
    return out


DIRECTION_R2 = 0.5  # a preprocessed direction counts as carried by layer 1 if decodable with R^2 >= 0.5


def decodable_directions(truth: np.ndarray, pred: np.ndarray, cutoff: float = DIRECTION_R2) -> tuple[int, np.ndarray]:
    """How many independent directions of a multi-output target are decodable with R^2 >= ``cutoff``.

    For a direction u of the target space, ``R^2(u) = 1 - u'Eu / u'Su`` with S the target covariance
    and E the residual covariance; the generalised eigenvalues of (E, S) give the R^2 of a complete
    set of S-orthogonal directions, best first. The count is the rank of the decodable subspace.
    """
    from scipy.linalg import eigh

    t = truth - truth.mean(0)
    e = (truth - pred) - (truth - pred).mean(0)
    S, E = t.T @ t / len(t), e.T @ e / len(e)
    lam = eigh(E, S + 1e-12 * np.trace(S) * np.eye(S.shape[0]), eigvals_only=True)
    r2 = np.sort(1 - lam)[::-1]
    return int((r2 >= cutoff).sum()), r2


def preprocessing_readout(probe_acts: Activations, probe: Prompts, test_acts: Activations, test: Prompts,
                          heads: int | None = None, **labels: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """E6a rows: R^2 per (source, target, feature) incl. ``feature="mean"``, per context position, and
    ``feature="directions"`` (``r2`` = the number of decodable directions, :func:`decodable_directions`,
    for the d-dimensional ``pto_*`` targets). ``heads``: add the h-group targets (:func:`feature_targets`)."""
    t_fit = feature_targets(probe.x.numpy(), probe.y.numpy(), probe_acts.ctx_pos, heads)
    t_test = feature_targets(test.x.numpy(), test.y.numpy(), test_acts.ctx_pos, heads)
    rows, by_pos = [], []
    widths = [t.shape[-1] for t in t_fit.values()]
    edges = np.cumsum([0] + widths)
    for src in SOURCES:
        A_fit, A_test = probe_acts.context[src], test_acts.context[src]
        B, C, D = A_test.shape
        # one decoder fit for every target's columns: one eigendecomposition of the source's features,
        # and each column keeps its own alpha, so this is the per-target fit done once
        Y = np.concatenate([t.reshape(-1, t.shape[-1]) for t in t_fit.values()], axis=1)
        dec = _decoder(A_fit.reshape(-1, D), Y)
        pred_all = dec.predict(A_test.reshape(1, -1, D))[0]
        for i, tgt in enumerate(t_fit):
            d = widths[i]
            pred = pred_all[:, edges[i]:edges[i + 1]].reshape(B, C, d)
            truth = t_test[tgt]
            r2 = r2_score(truth.reshape(-1, d), pred.reshape(-1, d), multioutput="raw_values")
            alphas = dec.alpha[0, edges[i]:edges[i + 1]]
            for j in range(d):
                rows.append(dict(labels, source=src, target=tgt, feature=str(j), r2=float(r2[j]),
                                 alpha=float(alphas[j])))
            rows.append(dict(labels, source=src, target=tgt, feature="mean", r2=float(r2.mean()),
                             alpha=float("nan")))
            if tgt in ("pto_prefix", "pto_full"):
                k, _ = decodable_directions(truth.reshape(-1, d), pred.reshape(-1, d))
                rows.append(dict(labels, source=src, target=tgt, feature="directions", r2=float(k), alpha=float("nan")))
            for c in range(C):
                r2c = r2_score(truth[:, c], pred[:, c], multioutput="raw_values")
                by_pos.append(dict(labels, source=src, target=tgt, position=int(test_acts.ctx_pos[c]),
                                   r2=float(r2c.mean())))
    return rows, by_pos


# ----------------------------------------------------------------------------------------------
# E6b
# ----------------------------------------------------------------------------------------------


def readouts(probe_acts: Activations, probe: Prompts, others: Sequence[Activations]) -> list[dict[str, np.ndarray]]:
    """Per prompt set in ``others``: ``{"probe": (L, B, Q), "lens": (L, B, Q)}`` predictions."""
    L, P, Q, D = probe_acts.query.shape
    target = probe.f.double().numpy()[:, probe_acts.q_pos]  # (B, Q)
    stack = lambda a: a.transpose(0, 2, 1, 3).reshape(L * Q, -1, D)  # noqa: E731  one probe per (layer, query)
    dec = ridge_cv(stack(probe_acts.query), np.broadcast_to(target.T, (L, Q, P)).reshape(L * Q, P), ALPHAS)
    return [{"probe": dec.predict(stack(o.query)).reshape(L, Q, -1).transpose(0, 2, 1), "lens": o.lens}
            for o in others]


PathCache = dict  # (id(prompts), steps, algorithm name) -> predictions; see algorithm_paths


def algorithm_paths(task: TaskConfig, prompts: Prompts, steps: Sequence[int], algorithms: Sequence[Algorithm],
                    cache: PathCache | None = None) -> dict[str, np.ndarray]:
    """``name -> (len(grid), len(steps), B, N)`` predictions of each algorithm for every step size and step.

    The paths depend on the prompts only, not on the model: ``cache`` (one dict per prompt set's
    lifetime, e.g. one ``run_e6`` call) lets every model analysed on the same prompts reuse them,
    which halves E6 for a multi-head + single-head pair.
    """
    out = {}
    todo: dict[str, list[Algorithm]] = {}  # family -> algorithms not cached: one predict call per family
    for alg in algorithms:
        key = (id(prompts), tuple(steps), alg.name)
        if cache is not None and key in cache:
            out[alg.name] = cache[key]
        else:
            todo.setdefault(alg.family, []).append(alg)
    for family, algs in todo.items():
        fam = FAMILIES[family](task, list(steps))  # its step rules share one spectrum per prompt block
        combos = [{"step": a.step, a.key: e, "T": t} for a in algs for e in a.grid for t in steps]
        pred = fam.predict(prompts.x.double(), prompts.y.double(), prompts.w.double(), combos).numpy()
        start = 0
        for alg in algs:
            size = len(alg.grid) * len(steps)
            out[alg.name] = pred[start:start + size].reshape(len(alg.grid), len(steps), *pred.shape[1:])
            start += size
            if cache is not None:
                cache[(id(prompts), tuple(steps), alg.name)] = out[alg.name]
    return {a.name: out[a.name] for a in algorithms}


def _nan_to_inf(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, np.inf)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def optimisation_readout(task: TaskConfig, val: Prompts, test: Prompts, val_acts: Activations,
                         test_acts: Activations, val_reads: dict[str, np.ndarray], test_reads: dict[str, np.ndarray],
                         algorithms: Sequence[Algorithm] | None = None, n_min: int = 1,
                         detail: dict[tuple, tuple[np.ndarray, np.ndarray]] | None = None,
                         cache: PathCache | None = None, baselines: bool = True,
                         **labels: Any) -> list[dict[str, Any]]:
    """E6b rows: for layers ``l >= 2``, each readout vs each algorithm after ``l - 1`` steps, per n.

    With ``baselines``, also vs the competent alternatives of :data:`BASELINES` (ridge, and GD with
    many steps), the same at every layer, so "closer to PtO(l-1)" can be read against them.

    ``detail``, if given, receives per-prompt ``(readout - alg)^2`` and ``readout^2`` arrays
    ``(B, n values)`` and the n values, keyed by ``(model, readout, layer, algorithm, eta_fit)``,
    for :func:`verdicts`.
    """
    algorithms = list(ALGORITHMS.values()) if algorithms is None else list(algorithms)
    L = test_acts.query.shape[0]
    if L < 2:
        return []
    steps = list(range(1, L))
    norm = task.s * task.tau**2
    cols = test_acts.q_pos
    paths_val = {k: v[..., cols] for k, v in algorithm_paths(task, val, steps, algorithms, cache).items()}
    paths_test = {k: v[..., cols] for k, v in algorithm_paths(task, test, steps, algorithms, cache).items()}
    f_val, f_test = val.f.double().numpy()[:, cols], test.f.double().numpy()[:, cols]
    base_val = {k: v[..., cols] for k, v in baseline_paths(task, val, cache).items()} if baselines else {}
    base_test = {k: v[..., cols] for k, v in baseline_paths(task, test, cache).items()} if baselines else {}
    rows = []
    for ro in READOUTS:
        for l in range(2, L + 1):
            t = l - 1
            r_val, r_test = val_reads[ro][l - 1], test_reads[ro][l - 1]  # (B, Q)
            compared = [(alg.name, alg.kind, alg.step, alg.grid, paths_val[alg.name][:, t - 1],
                         paths_test[alg.name][:, t - 1]) for alg in algorithms]  # (E, B, Q) each
            compared += [(b, "baseline", BASELINES[b][0], BASELINES[b][1], base_val[b], base_test[b]) for b in base_val]
            for name, kind, rule, grid, a_val, a_test in compared:
                with np.errstate(over="ignore", invalid="ignore"):
                    crit = {"risk": _nan_to_inf(((a_val - f_val[None]) ** 2).mean(1)),
                            "match": _nan_to_inf(((a_val - r_val[None]) ** 2).mean(1))}  # (E, Q)
                for fit in ETA_FITS:
                    best = crit[fit].argmin(0)
                    if detail is not None:
                        keep = test_acts.q_n >= n_min
                        a_best = a_test[best, :, np.arange(len(best))].T  # (B, Q)
                        detail[(labels.get("model"), ro, l, name, fit)] = (
                            ((r_test - a_best) ** 2)[:, keep], (r_test**2)[:, keep], test_acts.q_n[keep])
                    for q, n in enumerate(test_acts.q_n):
                        if n < n_min:
                            continue
                        a, r, f = a_test[best[q], :, q], r_test[:, q], f_test[:, q]
                        diff = float(((r - a) ** 2).mean())
                        rows.append(dict(labels, readout=ro, layer=l, steps=t, algorithm=name, kind=kind,
                                         eta_fit=fit, n=int(n), step_rule=rule,
                                         step_size=grid[best[q]],
                                         rel_err=diff / float((r**2).mean()) if (r**2).mean() > 0 else float("inf"),
                                         corr=_corr(r, a), disagree_norm=diff / norm,
                                         readout_risk_norm=float(((r - f) ** 2).mean()) / norm,
                                         alg_risk_norm=float(((a - f) ** 2).mean()) / norm))
    return rows


def summarise_e6b(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, readout, layer, algorithm, eta_fit): mean over n of rel_err, corr, disagreement."""
    keys = ("model", "readout", "layer", "steps", "algorithm", "kind", "eta_fit")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for k, rs in groups.items():
        m = {c: float(np.mean([r[c] for r in rs])) for c in ("rel_err", "corr", "disagree_norm",
                                                              "readout_risk_norm", "alg_risk_norm")}
        out.append(dict(zip(keys, k), n_values=len(rs), **{f"mean_{c}": v for c, v in m.items()}))
    return out


def _rel_err(sq: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Mean over n of ``sum_b sq / sum_b r2``; works on bootstrap stacks ``(..., B, Q)``."""
    return (sq.sum(-2) / r2.sum(-2)).mean(-1)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``(R, n)`` multiplicities of each row in each bootstrap resample ``idx (R, n)``."""
    R = idx.shape[0]
    flat = (np.arange(R)[:, None] * n + idx).ravel()  # one bincount, not np.add.at (30x slower)
    return np.bincount(flat, minlength=R * n).reshape(R, n).astype(np.float64)


def n_ranges(d: int, n_max: int) -> dict[str, tuple[int, int]]:
    """The context-length ranges verdicts are given for: all, ``n <= d`` and ``n > d`` (where PtO's edge differs)."""
    out = {"all": (1, n_max), f"n<={d}": (1, d)}
    if n_max > d:
        out[f"n>{d}"] = (d + 1, n_max)
    return out


def verdicts(detail: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]], d: int, n_boot: int = 1000,
             seed: int = 0) -> list[dict[str, Any]]:
    """Per (model, readout, layer, eta_fit, n range): the best PtO variant vs the best GD variant.

    ``detail`` comes from :func:`optimisation_readout`. Within each n range the variant with the
    lowest mean relative error is chosen per kind; a paired bootstrap over test prompts gives a
    95% CI for ``gd_rel_err - pto_rel_err`` (> 0: the readout is closer to PtO). ``tracks`` is
    ``"neither"`` when both errors are >= 1 (no closer than predicting 0), ``"tie"`` when the CI
    contains 0, else the algorithm with the lower error.
    """
    groups: dict[tuple, dict[str, tuple]] = {}
    for (model, ro, layer, alg, fit), v in detail.items():
        groups.setdefault((model, ro, layer, fit), {})[alg] = v
    rng = np.random.default_rng(seed)
    out = []
    for (model, ro, layer, fit), algs in groups.items():
        n_all = next(iter(algs.values()))[2]
        for name, (lo_n, hi_n) in n_ranges(d, int(n_all.max())).items():
            cols = (n_all >= lo_n) & (n_all <= hi_n)
            if not cols.any():
                continue
            err = {a: float(_rel_err(sq[:, cols], r2[:, cols])) for a, (sq, r2, _) in algs.items()}
            best = {kind: min((a for a in err if a not in BASELINES and ALGORITHMS.get(a, _kind_of(a)).kind == kind),
                              key=err.get, default=None) for kind in ("pto", "gd")}
            if best["pto"] is None or best["gd"] is None:
                continue
            (sp, rp, _), (sg, rg, _) = algs[best["pto"]], algs[best["gd"]]
            sp, rp, sg, rg = (a[:, cols] for a in (sp, rp, sg, rg))
            diff = err[best["gd"]] - err[best["pto"]]
            boots = []
            for i in range(0, n_boot, 100):
                idx = rng.integers(0, sp.shape[0], size=(min(100, n_boot - i), sp.shape[0]))
                c = _counts(idx, sp.shape[0])  # a resample's sums are its counts times the rows
                boots.append((c @ sg / (c @ rg)).mean(-1) - (c @ sp / (c @ rp)).mean(-1))
            lo, hi = np.quantile(np.concatenate(boots), [0.025, 0.975])
            if min(err[best["pto"]], err[best["gd"]]) >= 1:
                tracks = "neither"
            elif lo <= 0 <= hi:
                tracks = "tie"
            else:
                tracks = "pto" if diff > 0 else "gd"
            out.append(dict(model=model, readout=ro, layer=layer, eta_fit=fit, n_range=name,
                            best_pto=best["pto"], pto_rel_err=err[best["pto"]], best_gd=best["gd"],
                            gd_rel_err=err[best["gd"]], diff=diff, diff_ci_low=float(lo), diff_ci_high=float(hi),
                            tracks=tracks, **_baseline_columns(err, best["pto"])))
    return out


def _baseline_columns(err: dict[str, float], pto: str) -> dict[str, Any]:
    """Relative error of each competent baseline present, and whether PtO(l-1) is closer than all of them."""
    cols: dict[str, Any] = {f"{b}_rel_err": err[b] for b in BASELINES if b in err}
    if cols:
        cols["pto_closer_than_baselines"] = all(err[pto] < v for v in cols.values())
    return cols


def _kind_of(name: str) -> Algorithm:
    """Kind of an algorithm not in :data:`ALGORITHMS` (tests pass custom grids under other names)."""
    return Algorithm(name, "pto" if name.startswith("pto") else "gd", "fixed", ())


FINAL_T_GRID = (1, 2, 3, 5, 10, 20, 50, 100, 200, 400)


def final_output_any_t(task: TaskConfig, val: Prompts, test: Prompts, val_pred: np.ndarray, test_pred: np.ndarray,
                       q_pos: np.ndarray, q_n: np.ndarray, T_grid: Sequence[int] = FINAL_T_GRID,
                       algorithms: Sequence[Algorithm] | None = None, n_min: int = 1,
                       cache: PathCache | None = None, **labels: Any) -> list[dict[str, Any]]:
    """Context for E6b: how close the model's *final* prediction comes to each algorithm at any T.

    The step size is matched per n on "val" (as ``eta_fit="match"``); rows give the mean over n of
    the relative error and correlation on "test" for every T, so one can see whether the output
    looks like few steps, many steps, or neither.
    """
    algorithms = list(ALGORITHMS.values()) if algorithms is None else list(algorithms)
    keep = q_n >= n_min
    rows = []
    chunks = [list(T_grid[i:i + 2]) for i in range(0, len(T_grid), 2)]  # bounds memory on large presets
    for alg, Ts in ((a, c) for a in algorithms for c in chunks):
        with np.errstate(over="ignore", invalid="ignore"):  # fixed steps diverge at large T: inf, never chosen
            p_val = algorithm_paths(task, val, Ts, [alg], cache)[alg.name][..., q_pos]  # (E, S, B, Q)
            p_test = algorithm_paths(task, test, Ts, [alg], cache)[alg.name][..., q_pos]
            for i, T in enumerate(Ts):
                best = _nan_to_inf(((p_val[:, i] - val_pred[None]) ** 2).mean(1)).argmin(0)
                a = p_test[best, i, :, np.arange(len(best))].T  # (B, Q)
                rel = ((test_pred - a) ** 2).mean(0) / (test_pred**2).mean(0)
                corr = [_corr(test_pred[:, q], a[:, q]) for q in range(len(q_n))]
                rows.append(dict(labels, algorithm=alg.name, kind=alg.kind, T=int(T),
                                 mean_rel_err=float(rel[keep].mean()),
                                 mean_corr=float(np.mean(np.asarray(corr)[keep]))))
    return rows


# ----------------------------------------------------------------------------------------------
# E6c
# ----------------------------------------------------------------------------------------------

E6C_SETTINGS = (  # (d, h, a, T, n, eta): h = d is PtO, h < d grouped PtO; eta small enough not to diverge
    (5, 5, 0.0, 1, 8, 0.1), (5, 5, 0.0, 3, 4, 0.1), (10, 10, 0.0, 2, 20, 0.1), (10, 10, 0.0, 4, 6, 0.05),
    (10, 2, 0.0, 3, 20, 0.1), (10, 4, 0.3, 2, 12, 0.1), (8, 3, 1.0, 4, 10, 0.05), (6, 1, 0.0, 2, 5, 0.1),
)


def construct_deviation(d: int, h: int, a: float, T: int, n: int, eta: float, batch: int = 200,
                        seed: int = 0, s: int = 2, sigma: float = 0.1) -> dict[str, Any]:
    """Max |construct - PtO| (``h = d``) or |construct - grouped PtO| on sparse-regression prompts."""
    task = TaskConfig(d=d, s=min(s, d), sigma=sigma, n_max=n)
    p = fixed_prompts(task, batch, seed, "test")
    model = pto_transformer(d, T, eta, groups=h, a=a)
    with torch.no_grad():
        got = model(p.x, p.y)[:, 0]
    if h == d and a == 0:
        ref, name = pto(p.x, p.y, T, eta, step="fixed")[:, n], "pto"
    else:
        ref, name = pto_groups(p.x, p.y, h, a, T, eta, step="fixed")[:, n], "pto_groups"
    dev = (got - ref).abs().max().item()
    return dict(d=d, h=h, a=a, T=T, n=n, eta=eta, reference=name, n_layers=model.cfg.n_layers,
                d_model=model.cfg.d_model, prompts=batch, max_abs_dev=dev,
                max_rel_dev=dev / max(ref.abs().max().item(), 1e-300), max_abs_pred=ref.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def analyse_model(model: Transformer, task: TaskConfig, probe: Prompts, val: Prompts, test: Prompts,
                  label: str, algorithms: Sequence[Algorithm] | None = None,
                  cache: PathCache | None = None, with_any_t: bool = True) -> dict[str, list[dict[str, Any]]]:
    """E6a and E6b for one model; ``label`` names it in every row (column ``model``).

    Pass the same ``cache`` for every model scored on these prompts (see :func:`algorithm_paths`).
    """
    acts = {k: activations(model, p) for k, p in (("probe", probe), ("val", val), ("test", test))}
    r2, r2_pos = preprocessing_readout(acts["probe"], probe, acts["test"], test, heads=model.cfg.n_heads, model=label)
    val_reads, test_reads = readouts(acts["probe"], probe, [acts["val"], acts["test"]])
    detail: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    agree = optimisation_readout(task, val, test, acts["val"], acts["test"], val_reads, test_reads,
                                 algorithms, detail=detail, cache=cache, model=label)
    L = model.cfg.n_layers
    any_t = [] if not with_any_t else final_output_any_t(task, val, test, val_reads["lens"][L - 1], test_reads["lens"][L - 1],
                               acts["test"].q_pos, acts["test"].q_n, algorithms=algorithms, cache=cache,
                               model=label)
    return {"r2": r2, "r2_position": r2_pos, "agreement": agree, "final_any_t": any_t, "detail": detail}
