"""The across-seed verdict rule (icl_heads.claims.across_seeds) on synthetic per-seed results."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from icl_heads.claims.across_seeds import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Stat, Verdict, across_seeds, t_interval


def seed(verdict: str, ratio: float, gap: float = 0.3) -> Verdict:
    """A 2a-like per-seed result: ratio needs < 1.25, gap needs > 0."""
    return Verdict("2a", verdict, [f"ratio {ratio}"],
                   [Stat("pruned/full", ratio, 1.25, above=False), Stat("gap", gap, 0.0, above=True)])


def test_t_interval_matches_a_hand_computation():
    v = [1.0, 1.2, 0.95]
    m, lo, hi = t_interval(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert m == pytest.approx(np.mean(v)) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert np.isnan(t_interval([1.0])[1])


def test_agreeing_seeds_with_tight_interval_reproduce():
    v = across_seeds([seed(REPRODUCED, r) for r in (1.02, 1.05, 1.04)], [0, 1, 2])
    assert v.verdict == REPRODUCED
    assert [p["seed"] for p in v.per_seed] == [0, 1, 2]
    assert v.stats[0].value == pytest.approx(np.mean([1.02, 1.05, 1.04]))
    assert "seed 1: 1.050" in v.evidence[0] and "95% CI over seeds" in v.evidence[0]


def test_agreeing_seeds_whose_spread_straddles_the_threshold_are_inconclusive():
    # each seed reproduces on its own, but the t-interval over seeds (t = 4.30 for 3 seeds) reaches past 1.25
    v = across_seeds([seed(REPRODUCED, r) for r in (0.9, 1.2, 1.0)], [0, 1, 2])
    m, lo, hi = t_interval([0.9, 1.2, 1.0])
    assert hi > 1.25 and v.verdict == INCONCLUSIVE


def test_agreeing_failures_are_not_reproduced():
    v = across_seeds([seed(NOT_REPRODUCED, r) for r in (4.3, 4.1, 4.6)], [0, 1, 2])
    assert v.verdict == NOT_REPRODUCED


def test_disagreeing_seeds_are_inconclusive_whatever_the_mean():
    v = across_seeds([seed(REPRODUCED, 1.0), seed(NOT_REPRODUCED, 1.01), seed(REPRODUCED, 1.0)], [0, 1, 2])
    assert v.verdict == INCONCLUSIVE
    assert v.evidence[-1] == "per-seed verdicts: seed 0 reproduced, seed 1 not reproduced, seed 2 reproduced"


def test_one_seed_is_never_decided():
    v = across_seeds([seed(REPRODUCED, 1.0)], [7])
    assert v.verdict == INCONCLUSIVE
    assert any("one seed (reproduced for seed 7)" in e for e in v.evidence)


def test_seeds_must_report_the_same_statistics():
    odd = Verdict("2a", REPRODUCED, [], [Stat("other", 1.0, 1.25, above=False)])
    with pytest.raises(ValueError):
        across_seeds([seed(REPRODUCED, 1.0), odd], [0, 1])
