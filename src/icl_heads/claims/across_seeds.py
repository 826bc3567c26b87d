"""Turning per-seed results into one verdict per claim (``docs/report.md``, "Across seeds").

A claim about trained models is decided over training seeds, never by one model: the seed is
the unit (random-effects view), each seed's own CIs are over test prompts. Each per-seed rule
(:mod:`icl_heads.claims.rules`) returns a :class:`Verdict` with the *statistics* it thresholds,
each with the scale it lives on:

* ``log`` for ratios and other strictly positive scale statistics (a ratio of 2 and of 1/2 are
  equally far from 1; a linear interval on 4.40, 3.55, 2.25 reaches 0.71, the log one does not);
* ``logit`` for bounded statistics (shares, differences of bounded numbers), mapped from
  ``bounds`` to (0, 1) first, so an interval never leaves the range the number can take;
* ``linear`` for the rest (signed differences).

On that scale :func:`across_seeds` computes the mean with a 95% t-interval over seeds
(``mean ± t_{0.975, K-1} sd / sqrt(K)``), the 95% prediction interval for a new seed
(``mean ± t_{0.975, K-1} sd sqrt(1 + 1/K)``) and the sign count (seeds whose value is on the
claim's side of the threshold), all reported back on the statistic's own scale. Then:

* **reproduced** if, for every statistic, the interval over seeds lies wholly on the claim's side
  and every seed's value is on that side (sign count K of K), and no seed's own verdict is
  *not reproduced*;
* **not reproduced** if some statistic's interval lies wholly on the other side with every seed's
  value there (sign count 0 of K), and no seed's own verdict is *reproduced*;
* **inconclusive** otherwise: a verdict that flips between seeds is never a pass, and with **one
  seed** there is no interval over seeds, so one seed is never decided.

Thresholds and directions are the per-seed rules' own (:mod:`icl_heads.claims.rules`); this rule
adds only the 95% level. Its power on synthetic seeds is :func:`power_table` (docs/report.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats as _stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
SCALES = ("linear", "log", "logit")
LEVEL = 0.95


@dataclass
class Stat:
    """One thresholded number of a per-seed rule: the claim holds on the side ``above``/below ``threshold``.

    ``scale`` is where seeds are averaged (module docstring); ``bounds`` are the range of a
    ``logit`` statistic. ``ci``/``pi``/``passes`` are filled by :func:`across_seeds` on its summary.
    """

    name: str
    value: float
    threshold: float
    above: bool  # True: the claim needs value > threshold; False: value < threshold
    scale: str = "linear"
    bounds: tuple[float, float] | None = None
    ci: tuple[float, float] | None = None
    pi: tuple[float, float] | None = None
    passes: int | None = None

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES} (got {self.scale!r})")
        if self.scale == "logit" and (self.bounds is None or not self.bounds[0] < self.bounds[1]):
            raise ValueError(f"{self.name}: a logit statistic needs bounds lo < hi (got {self.bounds})")

    def holds(self, lo: float, hi: float) -> bool:
        return lo > self.threshold if self.above else hi < self.threshold

    def fails(self, lo: float, hi: float) -> bool:
        return hi < self.threshold if self.above else lo > self.threshold

    def passes_value(self, v: float) -> bool:
        return bool(v > self.threshold) if self.above else bool(v < self.threshold)

    def fails_value(self, v: float) -> bool:
        return bool(v < self.threshold) if self.above else bool(v > self.threshold)

    def to_scale(self, v: np.ndarray | float) -> np.ndarray:
        """Map values onto the averaging scale (NaN where the scale cannot hold them)."""
        v = np.asarray(v, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.scale == "log":
                return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
            if self.scale == "logit":
                lo, hi = self.bounds  # type: ignore[misc]
                u = np.clip((v - lo) / (hi - lo), 1e-6, 1 - 1e-6)
                return np.where(np.isfinite(v), np.log(u / (1 - u)), np.nan)
        return v

    def from_scale(self, z: np.ndarray | float) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        if self.scale == "log":
            return np.exp(z)
        if self.scale == "logit":
            lo, hi = self.bounds  # type: ignore[misc]
            return lo + (hi - lo) / (1 + np.exp(-z))
        return z

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


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
                "stats": [s.to_json() for s in self.stats], "per_seed": self.per_seed, "numbers": self.numbers}


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and two-sided t-interval over seeds (linear scale); ``(mean, nan, nan)`` for fewer than two values."""
    m, lo, hi, _, _ = t_and_prediction(values, level)
    return m, lo, hi


def t_and_prediction(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """Mean, t-interval for the mean and prediction interval for one new value (NaN if < 2 values or any NaN)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean()) if v.size else float("nan")
    if v.size < 2 or not np.isfinite(v).all():
        return m, float("nan"), float("nan"), float("nan"), float("nan")
    t = float(_stats.t.ppf(0.5 + level / 2, v.size - 1))
    sd = float(v.std(ddof=1))
    half, pred = t * sd / np.sqrt(v.size), t * sd * np.sqrt(1 + 1 / v.size)
    return m, m - half, m + half, m - pred, m + pred


@dataclass(frozen=True)
class SeedSummary:
    """One statistic over seeds, on its own scale: mean, CI, PI, sign count; whether it holds/fails."""

    stat: Stat
    holds: bool
    fails: bool


def summarise(ref: Stat, values: Sequence[float]) -> SeedSummary:
    """The across-seed summary of one statistic (rule in the module docstring)."""
    z = ref.to_scale(np.asarray(values, dtype=float))
    zt = float(ref.to_scale(ref.threshold))
    m, lo, hi, plo, phi = t_and_prediction(z)
    back = lambda a: float(ref.from_scale(a))  # noqa: E731
    k = len(values)
    zref = Stat(ref.name, 0.0, zt, ref.above)
    finite = bool(np.isfinite(z).all())
    passes = sum(zref.passes_value(x) for x in z if np.isfinite(x))
    fails_all = finite and all(zref.fails_value(x) for x in z)
    ok = k > 1 and finite
    summary = Stat(ref.name, back(m), ref.threshold, ref.above, ref.scale, ref.bounds,
                   ci=(back(lo), back(hi)), pi=(back(plo), back(phi)), passes=int(passes))
    return SeedSummary(summary, bool(ok and zref.holds(lo, hi) and passes == k),
                       bool(ok and zref.fails(lo, hi) and fails_all))


def across_seeds(per_seed: Sequence[Verdict], seeds: Sequence[int]) -> Verdict:
    """One verdict for a claim from the same rule applied to each seed (rule in the module docstring)."""
    if len(per_seed) != len(seeds) or not per_seed:
        raise ValueError("need one per-seed verdict per seed")
    names = [s.name for s in per_seed[0].stats]
    if any([s.name for s in v.stats] != names for v in per_seed):
        raise ValueError(f"{per_seed[0].claim}: seeds report different statistics")
    own = [v.verdict for v in per_seed]
    sums = [summarise(per_seed[0].stats[i], [v.stats[i].value for v in per_seed]) for i in range(len(names))]
    evidence = [_describe(s.stat, [v.stats[i].value for v in per_seed], seeds) for i, s in enumerate(sums)]
    if len(per_seed) < 2:
        verdict = INCONCLUSIVE
        evidence.append(f"one seed ({own[0]} for seed {seeds[0]}): not decided over seeds")
    else:
        verdict = decide([s.holds for s in sums], [s.fails for s in sums], own)
    evidence.append("per-seed verdicts: " + ", ".join(f"seed {s} {o}" for s, o in zip(seeds, own)))
    rows = [{"seed": s, "verdict": v.verdict, "evidence": v.evidence, "stats": {x.name: x.value for x in v.stats}}
            for s, v in zip(seeds, per_seed)]
    return Verdict(per_seed[0].claim, verdict, evidence, [s.stat for s in sums], rows)


def decide(holds: Sequence[bool], fails: Sequence[bool], own: Sequence[str]) -> str:
    """Reproduced: every statistic holds and no seed says not reproduced; not reproduced: some statistic
    fails and no seed says reproduced; else inconclusive."""
    if holds and all(holds) and NOT_REPRODUCED not in own:
        return REPRODUCED
    if any(fails) and REPRODUCED not in own:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _describe(s: Stat, values: Sequence[float], seeds: Sequence[int]) -> str:
    side = ">" if s.above else "<"
    per = ", ".join(f"seed {k}: {x:.3f}" for k, x in zip(seeds, values))
    if len(values) < 2:
        return f"{s.name} (claim needs {side} {s.threshold:g}): {per}; one seed, no CI"
    mean = {"log": "geometric mean", "logit": "mean (logit scale)"}.get(s.scale, "mean")
    ci, pi = s.ci or (np.nan, np.nan), s.pi or (np.nan, np.nan)
    return (f"{s.name} (claim needs {side} {s.threshold:g}; {s.scale} scale): {per}; {mean} {s.value:.3f}, "
            f"95% CI over seeds [{ci[0]:.3f}, {ci[1]:.3f}], 95% prediction interval for a new seed "
            f"[{pi[0]:.3f}, {pi[1]:.3f}]; {s.passes}/{len(values)} seeds pass")


# --------------------------------------------------------------------------- power on synthetic seeds

def power(effect_sd: float, n_seeds: int, trials: int = 4000, seed: int = 0) -> dict[str, float]:
    """How often the rule says each verdict when seed values are ``N(threshold + effect_sd * sd, sd)``
    on the statistic's scale (claim side above; each seed's own verdict = the side of its value).

    Only the seed-level part of the rule is simulated: within-seed prompt noise is taken as nil.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(effect_sd, 1.0, size=(trials, n_seeds))
    ref = Stat("synthetic", 0.0, 0.0, above=True)
    counts = {REPRODUCED: 0, NOT_REPRODUCED: 0, INCONCLUSIVE: 0}
    for row in z:
        s = summarise(ref, row)
        own = [REPRODUCED if x > 0 else NOT_REPRODUCED for x in row]
        counts[decide([s.holds], [s.fails], own) if n_seeds > 1 else INCONCLUSIVE] += 1
    return {k: v / trials for k, v in counts.items()}


def power_table(effects: Sequence[float] = (0.0, 1.0, 2.0), seeds: Sequence[int] = (3, 5),
                trials: int = 4000) -> list[dict[str, float]]:
    """Rows (effect in between-seed SDs, seeds, share reproduced / not reproduced / inconclusive)."""
    return [dict(effect_sd=e, seeds=k, **power(e, k, trials)) for e in effects for k in seeds]
