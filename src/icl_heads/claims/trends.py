"""Where training moves each claim (issue 23): per-seed slopes against log(step), judged over seeds.

E7 writes, for each late snapshot of a seed's largest-head model (the second half of training on the log
scale, :func:`icl_heads.analysis.emergence.late_steps`), the key statistics of claims 1b and 2a under every
ablation kind (``emergence_claims.csv``). Here each statistic becomes a per-seed **slope**: the ordinary
least-squares slope of the statistic, on its averaging scale (log for ratios, linear for the N_eff
contrast), against ``log2(step)`` -- the change *per doubling of training*, with its 95% t-interval over the
snapshots (``k - 2`` degrees of freedom). The slope is oriented so that positive means *toward the paper's
pattern* (the side of the claim's threshold: a ratio that must be small falling, a contrast that must be
large rising).

Over seeds the existing rule decides (:func:`.across_seeds.across_seeds`, statistic "oriented slope",
threshold :data:`SLOPE_THRESHOLD`, linear scale): **moves toward the paper** when the 95% CI of the mean
slope over seeds is above 0, every seed's slope is positive and no seed's own slope CI lies below 0;
**moves away** in the mirror case; **undecided** otherwise (and always with one seed or fewer than
:data:`MIN_SNAPSHOTS` late snapshots). The rule and its threshold were written down before any trend was
read (docs/report.md, "Where training moves each claim").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as _stats

from .across_seeds import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Stat, Verdict, across_seeds
from .rules import ADVANTAGE_MIN

TOWARD, AWAY, UNDECIDED = "moves toward the paper", "moves away", "undecided"
SLOPE_THRESHOLD = 0.0
"""A trend is a direction, not a size: the oriented slope must be above 0 (toward) or below (away) by the
across-seed rule; its size is reported on the statistic's scale per doubling of steps."""
MIN_SNAPSHOTS = 3
"""A slope with its CI needs at least three snapshots (one residual degree of freedom)."""
_NAMES = {REPRODUCED: TOWARD, NOT_REPRODUCED: AWAY, INCONCLUSIVE: UNDECIDED}


@dataclass(frozen=True)
class TrendKey:
    """One key statistic of a claim: where E7 writes it and on which side the claim lies."""

    claim: str  # "1b" or "2a"
    statistic: str
    ablation: str
    readout: str  # "" for claim 1b; "model" or "probe_ln" for claim 2a
    above: bool  # the claim needs a large value (True) or a small one
    scale: str  # "log" (ratios) or "linear"

    @property
    def label(self) -> str:
        how = {"": "", "model": ", own read-out", "probe_ln": ", probe after the final LN"}[self.readout]
        return f"{self.claim} {self.statistic} ({self.ablation} ablation{how})"


def trend_keys(kinds: Sequence[str] = ("zero", "mean", "resample")) -> list[TrendKey]:
    """Every statistic whose trend the report decides, in report order."""
    keys = []
    for k in kinds:
        keys += [TrendKey("1b", "neff_contrast", k, "", True, "linear"),
                 TrendKey("1b", "keep_top_contrast", k, "", True, "log"),
                 TrendKey("1b", "later_keep_top", k, "", False, "log")]
    for k in kinds:
        keys += [TrendKey("2a", "pruned_over_full", k, r, False, "log") for r in ("model", "probe_ln")]
    for k in kinds:
        keys += [TrendKey("2a", "fraction_lost", k, r, False, "linear") for r in ("model", "probe_ln")]
    return keys


def _defined(rows: Sequence[Mapping[str, Any]], key: TrendKey) -> set[float]:
    """The steps at which ``key`` is defined: every step, except that the fraction of the multi-head advantage
    lost needs that advantage (single/full's CI above :data:`~.rules.ADVANTAGE_MIN` at the same step, the
    rule E3's verdict uses)."""
    steps = {float(r["step"]) for r in rows}
    if key.statistic != "fraction_lost":
        return steps
    return {float(r["step"]) for r in rows if r["statistic"] == "single_over_full" and r["ablation"] == key.ablation
            and (r.get("readout") or "") == key.readout and float(r["ci_low"]) > ADVANTAGE_MIN}


def slope(steps: Sequence[float], values: Sequence[float], scale: str, level: float = 0.95
          ) -> tuple[float, float, float]:
    """OLS slope of ``values`` (on ``scale``) against ``log2(steps)``, with its t-interval (NaN if < 3 points)."""
    x = np.log2(np.asarray(steps, dtype=float))
    y = np.asarray(values, dtype=float)
    if scale == "log":
        y = np.log(np.where(y > 0, y, np.nan))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    fit = _stats.linregress(x, y)
    if x.size < MIN_SNAPSHOTS:
        return float(fit.slope), float("nan"), float("nan")
    half = float(_stats.t.ppf(0.5 + level / 2, x.size - 2)) * float(fit.stderr)
    return float(fit.slope), float(fit.slope) - half, float(fit.slope) + half


def seed_trend(rows: Sequence[Mapping[str, Any]], key: TrendKey) -> Verdict:
    """One seed's trend of ``key`` from its E7 claim rows: the oriented slope and the seed's own direction."""
    ok = _defined(rows, key)
    mine = sorted(((float(r["step"]), float(r["value"])) for r in rows
                   if r["statistic"] == key.statistic and r["ablation"] == key.ablation
                   and (r.get("readout") or "") == key.readout and float(r["step"]) in ok), key=lambda sv: sv[0])
    s, lo, hi = slope([m[0] for m in mine], [m[1] for m in mine], key.scale)
    sign = 1.0 if key.above else -1.0
    o, olo, ohi = sign * s, *(sorted((sign * lo, sign * hi)))
    own = REPRODUCED if olo > SLOPE_THRESHOLD else NOT_REPRODUCED if ohi < SLOPE_THRESHOLD else INCONCLUSIVE
    if len(mine) < MIN_SNAPSHOTS:
        own = INCONCLUSIVE
    per = "doubling of steps" + (", log scale" if key.scale == "log" else "")
    ev = [f"slope per {per} over steps {', '.join(str(int(m[0])) for m in mine)}: {s:+.4f} "
          f"[{lo:+.4f}, {hi:+.4f}] ({len(mine)} snapshots)"]
    stat = Stat(f"{key.label}: slope toward the paper", o, SLOPE_THRESHOLD, above=True)
    return Verdict(f"trend {key.label}", own, ev, [stat], numbers={"slope": s, "ci": [lo, hi], "steps": [m[0] for m in mine],
                                                                    "values": [m[1] for m in mine]})


def trend_verdict(per_seed_rows: Sequence[Sequence[Mapping[str, Any]]], seeds: Sequence[int], key: TrendKey) -> Verdict:
    """The across-seed trend of ``key``: *moves toward the paper*, *moves away* or *undecided*."""
    v = across_seeds([seed_trend(rows, key) for rows in per_seed_rows], seeds)
    v.verdict = _NAMES[v.verdict]
    for row in v.per_seed:
        row["verdict"] = _NAMES[row["verdict"]]
    return v


def claim_trends(per_seed_rows: Sequence[Sequence[Mapping[str, Any]]], seeds: Sequence[int],
                 kinds: Sequence[str] = ("zero", "mean", "resample")) -> dict[str, list[Verdict]]:
    """``claim -> [trend verdict per key statistic]`` for claims 1b and 2a. A statistic no seed's E7 measured
    (the fraction lost, when no h = 1 snapshots were kept) is left out rather than called undecided."""
    out: dict[str, list[Verdict]] = {"1b": [], "2a": []}
    measured = {r["statistic"] for rows in per_seed_rows for r in rows}
    for key in trend_keys(kinds):
        if key.statistic in measured:
            out[key.claim].append(trend_verdict(per_seed_rows, seeds, key))
    return out


def summary_word(verdicts: Sequence[Verdict]) -> str:
    """One word for a claim from its statistics' trends: toward / away when every decided statistic agrees
    (and at least one is decided), *mixed* when they disagree, else undecided."""
    decided = {v.verdict for v in verdicts} - {UNDECIDED}
    if not decided:
        return UNDECIDED
    return decided.pop() if len(decided) == 1 else "mixed"
