"""The reproduction report: verdicts computed from the experiments' CSVs, then one section per experiment.

The claim rules, their thresholds and the across-seed rule live in :mod:`icl_heads.claims`
(``rules`` and ``across_seeds``; docs/report.md states each with its rationale); import them from there.
"""

from __future__ import annotations

import math

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import Preset
from .document import Document
from ..io import atomic_write_text, read_csv, read_json, save_figure, write_json
from ..plotting import new_figure
from ..training import marker_names
from ..runs import layout
from ..claims.across_seeds import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Verdict
from ..claims.rules import compute_verdicts, curves
from ..analysis.emergence import trend
from ..experiments.e4_probes import summary_models
from ..experiments.e7_emergence import plot_emergence, read_emergence


def write_report(out: Path, preset: Preset, seeds: int, sigmas: Sequence[float] = ()) -> Path:
    """Write ``report.md``, ``report.html`` and ``verdicts.json`` into ``out``."""
    out = Path(out)
    sigmas = list(sigmas)
    verdicts = compute_verdicts(out, preset, seeds, sigmas)
    write_json(out / layout.VERDICTS, [v.to_json() for v in verdicts])
    doc = build_document(out, preset, seeds, verdicts)
    atomic_write_text(out / layout.REPORT_MD, doc.to_markdown(out))
    atomic_write_text(out / layout.REPORT_HTML, doc.to_html())
    return out / layout.REPORT_MD


def build_document(out: Path, preset: Preset, seeds: int, verdicts: list[Verdict]) -> Document:
    """The report, answer first: one screen with a row per claim, the claims' key statistics over seeds as a
    dot-and-interval chart (``summary.png``) and the models' risk beside ridge/lasso/Bayes; then one section
    per experiment, figure first; every statistic, per-seed evidence and rule folded away (``<details>``)."""
    t, m = preset.task, preset.model
    doc = Document(f"icl-heads reproduction report — preset `{preset.name}`")
    doc.para(f"d={t.d}, s={t.s}, sigma={t.sigma}, n_max={t.n_max}; D={m.d_model}, L={m.n_layers}, heads {preset.heads}, "
             f"{m.attention} attention, MLP {m.mlp}; seeds {[preset.seed + k for k in range(seeds)]}. "
             "Rules: docs/report.md.")
    doc.heading("Verdicts")
    groups = claim_groups(verdicts)
    doc.table(["claim", "verdict", "key statistic: mean [95% CI over seeds] (needed)", "variants"],
              [claim_row(g) for g in groups], css="compact")
    doc.figure(summary_figure([g[0] for g in groups], out / layout.SUMMARY_PNG),
               "Key statistic of each claim: one grey dot per seed, black the mean with its 95% t-interval over "
               "seeds on the statistic's scale (log for ratios, logit for bounded ones), red dashes the threshold "
               "(the claim needs the interval wholly on the shaded side).")
    risk = summary_risk_rows(out, preset, seeds)
    if risk:
        doc.table(["excess risk / s tau^2"] + [f"n = {n} ({name})" for n, name in marker_names(t).items()], risk,
                  css="compact")
    _folded_evidence(doc, verdicts, groups)
    _experiment_sections(doc, out, preset, seeds)
    return doc


def claim_groups(verdicts: list[Verdict]) -> list[list[Verdict]]:
    """Verdicts grouped by claim (its ablation / read-out variants together), in report order.

    The variant in parentheses (``(zero ablation)``) is dropped from the key, a ``[sigma=...]`` suffix kept;
    the first verdict of a group (zero ablation, own read-out) is the one the summary charts.
    """
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(claim_key(v.claim), []).append(v)
    return list(groups.values())


def claim_key(claim: str) -> str:
    head, _, rest = claim.partition(" (")
    suffix = rest[rest.index(")") + 1:].strip() if ")" in rest else ""
    return f"{head} {suffix}".strip()


def _variant(claim: str) -> str:
    return claim.partition(" (")[2].rpartition(")")[0] or "-"


def key_interval(v: Verdict) -> tuple[list[float], float, float, float] | None:
    """The first statistic of ``v`` over seeds: its finite per-seed values, and the mean and 95% interval
    the across-seed rule computed on the statistic's scale (log for ratios, logit for bounded ones;
    ``claims.across_seeds``). None when there are no seeds or no finite value."""
    if not v.per_seed or not v.stats:
        return None
    st = v.stats[0]
    vals = [x for x in (float(p["stats"][st.name]) for p in v.per_seed) if math.isfinite(x)]
    if not vals:
        return None
    lo, hi = st.ci if st.ci is not None else (float("nan"), float("nan"))
    return vals, float(st.value), lo, hi


def claim_row(group: list[Verdict]) -> list[str]:
    """One summary row: claim, the charted variant's verdict, its key statistic, every variant's verdict."""
    v = group[0]
    ki = key_interval(v)
    if ki is None:
        stat = "; ".join(v.evidence)[:160]
    else:
        st, (vals, mean, lo, hi) = v.stats[0], ki
        ci = f"[{lo:.3f}, {hi:.3f}] ({st.scale} scale)" if len(vals) > 1 else "(one seed)"
        stat = f"{st.name}: {mean:.3f} {ci} (needs {'>' if st.above else '<'} {st.threshold:g})"
    counts = {k: sum(x.verdict == k for x in group) for k in dict.fromkeys(x.verdict for x in group)}
    variants = "-" if len(group) == 1 else f"all {len(group)} {v.verdict}" if len(counts) == 1 else \
        ", ".join(f"{c} {k}" for k, c in counts.items())
    return [claim_key(v.claim), v.verdict.upper(), stat, variants]


_COLOURS = {REPRODUCED: "#0a7a25", NOT_REPRODUCED: "#b00020", INCONCLUSIVE: "#a66b00"}


def summary_figure(verdicts: list[Verdict], path: Path) -> Path:
    """``summary.png``: one row per claim, its key statistic per seed, the mean and 95% interval, the threshold."""
    fig, axes = new_figure(len(verdicts), 1, figsize=(9.5, 0.42 * len(verdicts) + 0.3), squeeze=False)
    for ax, v in zip(axes[:, 0], verdicts):
        ki = key_interval(v)
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        label = claim_key(v.claim)
        ax.text(-0.02, 0.5, label if len(label) < 44 else label[:42] + "…", transform=ax.transAxes,
                ha="right", va="center", fontsize=8)
        ax.text(1.02, 0.5, v.verdict, transform=ax.transAxes, ha="left", va="center", fontsize=8,
                color=_COLOURS.get(v.verdict, "#222"), fontweight="bold")
        if ki is None:
            ax.set_xticks([])
            ax.text(0.5, 0.5, "no per-seed statistic (estimators only)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=7, color="#666")
            continue
        st, (vals, mean, lo, hi) = v.stats[0], ki
        ax.plot(vals, [0] * len(vals), "o", color="#999", ms=4, zorder=2)
        interval = len(vals) > 1 and math.isfinite(lo) and math.isfinite(hi)
        if interval:
            ax.plot([lo, hi], [0, 0], "-", color="k", lw=1.6, zorder=3)
        if math.isfinite(mean):
            ax.plot([mean], [0], "o", color="k", ms=5, zorder=4)
        ax.axvline(st.threshold, color="#b00020", ls="--", lw=1)
        xs = [*vals, st.threshold] + ([lo, hi] if interval else [])
        span = max(xs) - min(xs) or 1.0
        x0, x1 = min(xs) - 0.08 * span, max(xs) + 0.08 * span
        ax.set_xlim(x0, x1)
        ax.axvspan(st.threshold, x1, color="#0a7a25", alpha=0.08) if st.above else \
            ax.axvspan(x0, st.threshold, color="#0a7a25", alpha=0.08)
        ax.set_ylim(-1, 1)
        ax.tick_params(axis="x", labelsize=7, pad=1)
        ax.set_title(st.name, fontsize=7, loc="left", pad=1, color="#444")
    fig.subplots_adjust(left=0.36, right=0.87, hspace=1.5, top=0.93, bottom=0.08)
    save_figure(fig, path)
    return path


def summary_risk_rows(out: Path, preset: Preset, seeds: int) -> list[list[str]]:
    """Models (mean over seeds, [min, max] over seeds) beside ridge, lasso, PtO and Bayes (seed 0's test
    prompts, [95% CI over prompts]) at n = d/2, d, 2d; from each seed's ``e1/e1_heads.csv``."""
    ns = list(marker_names(preset.task))
    files = [layout.stage_dir(out, "e1", k) / layout.E1_CSV for k in range(seeds)]
    if not all(f.exists() for f in files):
        return []
    per_seed = [curves(f, "label") for f in files]
    rows = []
    for h in sorted({max(preset.heads), min(preset.heads)}, reverse=True):
        lab = f"transformer h={h}"
        if all(lab in c for c in per_seed):
            cells = []
            for n in ns:
                vals = [float(r["risk_norm"]) for c in per_seed for r in c[lab] if int(r["n"]) == n]
                cells.append(f"{np.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]" if vals else "-")
            rows.append([f"{lab} (mean [min, max] over {len(vals)} seeds)"] + cells)
    for est in ("ridge", "lasso", "pto", "bayes"):
        if est in per_seed[0]:
            rows.append([est] + [_at3(per_seed[0][est], n) for n in ns])
    return rows


def _at3(rows: list[dict[str, float]], n: int) -> str:
    for r in rows:
        if int(r["n"]) == n:
            return f"{r['risk_norm']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return "-"


def _folded_evidence(doc: Document, verdicts: list[Verdict], groups: list[list[Verdict]]) -> None:
    """Every statistic per seed, and per claim its rule (once) and each seed's evidence, folded away."""
    sub = doc.details(f"All {sum(len(v.stats) or 1 for v in verdicts)} statistics, per seed and over seeds")
    sub.para("Claims about trained models are decided over seeds (docs/report.md, 'Across seeds'): reproduced "
             "only if every statistic's 95% t-interval over seeds (on its scale: log for ratios, logit for bounded "
             "ones) clears its threshold, every seed passes and no seed's own verdict is 'not reproduced'; one seed "
             "is never decided. PI: the prediction interval for a new seed. Each seed's own verdict uses CIs over "
             "test prompts.")
    sub.table(["claim", "verdict", "statistic (needed)", "per seed", "mean [95% CI over seeds]"], verdict_rows(verdicts))
    for group in groups:
        ev = doc.details(f"Evidence and rule: {claim_key(group[0].claim)}")
        for v in group:
            items = v.evidence if not v.per_seed else [e for p in v.per_seed for e in p.get("evidence", [])]
            rules = list(dict.fromkeys(e for e in items if e.startswith("rule")))
            if v.per_seed:
                ev.para(f"{_variant(v.claim)} — " + " | ".join(
                    f"seed {p['seed']} ({p['verdict']}): " + "; ".join(
                        e for e in p.get("evidence", []) if not e.startswith("rule")) for p in v.per_seed))
            else:
                ev.para(f"{_variant(v.claim)} — " + "; ".join(e for e in items if not e.startswith("rule")))
            for r in rules if v is group[0] else []:
                ev.para(f"Rule — {r.removeprefix('rule:').strip()}")


def e1_depth_sentence(c1: dict[str, list[dict[str, float]]], preset: Preset) -> str:
    """How each trained model compares with the depth-matched GD / PtO (T = L - 1) at n = d and 2d, by the
    95% CIs ("" when E1 has no depth-matched rows)."""
    base = [b for b in ("gd_depth", "pto_depth") if b in c1]
    models = [lab for lab in c1 if lab.startswith("transformer")]
    d = preset.task.d
    ns = [n for n in (d, 2 * d) if n <= preset.task.n_max]
    if not base or not models or not ns:
        return ""

    def at(rows: list[dict[str, float]], n: int) -> dict[str, float]:
        return next(r for r in rows if int(r["n"]) == n)

    def cmp(a: dict[str, float], b: dict[str, float]) -> str:
        return "lower than" if a["ci_high"] < b["ci_low"] else "higher than" if a["ci_low"] > b["ci_high"] else "tied with"

    parts = [f"at n = {n}, " + "; ".join(
        f"{m.removeprefix('transformer ')} is " + " and ".join(f"{cmp(at(c1[m], n), at(c1[b], n))} {b}" for b in base)
        for m in models) for n in ns]
    return (f"Depth-matched baselines (GD and PtO with T = L - 1 = {preset.model.n_layers - 1} steps, the step tuned per n): "
            + "; ".join(parts) + " (lower / higher: disjoint 95% CIs; tied: overlapping CIs).")


def verdict_rows(verdicts: list[Verdict]) -> list[list[str]]:
    """One row per thresholded statistic: claim and verdict on its first row, each seed's value, the interval."""
    rows = []
    for v in verdicts:
        if not v.per_seed:  # not about trained models (claim 3)
            rows.append([v.claim, v.verdict.upper(), "; ".join(v.evidence), "-", "-"])
            continue
        for i, st in enumerate(v.stats):
            vals = [p["stats"][st.name] for p in v.per_seed]
            per = ", ".join(f"{p['seed']}: {x:.3f} ({p['verdict']})" for p, x in zip(v.per_seed, vals))
            if len(vals) > 1 and st.ci is not None:  # the rule's own interval, on the statistic's scale
                ci = (f"{st.value:.3f} [{st.ci[0]:.3f}, {st.ci[1]:.3f}] ({st.scale})"
                      + (f"; PI [{st.pi[0]:.3f}, {st.pi[1]:.3f}]" if st.pi is not None else "")
                      + (f"; {st.passes}/{len(vals)} pass" if st.passes is not None else ""))
            else:
                ci = f"{st.value:.3f} (one seed)"
            rows.append([v.claim if i == 0 else "", v.verdict.upper() if i == 0 else "",
                         f"{st.name} ({'>' if st.above else '<'} {st.threshold:g})", per, ci])
    return rows


def _experiment_sections(doc: Document, out: Path, preset: Preset, seeds: int) -> None:
    sd = layout.seed_dir(out, 0)  # the first seed's figures and tables
    d = preset.task.d
    ns = sorted({max(1, d // 2), d, min(2 * d, preset.task.n_max)})
    doc.heading("E1 — heads sweep")
    doc.figure(sd / "e1" / layout.E1_PNG, "Normalised excess risk vs context length: trained models (h heads) and estimators.")
    c1 = curves(sd / "e1" / layout.E1_CSV, "label")
    doc.table(["model / estimator"] + [f"n={n}" for n in ns],
              [[lab] + [_at(rows, n) for n in ns] for lab, rows in c1.items()])
    if sentence := e1_depth_sentence(c1, preset):
        doc.para(sentence)
    doc.heading("E2 — head assessment")
    doc.figure(sd / "e2" / layout.E2_PNG, "Risk increase when each head is gated off (raw and normalised per layer).")
    doc.table(["ablation", "layer", "top head", "top share", "95% CI", "uniform share"],
              [[r.get("ablation", "zero"), r["layer"], r["top_head"], float(r["top_share"]),
                f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]", float(r["uniform_share"])]
               for r in read_csv(sd / "e2" / layout.E2_CONCENTRATION)])
    if (sd / "e2" / layout.E2_PATTERNS_PNG).exists():  # softmax models only
        doc.figure(sd / "e2" / layout.E2_PATTERNS_PNG, "Attention of each layer's top head (zero ablation) at the query "
                   "with the longest context: mean weight on each context example, and weight vs |y_k|.")
    doc.heading("E3 — pruning")
    doc.figure(sd / "e3" / layout.E3_PNG, "Full vs pruned (layer 1 all heads, later layers top head) vs control.")
    e3 = read_json(sd / "e3" / layout.E3_SUMMARY)
    doc.table(["ablation", "model", "risk ratio vs full", "95% CI", "last-layer probe ratio vs full", "95% CI"],
              [[kind, name, r["ratio"], f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"]
               + ([k["probe_ratio_vs_full"][name]["ratio"], "[{ci_low:.3f}, {ci_high:.3f}]".format(
                   **k["probe_ratio_vs_full"][name])] if "probe_ratio_vs_full" in k else ["-", "-"])
               for kind, k in e3["by_ablation"].items() for name, r in k["risk_ratio_vs_full"].items()])
    doc.heading("E4 — layer-wise probes")
    doc.figure(sd / "e4" / layout.E4_PNG, "Ridge-probe excess risk per layer: full, pruned and single-head models.")
    mp = {m: v["mean_probe_risk_norm"] for m, v in summary_models(read_json(sd / "e4" / layout.E4_SUMMARY)).items()}
    layers = list(next(iter(mp.values())))
    doc.table(["model"] + layers, [[m] + [v[layer] for layer in layers] for m, v in mp.items()])
    doc.heading("E5 — algorithms")
    doc.figure(out / layout.E5 / layout.E5_PNG, "Estimators, each tuned per n on validation prompts.")
    c5 = curves(out / layout.E5 / layout.E5_CSV, "estimator")
    doc.table(["estimator"] + [f"n={n}" for n in ns], [[lab] + [_at(rows, n) for n in ns] for lab, rows in c5.items()])
    for name, cap in (("e5_vs_T.png", "Risk vs number of steps T for GD and PtO."),
                      ("e5_groups.png", "PtO with h coordinate groups, h = 1..d.")):
        if (out / layout.E5 / name).exists():
            doc.figure(out / layout.E5 / name, cap)
    doc.heading("E6 — mechanism")
    _e6_section(doc, sd / "e6")
    _e7_section(doc, out, preset, seeds)
    doc.heading("Provenance")
    m = read_json(out / layout.MANIFEST) if (out / layout.MANIFEST).exists() else {}
    env = m.get("environment", {})
    doc.para(f"git commit {env.get('git_commit')}, Python {env.get('python')}, torch "
             f"{env.get('packages', {}).get('torch')}, device {m.get('device')}. Stage wall times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in m.get("stage_wall_s", {}).items())
             + ". Full config and versions: manifest.json; every number: the CSV/JSON files beside this report.")


def _e7_section(doc: Document, out: Path, preset: Preset, seeds: int) -> None:
    """E7: the emergence figure over seeds, one sentence per claim, the per-snapshot table."""
    paths = [layout.stage_dir(out, "e7", k) / layout.E7_CSV for k in range(seeds)]
    if not all(p.exists() for p in paths):
        return
    seed_ids = [preset.seed + k for k in range(seeds)]
    per_seed = read_emergence(paths)
    doc.heading("E7 — emergence during training")
    fig = plot_emergence(per_seed, seed_ids, out / layout.E7_SUMMARY_PNG,
                         f"E7: h={max(preset.heads)} model snapshots ({preset.name}), seeds {seed_ids}")
    doc.figure(fig, "Top-head share per layer (E2, zero ablation, val prompts), risk at n = d, and pruned/full "
                    "risk (E3, own read-out, test prompts) at log-spaced training snapshots; one marker per seed.")
    trends = {s: trend(rows) for s, rows in zip(seed_ids, per_seed.values())}
    for claim, key, what in (("1b", "claim_1b", "the head pattern (layer 1 spread, later layers one head)"),
                             ("2a", "claim_2a", "pruning later layers to their top head")):
        words = [t[key] for t in trends.values()]
        phrase = {"strengthens": "strengthens", "fades": "fades", "flat": "stays flat",
                  "mixed": "moves both ways (some layers toward the claim, some away)"}
        agreed = phrase[words[0]] if len(set(words)) == 1 else "differs between seeds"
        detail = "; ".join(
            f"seed {s}: " + (f"layer shares {', '.join(f'{x:.2f}' for x in t['first']['shares'])} -> "
                             f"{', '.join(f'{x:.2f}' for x in t['last']['shares'])}" if key == "claim_1b" else
                             f"pruned/full {t['first']['pruned_ratio']:.2f} -> {t['last']['pruned_ratio']:.2f}")
            + f" (steps {t['from_step']:.0f} -> {t['to_step']:.0f}: {t[key]})" for s, t in trends.items())
        doc.para(f"Claim {claim}: with training, {what} {agreed} (by the 95% CIs of the first learning snapshot "
                 f"and the last). {detail}.")
    rows = []
    for s, rs in zip(seed_ids, per_seed.values()):
        for step in sorted({r["step"] for r in rs}):
            at = sorted((r for r in rs if r["step"] == step), key=lambda r: r["layer"])
            rows.append([s, int(step), ", ".join(f"{r['top_share']:.2f}" for r in at),
                         f"{at[0]['pruned_ratio']:.2f} [{at[0]['pruned_ci_low']:.2f}, {at[0]['pruned_ci_high']:.2f}]",
                         f"{at[0]['risk_norm_at_d']:.3f}"])
    doc.table(["seed", "step", "top-head share per layer", "pruned/full [95% CI]", "risk at n = d"], rows)


def _e6_section(doc: Document, e6: Path) -> None:
    doc.figure(e6 / layout.E6A_PNG, "E6a: held-out R^2 of linear decoders from the read-in and from layer 1 (context "
               "tokens) to r_j x_ij (prefix and full-context r), y_i x_ij and x_ij.")
    for png in sorted(e6.glob(layout.E6B_PNG_GLOB)):
        doc.figure(png, f"E6b, model {png.stem.split('_')[-1]}: agreement of each layer's probe with PtO and GD "
                        "after l-1 steps, per n.")
    summ = read_json(e6 / layout.E6_SUMMARY)
    r2, dirs = summ.get("e6a_mean_r2", {}), summ.get("e6a_directions", {})
    targets = ("pto_prefix", "pto_prefix_groups", "pto_full", "yx", "x")
    keys = sorted({k.rsplit("/", 1)[0] for k in r2})
    doc.table(["model / source"] + [f"R^2 {t}" for t in targets] + ["directions of diag(r) x with R^2 >= "
                                                                   f"{summ.get('e6a_direction_r2_cutoff', 0.5):g}"],
              [[k] + [r2.get(f"{k}/{t}", float("nan")) for t in targets] + [dirs.get(f"{k}/pto_prefix", float("nan"))]
               for k in keys])
    rows = [r for r in read_csv(e6 / layout.E6B_VERDICT) if r["eta_fit"] == "match"]
    doc.table(["model", "readout", "layer", "n", "rel. err to PtO", "rel. err to GD", "GD - PtO 95% CI", "closer to"],
              [[r["model"], r["readout"], r["layer"], r["n_range"], float(r["pto_rel_err"]), float(r["gd_rel_err"]),
                f"[{float(r['diff_ci_low']):+.3f}, {float(r['diff_ci_high']):+.3f}]", r["tracks"]] for r in rows])
    if (e6 / layout.E6C_CSV).exists():
        c = read_csv(e6 / layout.E6C_CSV)
        worst = max(float(r["max_abs_dev"]) for r in c)
        doc.para(f"E6c: the hand-built linear-attention transformer matches PtO / grouped PtO on {len(c)} settings, "
                 f"largest absolute deviation {worst:.2e} (float64).")


def _at(rows: list[dict[str, float]], n: int) -> str:
    for r in rows:
        if int(r["n"]) == n:
            return f"{r['risk_norm']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
    return "-"


def verdicts_json(out: Path) -> list[dict[str, Any]]:
    return json.loads((Path(out) / layout.VERDICTS).read_text())
