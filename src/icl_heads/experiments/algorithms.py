"""E5: the estimators of SPEC section 4 on the preset's task — risk vs n, vs T, and PtO with h groups.

Outputs (in ``out``):

* ``e5_risk.csv`` — ``estimator, n, risk, risk_norm, ci_low, ci_high, hparams`` for n = 1..n_max,
  every estimator tuned per n on validation prompts; ``e5_risk.png`` (normalised risk, log y, 95% bands).
  Tuning rejects any step that is unstable on a validation prompt, and a tuned step that is unstable
  on a test prompt is clipped there (:meth:`icl_heads.estimators.Spectrum.step_size`), so no tuned
  estimator diverges; ``config.json`` counts the clipped test prompts;
* ``e5_vs_T.csv/png`` — GD and PtO (and the other PtO step rules, if selected) at a fixed number of
  steps T for every T of ``eval.pto_steps``, the step size re-tuned per (T, n), at n in {d/2, d, 2d};
* ``e5_groups.csv/png`` — PtO with h contiguous groups, h = 1..d, at the same n: ``pto_groups`` tunes
  (a, c, T), ``pto_groups_a0`` keeps a = 0 (so h = 1 is one GD step and h = d is PtO);
* ``e5_risk_sigma{σ}.csv/png`` — the main table again for each extra noise level of ``preset.sigmas``
  (fresh prompts of the same seed with that sigma; the vs-T and groups sweeps use the main sigma only);
* ``config.json`` — resolved config, environment, grids, the chosen hyper-parameters and timings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import estimators as E
from ..config import Preset
from ..io import save_figure, write_csv, write_provenance
from ..metrics import curve_from_errors
from ..plotting import display_rows, new_figure, risk_vs_n
from ..tasks import Prompts

RISK_COLUMNS = ("estimator", "n", "risk", "risk_norm", "ci_low", "ci_high", "hparams")
VS_T_FAMILIES = ("gd", "pto", "pto_normalized", "pto_fixed")
STYLES: dict[str, dict[str, Any]] = {
    "zero": dict(color="0.6", ls=":"), "ols": dict(color="tab:gray"), "ridge": dict(color="tab:blue"),
    "lasso": dict(color="tab:cyan"), "gd": dict(color="tab:green"), "pto": dict(color="tab:red", lw=2.2),
    "pto_normalized": dict(color="tab:orange", ls="--"), "pto_fixed": dict(color="tab:brown", ls="--"),
    "oracle_ls": dict(color="tab:purple", ls="-."), "bayes": dict(color="black", lw=2.2),
}


PLOT_OMIT: tuple[str, ...] = ()  # estimators kept out of the risk figures (in the CSVs); none since the step guard


def analysis_ns(preset: Preset) -> list[int]:
    """Context lengths of the vs-T and groups sweeps: d/2, d and 2d, those within 1..n_max."""
    d, n_max = preset.task.d, preset.task.n_max
    return sorted({n for n in (max(1, d // 2), d, 2 * d) if 1 <= n <= n_max})


def _rows(name: str, pred: torch.Tensor, f: torch.Tensor, preset: Preset, hp: Sequence[dict],
          ns: Sequence[int], **labels: Any) -> list[dict[str, Any]]:
    """Tidy rows for the columns of ``pred`` (B, len(ns)) that are context lengths ``ns``."""
    with np.errstate(over="ignore", invalid="ignore"):  # diverged fixed-step runs: inf risk is the honest value
        curve = curve_from_errors(((pred - f) ** 2).numpy(), preset.task)
    rows = []
    for j, r in enumerate(curve.rows()):
        rows.append(dict(estimator=name, **labels, n=int(ns[j]), risk=r["risk"], risk_norm=r["risk_norm"],
                         ci_low=r["ci_low"], ci_high=r["ci_high"], hparams=json.dumps(hp[j], sort_keys=True)))
    return rows


def risk_table(preset: Preset, names: Sequence[str], prompts: tuple[Prompts, Prompts] | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, dict[int, int]]]:
    """Main E5 rows (n = 1..n_max) for ``names``, the seconds each estimator took (tuning + test), and
    per estimator ``{n: test prompts whose tuned step the guard clipped}`` (only n where it did)."""
    val, test = E.eval_prompts(preset) if prompts is None else prompts
    rows, secs, clipped = [], {}, {}
    for name in names:
        t0 = time.perf_counter()
        tuned = E.tuned_predictions(preset, [name], (val, test))[name]
        with np.errstate(over="ignore", invalid="ignore"):
            rows += E.risk_rows(tuned, test.f, preset.task)
        secs[name] = round(time.perf_counter() - t0, 2)
        clipped[name] = {n: c for n, c in enumerate(tuned.clipped) if c}
    return rows, secs, clipped


def vs_T_table(preset: Preset, names: Sequence[str], val: Prompts, test: Prompts) -> list[dict[str, Any]]:
    """Risk at each fixed T of the grid (step size re-tuned per (T, n) on validation) at ``analysis_ns``."""
    ns = analysis_ns(preset)
    rows = []
    for name in names:
        fam = E.make_family(name, preset)
        combos = fam.grid()
        risk = E.val_risk(fam, val, combos, cols=ns)
        chosen = {T: E.choose(combos, risk, [c["T"] == T for c in combos]) for T in fam.T_grid}
        needed = list({json.dumps(c, sort_keys=True): c for hp in chosen.values() for c in hp}.values())
        keys = [json.dumps(c, sort_keys=True) for c in needed]
        pred = fam.predict(test.x, test.y, test.w, needed, ns, guard="clip")  # (len(needed), B, len(ns))
        for T, hp in chosen.items():
            p = torch.stack([pred[keys.index(json.dumps(c, sort_keys=True)), :, j] for j, c in enumerate(hp)], 1)
            rows += _rows(name, p, test.f[:, ns], preset, hp, ns, T=T)
    return rows


def groups_table(preset: Preset, val: Prompts, test: Prompts) -> list[dict[str, Any]]:
    """PtO with h = 1..d groups at ``analysis_ns``: ``pto_groups`` tunes (a, c, T) per n on validation,
    ``pto_groups_a0`` fixes a = 0 (features f(x) only: h = 1 is one GD step, h = d is PtO)."""
    ns = analysis_ns(preset)
    rows = []
    for h in range(1, preset.task.d + 1):
        fam = E.PtOGroups(preset.task, preset.eval.pto_steps, h)
        combos = fam.grid()
        risk = E.val_risk(fam, val, combos, cols=ns)
        chosen = {"pto_groups": E.choose(combos, risk), "pto_groups_a0": E.choose(combos, risk, [c["a"] == 0 for c in combos])}
        uniq = list({json.dumps(c, sort_keys=True): c for hp in chosen.values() for c in hp}.values())
        keys = [json.dumps(c, sort_keys=True) for c in uniq]
        pred = fam.predict(test.x, test.y, test.w, uniq, ns, guard="clip")
        for name, hp in chosen.items():
            p = torch.stack([pred[keys.index(json.dumps(c, sort_keys=True)), :, j] for j, c in enumerate(hp)], 1)
            rows += _rows(name, p, test.f[:, ns], preset, hp, ns, h=h)
    return rows


def _band_plot(rows: list[dict[str, Any]], xkey: str, path: Path, title: str, xlog: bool,
               refs: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Normalised risk vs ``xkey``: colour = n, line style = estimator, 95% bands; ``refs`` as horizontal lines."""
    rows = display_rows(rows)
    fig, ax = new_figure(figsize=(7, 4.5))
    ns = sorted({r["n"] for r in rows})
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    colors = {n: f"C{i}" for i, n in enumerate(ns)}
    dashes = ["-", "--", "-.", ":"]
    for e_i, est in enumerate(ests):
        for n in ns:
            rs = sorted((r for r in rows if r["estimator"] == est and r["n"] == n), key=lambda r: r[xkey])
            xs = [r[xkey] for r in rs]
            ax.plot(xs, [r["risk_norm"] for r in rs], color=colors[n], ls=dashes[e_i % 4], marker="o", ms=3,
                    label=f"{est}, n={n}")
            ax.fill_between(xs, [max(r["ci_low"], 1e-6) for r in rs], [r["ci_high"] for r in rs],
                            color=colors[n], alpha=0.12, lw=0)
    for ref_i, (ref_name, ref_rows) in enumerate((refs or {}).items()):
        for r in display_rows(ref_rows):
            if r["n"] in colors:
                ax.axhline(r["risk_norm"], color=colors[r["n"]], ls=":" if ref_i == 0 else (0, (1, 4)), lw=1.0,
                           alpha=0.8, label=f"{ref_name} (best T), n={r['n']}")
    if xlog:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xkey)
    ax.set_ylabel("normalised excess risk")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def _with_sigma(preset: Preset, sigma: float) -> Preset:
    return preset.model_copy(update={"task": preset.task.model_copy(update={"sigma": float(sigma)})})


def _hparams(rows: list[dict[str, Any]]) -> dict[str, dict[int, Any]]:
    out: dict[str, dict[int, Any]] = {}
    for r in rows:
        out.setdefault(r["estimator"], {})[r["n"]] = json.loads(r["hparams"])
    return out


def _title(preset: Preset, sigma: float) -> str:
    t = preset.task
    return f"E5 estimators, preset {preset.name}: d={t.d}, s={t.s}, sigma={sigma:g}"


def run_e5(preset: Preset, out: str | Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run E5 and write its CSVs, figures and ``config.json`` into ``out``; returns a summary dict."""
    names = E.resolve_names(names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    val, test = E.eval_prompts(preset)

    rows, secs, clipped = risk_table(preset, names, (val, test))
    write_csv(out / "e5_risk.csv", [{k: r[k] for k in RISK_COLUMNS} for r in rows])
    curves = {n: [r for r in rows if r["estimator"] == n] for n in names if n not in PLOT_OMIT} or \
        {n: [r for r in rows if r["estimator"] == n] for n in names}
    risk_vs_n(curves, out / "e5_risk.png", _title(preset, preset.task.sigma),
              styles=STYLES)

    t0 = time.perf_counter()
    vs_T_names = [n for n in VS_T_FAMILIES if n in names]
    vs_T_rows = vs_T_table(preset, vs_T_names, val, test) if vs_T_names else []
    if vs_T_rows:
        write_csv(out / "e5_vs_T.csv", vs_T_rows)
        shown = [r for r in vs_T_rows if r["estimator"] in ("gd", "pto")] or vs_T_rows  # the CSV has all
        _band_plot(shown, "T", out / "e5_vs_T.png",
                   _title(preset, preset.task.sigma) + ": risk vs GD steps T (step re-tuned per T)", xlog=True)
    secs["vs_T"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    group_rows = groups_table(preset, val, test) if "pto" in names else []
    if group_rows:
        write_csv(out / "e5_groups.csv", group_rows)
        refs = {k: [r for r in rows if r["estimator"] == k and r["n"] in analysis_ns(preset)]
                for k in ("gd",) if k in names}
        _band_plot(group_rows, "h", out / "e5_groups.png",
                   _title(preset, preset.task.sigma) + ": PtO with h groups (dotted: GD, best T)", xlog=False,
                   refs=refs)
    secs["groups"] = round(time.perf_counter() - t0, 2)

    extra: dict[str, Any] = {}
    for sigma in preset.sigmas:
        t0 = time.perf_counter()
        p2 = _with_sigma(preset, sigma)
        r2, _, _ = risk_table(p2, names)
        tag = f"{sigma:g}"
        write_csv(out / f"e5_risk_sigma{tag}.csv", [{k: r[k] for k in RISK_COLUMNS} for r in r2])
        risk_vs_n({n: [r for r in r2 if r["estimator"] == n] for n in names if n not in PLOT_OMIT} or
                  {n: [r for r in r2 if r["estimator"] == n] for n in names},
                  out / f"e5_risk_sigma{tag}.png", _title(p2, sigma), styles=STYLES)
        extra[tag] = _hparams(r2)
        secs[f"sigma{tag}"] = round(time.perf_counter() - t0, 2)

    secs["total"] = round(time.perf_counter() - t_start, 2)
    write_provenance(
        out, preset, preset.seed, experiment="E5", estimators=names, analysis_ns=analysis_ns(preset),
        grids=dict(ridge_lambda=E.RIDGE_LAMBDAS, lasso_alpha=E.LASSO_ALPHAS, gd_eta=E.GD_ETAS,
                   scale_free_c=E.SCALE_FREE_CS, pto_fixed_eta=E.PTO_FIXED_ETAS, group_a=E.GROUP_AS,
                   T=list(preset.eval.pto_steps)),
        hparams=_hparams(rows), hparams_extra_sigmas=extra, guard_clipped_test_prompts=clipped,
        guard=dict(stable_limit=E.STABLE_LIMIT, clip_c=E.GUARD_C),
        prompts=dict(val=preset.eval.n_val, test=preset.eval.n_test, streams=["val", "test"]),
        seconds=secs, threads=torch.get_num_threads(),
    )
    return dict(rows=rows, vs_T=vs_T_rows, groups=group_rows, seconds=secs)
