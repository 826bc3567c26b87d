"""Turning per-seed results into one verdict per claim (``docs/report.md``, "Across seeds").

A claim about trained models is decided over training seeds, never by one model. Each
per-seed rule (``icl_heads.report``) returns a :class:`Verdict` for one seed (its CIs are
over test prompts) together with the *statistics* that rule thresholds, e.g. the pruned/full
risk ratio against 1.25. :func:`across_seeds` then applies one rule to every claim:

* every statistic gets a 95% t-interval over seeds (``mean ± t_{0.975, K-1} sd / sqrt(K)``);
* **reproduced** if every seed's own verdict is *reproduced* and every statistic's interval over
  seeds lies wholly on the claim's side of its threshold;
* **not reproduced** if every seed's own verdict is *not reproduced* and some statistic's
  interval lies wholly on the other side;
* **inconclusive** otherwise: seeds that disagree, or agreeing seeds whose spread leaves the
  threshold inside the interval;
* with **one seed** there is no interval over seeds, so the claim is *inconclusive* (the seed's
  own verdict is still shown): one seed is an anecdote.

Thresholds and directions are the per-seed rules' own, so the across-seed rule adds no new
constant; with three seeds ``t_{0.975, 2} = 4.30``, so only seeds that agree closely clear it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats as _stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


@dataclass
class Stat:
    """One thresholded number of a per-seed rule: the claim holds on the side ``above``/below ``threshold``."""

    name: str
    value: float
    threshold: float
    above: bool  # True: the claim needs value > threshold; False: value < threshold

    def holds(self, lo: float, hi: float) -> bool:
        return lo > self.threshold if self.above else hi < self.threshold

    def fails(self, lo: float, hi: float) -> bool:
        return hi < self.threshold if self.above else lo > self.threshold


@dataclass
class Verdict:
    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)
    stats: list[Stat] = field(default_factory=list)
    per_seed: list[dict] = field(default_factory=list)  # filled by across_seeds: seed, verdict, stats
    numbers: dict = field(default_factory=dict)  # a per-seed rule's labelled inputs (ablation kind, CIs, ...)

    def to_json(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence,
                "stats": [s.__dict__ for s in self.stats], "per_seed": self.per_seed, "numbers": self.numbers}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval over seeds; ``(mean, nan, nan)`` for fewer than two values."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if v.size < 2 or not np.isfinite(v).all():
        return m, float("nan"), float("nan")
    half = float(_stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


def across_seeds(per_seed: Sequence[Verdict], seeds: Sequence[int]) -> Verdict:
    """One verdict for a claim from the same rule applied to each seed (rule in the module docstring)."""
    if len(per_seed) != len(seeds) or not per_seed:
        raise ValueError("need one per-seed verdict per seed")
    names = [s.name for s in per_seed[0].stats]
    if any([s.name for s in v.stats] != names for v in per_seed):
        raise ValueError(f"{per_seed[0].claim}: seeds report different statistics")
    own = [v.verdict for v in per_seed]
    summary: list[Stat] = []
    evidence: list[str] = []
    holds, fails = [], []
    for i, name in enumerate(names):
        ref = per_seed[0].stats[i]
        vals = [v.stats[i].value for v in per_seed]
        m, lo, hi = t_interval(vals)
        summary.append(Stat(name, m, ref.threshold, ref.above))
        holds.append(len(vals) > 1 and ref.holds(lo, hi))
        fails.append(len(vals) > 1 and ref.fails(lo, hi))
        side = ">" if ref.above else "<"
        per = ", ".join(f"seed {s}: {x:.3f}" for s, x in zip(seeds, vals))
        ci = f"mean {m:.3f}, 95% CI over seeds [{lo:.3f}, {hi:.3f}]" if len(vals) > 1 else "one seed, no CI"
        evidence.append(f"{name} (claim needs {side} {ref.threshold:g}): {per}; {ci}")
    if len(per_seed) < 2:
        verdict = INCONCLUSIVE
        evidence.append(f"one seed ({own[0]} for seed {seeds[0]}): not decided over seeds")
    elif all(o == REPRODUCED for o in own) and all(holds):
        verdict = REPRODUCED
    elif all(o == NOT_REPRODUCED for o in own) and any(fails):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    evidence.append("per-seed verdicts: " + ", ".join(f"seed {s} {o}" for s, o in zip(seeds, own)))
    rows = [{"seed": s, "verdict": v.verdict, "evidence": v.evidence, "stats": {x.name: x.value for x in v.stats}}
            for s, v in zip(seeds, per_seed)]
    return Verdict(per_seed[0].claim, verdict, evidence, summary, rows)
