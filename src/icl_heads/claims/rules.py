"""Per-seed claim rules and their thresholds (docs/report.md states each one with its rationale).

Every rule reads one seed's experiment files, selects rows by typed keys
(:mod:`icl_heads.claims.keys`; a key that finds nothing raises :class:`ClaimDataError`) and
returns a :class:`Verdict` with the statistics it thresholds. A per-seed verdict uses CIs over
test prompts: *reproduced* if every statistic's CI lies on the claim's side of its threshold,
*not reproduced* if some statistic's CI lies wholly on the other side, *inconclusive* otherwise.
:func:`compute_verdicts` then decides each claim over seeds (:mod:`.across_seeds`).

Claims about trained models are decided in the in-context regime ``n >= d/2``
(:func:`.keys.in_context_n_min`). The ``judge_*`` functions take rows as E2/E3 write them, so the
controls in the tests are judged by exactly the code the report uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import Preset
from ..io import read_csv, read_json
from ..runs import layout
from .across_seeds import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Stat, Verdict, across_seeds
from .keys import AblationKind, ClaimDataError, ModelKey, Readout, Variant, in_context_n_min, select

# ----------------------------------------------------------------------------- thresholds

NEFF_CONTRAST_FRACTION = 1 / 3
"""Claim 1b: N_eff(layer 1) - max N_eff(later layer) must exceed this fraction of its largest
possible value h - 1 (the paper's picture: h effective heads in layer 1, one later). A third asks
for a clear gap (1 head of 4, 7/3 of 8) while leaving room for a layer 1 that is spread but not
uniform; equal layers (contrast 0) can never pass."""

KEEP_TOP_SUFFICIENT = 1.5
"""Claim 1b: a later layer's top head is *sufficient* if keeping only it multiplies the model's
risk by less than 1.5 (the risk rises by less than half of the model's own excess risk)."""

KEEP_TOP_CONTRAST = 1.5
"""Claim 1b: keeping only layer 1's top head must cost at least 1.5x (as a risk ratio) what it
costs in the worst later layer: layer 1's single head is insufficient *relative to* the later
layers, the same factor as the sufficiency bar, so one model cannot pass both with one number."""

PRUNED_OVER_FULL_MAX = 1.25
"""Claim 2a: pruning every later layer to its top head keeps the risk if pruned/full < 1.25
(pooled over n >= d/2), the project's tolerance since the first report."""

FRACTION_LOST_MAX = 0.25
"""Claim 2a: pruning may give back less than a quarter of the multi-head advantage,
(pruned - full) / (single_head - full) < 0.25. This scales the tolerance to the effect: a fixed
ratio can pass while pruning throws away all of a small advantage."""

CONTROL_OVER_PRUNED_MIN = 1.0
"""Claim 2a: the control (layer 1 cut to one head as well) must be worse than the pruned model:
control/pruned > 1, the paper's point that layer 1 needs its heads while later layers do not."""

ADVANTAGE_MIN = 1.0
"""Claim 2a: the fraction lost is only defined when the multi-head model beats the single-head one;
if the CI of single/full does not clear 1 the fraction is reported as NaN (inconclusive)."""

PROBE_DECIDES = Readout.PROBE_LN
"""Claim 2a by probe is decided by the probe after the final LayerNorm (the basis the model's own
read-out uses); the probe before it is shown beside."""

READOUTS_2A = (Readout.MODEL, PROBE_DECIDES)


# ----------------------------------------------------------------------------- helpers

def curves(path: Path, key: str) -> dict[str, list[dict[str, float]]]:
    """``label -> rows sorted by n`` from a tidy risk CSV (numeric fields as floats)."""
    out: dict[str, list[dict[str, float]]] = {}
    for r in read_csv(path):
        row = {k: _num(v) for k, v in r.items() if k != key}
        out.setdefault(r[key], []).append(row)
    return {k: sorted(v, key=lambda r: r["n"]) for k, v in out.items()}


def curve(c: Mapping[str, list[dict[str, float]]], label: str, path: Path) -> list[dict[str, float]]:
    """One labelled curve of :func:`curves`; a missing label is a :class:`ClaimDataError`."""
    if label not in c:
        raise ClaimDataError(f"no rows for {label} in {path} (has {', '.join(sorted(c))})")
    return c[label]


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def band_compare(a: list[dict[str, float]], b: list[dict[str, float]], n_min: float) -> tuple[list[int], list[int]]:
    """n where a's 95% band lies wholly below b's, and n where wholly above (n >= n_min)."""
    bn = {r["n"]: r for r in b}
    below = [int(r["n"]) for r in a if r["n"] >= n_min and r["n"] in bn and r["ci_high"] < bn[r["n"]]["ci_low"]]
    above = [int(r["n"]) for r in a if r["n"] >= n_min and r["n"] in bn and r["ci_low"] > bn[r["n"]]["ci_high"]]
    return below, above


def judge(checks: Sequence[tuple[Stat, float, float]]) -> str:
    """Per-seed verdict from (statistic, CI low, CI high) triples (module docstring)."""
    if checks and all(s.holds(lo, hi) for s, lo, hi in checks):
        return REPRODUCED
    if any(s.fails(lo, hi) for s, lo, hi in checks):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _ci_text(s: Stat, lo: float, hi: float) -> str:
    return f"{s.name} {s.value:.3f} [{lo:.3f}, {hi:.3f}] (needs {'>' if s.above else '<'} {s.threshold:g})"


def ablation_kinds(folder: Path) -> list[AblationKind]:
    """Ablation kinds an E2/E3 folder holds (its ``summary.json``)."""
    return [AblationKind(k) for k in read_json(folder / layout.SUMMARY)["ablations"]]


def _stat_row(rows: list[dict[str, Any]], source: Path | str, what: str, stat: str) -> tuple[float, float, float]:
    r = select(rows, source, f"{what}, statistic {stat}", statistic=stat)[0]
    return float(r["value"]), float(r["ci_low"]), float(r["ci_high"])


# ----------------------------------------------------------------------------- claim 1a

def claim_1a(e1_csv: Path, preset: Preset) -> Verdict:
    """More heads, lower risk: the largest-head model's band below the single-head one's at >= half of n >= d/2."""
    c = curves(e1_csv, "label")
    big, small = ModelKey(max(preset.heads)), ModelKey(min(preset.heads))
    rows_big, rows_small = curve(c, big.e1_label, e1_csv), curve(c, small.e1_label, e1_csv)
    n_min = in_context_n_min(preset.task.d)
    below, above = band_compare(rows_big, rows_small, n_min)
    total = sum(1 for r in rows_big if r["n"] >= n_min)
    v = REPRODUCED if len(below) * 2 >= total and not above else NOT_REPRODUCED if len(above) > len(below) else INCONCLUSIVE
    mean = lambda rows: float(np.mean([r["risk_norm"] for r in rows if r["n"] >= n_min]))  # noqa: E731
    ev = [f"{big.e1_label} band below {small.e1_label} at {len(below)}/{total} n >= {n_min}, above at {len(above)}",
          f"mean normalised risk over n >= {n_min}: {big.e1_label} {mean(rows_big):.4f}, {small.e1_label} {mean(rows_small):.4f}"]
    stats = [Stat(f"risk h={big.heads} / h={small.heads} (mean over n >= d/2)", mean(rows_big) / mean(rows_small),
                  1.0, above=False, scale="log")]
    return Verdict("1a. more heads give lower excess risk", v, ev, stats)


# ----------------------------------------------------------------------------- claim 1b

RULE_1B = (f"rule (n >= d/2): N_eff(layer 1) - max later N_eff > (h-1)/3; keep-top ratio layer 1 / max later "
           f"> {KEEP_TOP_CONTRAST:g}; max later keep-top ratio < {KEEP_TOP_SUFFICIENT:g}; each by its 95% CI over prompts")


def judge_1b(model_rows: list[dict[str, Any]], layer_rows: list[dict[str, Any]], ablation: AblationKind,
             source: Path | str = "claim 1b rows", top_share_rows: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """Claim 1b from E2's rows (``claim1b.csv``, ``effective_heads.csv``) for one ablation kind."""
    what = f"claim 1b, {ablation.value} ablation"
    mine = select(model_rows, source, what, ablation=ablation)
    h = int(float(mine[0]["n_heads"]))
    specs = [("neff_contrast", Stat("N_eff layer 1 minus max later N_eff", 0.0, NEFF_CONTRAST_FRACTION * (h - 1),
                                    above=True, scale="logit", bounds=(1.0 - h, h - 1.0))),
             ("keep_top_contrast", Stat("keep-top ratio, layer 1 / max later layer", 0.0, KEEP_TOP_CONTRAST,
                                        above=True, scale="log")),
             ("later_keep_top", Stat("max later keep-top ratio (top head alone / model)", 0.0, KEEP_TOP_SUFFICIENT,
                                     above=False, scale="log"))]
    checks = []
    for key, st in specs:
        st.value, lo, hi = _stat_row(mine, source, what, key)
        checks.append((st, lo, hi))
    layers = select(layer_rows, source, what, ablation=ablation)
    ev = [f"layer {r['layer']}: N_eff {float(r['n_eff']):.2f} [{float(r['n_eff_ci_low']):.2f}, "
          f"{float(r['n_eff_ci_high']):.2f}] of {h}; keep only head {r['top_head']}: risk x{float(r['keep_top_ratio']):.2f} "
          f"[{float(r['keep_top_ratio_ci_low']):.2f}, {float(r['keep_top_ratio_ci_high']):.2f}]" for r in layers]
    ev += [_ci_text(s, lo, hi) for s, lo, hi in checks]
    ev += [f"secondary: layer {r['layer']} top-head share {float(r['top_share']):.3f} "
           f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] (n >= 1)" for r in top_share_rows]
    ev.append(RULE_1B + f" (n >= {mine[0]['n_from']})")
    nums = dict(ablation=ablation.value, n_eff=[float(r["n_eff"]) for r in layers],
                keep_top_ratio=[float(r["keep_top_ratio"]) for r in layers],
                top_share=[float(r["top_share"]) for r in top_share_rows])
    return Verdict(f"1b. layer 1 uses several heads, one head suffices in each later layer ({ablation.value} ablation)",
                   judge(checks), ev, [s for s, _, _ in checks], numbers=nums)


def claim_1b(e2: Path, ablation: AblationKind | str = AblationKind.ZERO) -> Verdict:
    """Claim 1b for one seed's E2 folder under one ablation kind."""
    ablation = AblationKind(ablation)
    conc = sorted((r for r in read_csv(e2 / layout.E2_CONCENTRATION) if r.get("ablation", "zero") == ablation.value),
                  key=lambda r: int(r["layer"]))
    return judge_1b(_read(e2 / layout.E2_CLAIM1B), _read(e2 / layout.E2_EFFECTIVE_HEADS), ablation, e2, conc)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise ClaimDataError(f"no rows: {path} is missing (rerun the experiment with this version)")
    return read_csv(path)


def claims_1b(e2: Path) -> list[Verdict]:
    """Claim 1b for every ablation kind in one seed's E2 folder."""
    return [claim_1b(e2, k) for k in ablation_kinds(e2)]


# ----------------------------------------------------------------------------- claim 2a

RULE_2A = (f"rule (pooled over n >= d/2): pruned/full < {PRUNED_OVER_FULL_MAX:g}, fraction of the multi-head "
           f"advantage lost (pruned - full)/(single - full) < {FRACTION_LOST_MAX:g}, control/pruned > "
           f"{CONTROL_OVER_PRUNED_MIN:g}; each by its paired 95% CI over prompts")


def judge_2a(rows: list[dict[str, Any]], ablation: AblationKind, readout: Readout,
             source: Path | str = "claim 2a rows") -> Verdict:
    """Claim 2a from E3's ``claim2a.csv`` rows for one ablation kind and read-out."""
    what = f"claim 2a, {ablation.value} ablation, read-out {readout.value}"
    mine = select(rows, source, what, ablation=ablation, readout=readout)
    pooled = select(mine, source, what + ", pooled", n="pooled")
    adv, alo, ahi = _stat_row(pooled, source, what, "single_over_full")
    specs = [("pruned_over_full", Stat("pruned/full risk", 0.0, PRUNED_OVER_FULL_MAX, above=False, scale="log")),
             ("fraction_lost", Stat("fraction of the multi-head advantage lost", 0.0, FRACTION_LOST_MAX, above=False)),
             ("control_over_pruned", Stat("control/pruned risk", 0.0, CONTROL_OVER_PRUNED_MIN, above=True, scale="log"))]
    checks = []
    for key, st in specs:
        st.value, lo, hi = _stat_row(pooled, source, what, key)
        if key == "fraction_lost" and not alo > ADVANTAGE_MIN:  # no multi-head advantage: the fraction is undefined
            st.value, lo, hi = float("nan"), float("nan"), float("nan")
        checks.append((st, lo, hi))
    ev = [f"single-head/full {adv:.3f} [{alo:.3f}, {ahi:.3f}] (the multi-head advantage; fraction defined if > 1)"]
    ev += [_ci_text(s, lo, hi) for s, lo, hi in checks]
    ev.append("per n: " + "; ".join(_per_n(mine, n) for n in sorted({int(float(r["n"])) for r in mine if r["n"] != "pooled"})))
    ev.append(RULE_2A + f" (n >= {pooled[0]['n_from']})")
    how = {Readout.MODEL: "own read-out", Readout.PROBE: "probe before the final LN",
           Readout.PROBE_LN: "probe after the final LN"}[readout]
    nums = dict(ablation=ablation.value, readout=readout.value,
                **{key: dict(value=s.value, ci_low=lo, ci_high=hi) for (key, _), (s, lo, hi) in zip(specs, checks)})
    return Verdict(f"2a. pruning later layers to their top head keeps the risk ({how}, {ablation.value} ablation)",
                   judge(checks), ev, [s for s, _, _ in checks], numbers=nums)


def _per_n(rows: list[dict[str, Any]], n: int) -> str:
    at = {r["statistic"]: r for r in rows if r["n"] != "pooled" and int(float(r["n"])) == n}
    f = lambda k: "{:.2f} [{:.2f}, {:.2f}]".format(*(float(at[k][c]) for c in ("value", "ci_low", "ci_high")))  # noqa: E731
    return f"n={n}: pruned/full {f('pruned_over_full')}" + (f", fraction lost {f('fraction_lost')}" if "fraction_lost" in at else "")


def claim_2a(e3: Path, ablation: AblationKind | str = AblationKind.ZERO, readout: Readout | str = Readout.MODEL) -> Verdict:
    """Claim 2a for one seed's E3 folder, one ablation kind and read-out (the probe one shows the pre-LN probe beside)."""
    ablation, readout = AblationKind(ablation), Readout(readout)
    rows = _read(e3 / layout.E3_CLAIM2A)
    v = judge_2a(rows, ablation, readout, e3 / layout.E3_CLAIM2A)
    if readout is PROBE_DECIDES:
        other = judge_2a(rows, ablation, Readout.PROBE, e3 / layout.E3_CLAIM2A)
        v.evidence.insert(-1, f"beside it, the probe before the final LN ({other.verdict}): "
                              + "; ".join(other.evidence[1:4]))
    return v


def claims_2a(e3: Path) -> list[Verdict]:
    """Claim 2a for every ablation kind in one seed's E3 folder, by own read-out and by the deciding probe."""
    return [claim_2a(e3, k, r) for k in ablation_kinds(e3) for r in READOUTS_2A]


# ----------------------------------------------------------------------------- claims 2b, 2c, 3

def layer1_probe(e4_csv: Path, model: ModelKey, n_min: int) -> tuple[float, float]:
    """Layer-1 probe risk of ``model``, mean over n >= n_min, and the mean of its per-n CI half-widths."""
    rows = [r for r in select(read_csv(e4_csv), e4_csv, f"model {model}", model=model.e4_label, layer="1")
            if int(r["n"]) >= n_min]
    if not rows:
        raise ClaimDataError(f"no rows for model {model} at n >= {n_min} in {e4_csv}")
    mean = float(np.mean([float(r["risk_norm"]) for r in rows]))
    half = float(np.mean([(float(r["ci_high"]) - float(r["ci_low"])) / 2 for r in rows]))
    return mean, half


def claim_2b(e4_csv: Path, multi: ModelKey, single: ModelKey, n_min: int = 1) -> Verdict:
    """A single-head model is worse from layer 1 on: layer-1 probe risk, single vs multi, bands separated."""
    (m, mh), (s, sh) = layer1_probe(e4_csv, multi, n_min), layer1_probe(e4_csv, single, n_min)
    v = REPRODUCED if s - sh > m + mh else NOT_REPRODUCED if s + sh < m - mh else INCONCLUSIVE
    ev = [f"layer-1 probe risk (mean over n >= {n_min}): {multi} {m:.4f} ± {mh:.4f}, {single} {s:.4f} ± {sh:.4f}"]
    stats = [Stat("layer-1 probe risk, single head / multi-head", s / m, 1.0, above=True, scale="log")]
    return Verdict("2b. a single-head model is worse from layer 1 on (probes)", v, ev, stats)


def claim_2c(e6b_verdict_csv: Path, multi: ModelKey) -> Verdict:
    """Later layers track PtO after l-1 steps better than GD after l-1 steps (E6b, the model's own read-out)."""
    rows = select(read_csv(e6b_verdict_csv), e6b_verdict_csv, f"model {multi} (lens, matched step, all n)",
                  model=multi.e6_label, readout="lens", eta_fit="match", n_range="all")
    tracks = {r["tracks"] for r in rows}
    v = REPRODUCED if tracks == {"pto"} else NOT_REPRODUCED if tracks == {"gd"} else INCONCLUSIVE
    ev = [f"layer {r['layer']}: relative error to PtO {float(r['pto_rel_err']):.3f}, to GD {float(r['gd_rel_err']):.3f}, "
          f"GD - PtO [{float(r['diff_ci_low']):+.3f}, {float(r['diff_ci_high']):+.3f}] -> {r['tracks']}" for r in rows]
    stats = [Stat(f"layer {r['layer']}: relative error to GD minus to PtO",
                  float(r["gd_rel_err"]) - float(r["pto_rel_err"]), 0.0, above=True) for r in rows]
    return Verdict("2c. later layers track PtO steps better than GD steps (E6b)", v, ev, stats)


def claim_3(e5_csv: Path) -> Verdict:
    """PtO's band below both GD's and ridge's at some n (the n where it wins and loses are listed)."""
    c = curves(e5_csv, "estimator")
    pto, gd, ridge = (curve(c, k, e5_csv) for k in ("pto", "gd", "ridge"))
    below_gd, above_gd = band_compare(pto, gd, 1)
    below_r, above_r = band_compare(pto, ridge, 1)
    wins = sorted(set(below_gd) & set(below_r))
    loses = sorted(set(above_gd) | set(above_r))
    v = REPRODUCED if wins else NOT_REPRODUCED
    by_n = {int(r["n"]): r["risk_norm"] for r in pto}
    ratio = lambda other: {int(r["n"]): by_n[int(r["n"])] / r["risk_norm"] for r in other}  # noqa: E731
    rg, rr = ratio(gd), ratio(ridge)
    ev = [f"PtO band below both GD and ridge at n = {_ranges(wins) or 'none'}",
          f"PtO band above GD or ridge at n = {_ranges(loses) or 'none'}"]
    if wins:
        best = min(wins, key=lambda n: rr[n])
        ev.append(f"largest win at n = {best}: PtO/ridge {rr[best]:.2f}, PtO/GD {rg[best]:.2f}")
    return Verdict("3. PtO has lower excess risk than GD and ridge", v, ev)


def _ranges(ns: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(ns):
        if start is None:
            start = n
        if i + 1 == len(ns) or ns[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# ----------------------------------------------------------------------------- all claims

def seed_verdicts(sd: Path, preset: Preset) -> list[Verdict]:
    """The per-seed rules on one seed's folder (``seed{k}/``)."""
    multi, single = ModelKey(max(preset.heads)), ModelKey(min(preset.heads))
    return [
        claim_1a(sd / "e1" / layout.E1_CSV, preset),
        *claims_1b(sd / "e2"),
        *claims_2a(sd / "e3"),
        claim_2b(sd / "e4" / layout.E4_CSV, multi, single, in_context_n_min(preset.task.d)),
        claim_2c(sd / "e6" / layout.E6B_VERDICT, multi),
    ]


def compute_verdicts(out: Path, preset: Preset, seeds: int, sigmas: Sequence[float] = ()) -> list[Verdict]:
    """Per-claim verdicts for a finished ``reproduce`` folder, decided across seeds (:func:`.across_seeds.across_seeds`).

    With several noise levels every trained-model claim appears once per level, its name carrying the sigma.
    """
    seed_ids = [preset.seed + k for k in range(seeds)]
    merged = []
    for sigma in (sigmas or [preset.task.sigma]):
        sp = layout.sigma_dir(preset, sigma)
        per_seed = [seed_verdicts(layout.seed_dir(out, k, sp), preset) for k in range(seeds)]
        for i in range(len(per_seed[0])):
            v = across_seeds([ps[i] for ps in per_seed], seed_ids)
            if len(sigmas) > 1:
                v.claim += f" [sigma={sigma:g}]"
            merged.append(v)
    return merged + [claim_3(out / layout.E5 / layout.E5_CSV)]


__all__ = ["ADVANTAGE_MIN", "CONTROL_OVER_PRUNED_MIN", "FRACTION_LOST_MAX", "KEEP_TOP_CONTRAST", "KEEP_TOP_SUFFICIENT",
           "NEFF_CONTRAST_FRACTION", "PRUNED_OVER_FULL_MAX", "PROBE_DECIDES", "Variant", "claim_1a", "claim_1b",
           "claim_2a", "claim_2b", "claim_2c", "claim_3", "claims_1b", "claims_2a", "compute_verdicts", "judge",
           "judge_1b", "judge_2a", "seed_verdicts"]
