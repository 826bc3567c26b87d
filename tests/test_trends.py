"""The trend rule (issue 23) on synthetic snapshot series with a known direction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from icl_heads.claims.trends import (AWAY, TOWARD, UNDECIDED, TrendKey, claim_trends, seed_trend, slope, summary_word,
                                     trend_verdict)
from icl_heads.analysis.emergence import late_steps

STEPS = [2000, 4000, 8000, 16000]
RATIO = TrendKey("2a", "pruned_over_full", "zero", "model", above=False, scale="log")  # the claim wants it small
CONTRAST = TrendKey("1b", "neff_contrast", "mean", "", above=True, scale="linear")  # the claim wants it large


def rows(key: TrendKey, values, steps=STEPS):
    return [dict(step=s, statistic=key.statistic, ablation=key.ablation, readout=key.readout, value=v)
            for s, v in zip(steps, values)]


def series(key: TrendKey, per_doubling: float, seed: int, noise: float = 0.02):
    """A statistic changing by ``per_doubling`` per doubling of steps (on its scale), with seed noise."""
    rng = np.random.default_rng(seed)
    z = 0.3 + per_doubling * np.log2(np.asarray(STEPS) / STEPS[0]) + rng.normal(0, noise, len(STEPS))
    return rows(key, np.exp(z) if key.scale == "log" else z)


def test_slope_matches_scipy_on_log2_steps_and_its_interval_is_the_t_interval():
    v = [4.0, 3.0, 2.5, 1.9]
    s, lo, hi = slope(STEPS, v, "log")
    ref = stats.linregress(np.log2(STEPS), np.log(v))
    half = stats.t.ppf(0.975, 2) * ref.stderr
    assert s == pytest.approx(ref.slope) and (lo, hi) == pytest.approx((ref.slope - half, ref.slope + half))
    assert np.isnan(slope(STEPS[:2], v[:2], "log")[1])  # two snapshots: a slope, no interval


@pytest.mark.parametrize("n_seeds", [3, 5])
@pytest.mark.parametrize("key", [RATIO, CONTRAST])
def test_toward_away_and_flat_series_get_their_verdicts(key, n_seeds):
    toward = -0.3 if not key.above else 0.3  # the claim's side
    for per_doubling, want in ((toward, TOWARD), (-toward, AWAY)):
        v = trend_verdict([series(key, per_doubling, k) for k in range(n_seeds)], list(range(n_seeds)), key)
        assert v.verdict == want, v.evidence
    flat = trend_verdict([series(key, 0.0, k, noise=0.1) for k in range(n_seeds)], list(range(n_seeds)), key)
    assert flat.verdict == UNDECIDED, flat.evidence


def test_one_seed_against_the_others_leaves_it_undecided_and_one_seed_is_never_decided():
    key = RATIO
    mixed = [series(key, -0.3, k) for k in range(4)] + [series(key, +0.3, 9)]
    assert trend_verdict(mixed, list(range(5)), key).verdict == UNDECIDED
    assert trend_verdict([series(key, -0.3, 0)], [0], key).verdict == UNDECIDED


def test_the_seed_slope_is_oriented_toward_the_claim_side():
    falling_ratio = seed_trend(rows(RATIO, [4.0, 3.0, 2.0, 1.5]), RATIO)
    assert falling_ratio.stats[0].value > 0 and falling_ratio.numbers["slope"] < 0


def test_late_steps_are_the_second_half_on_the_log_scale():
    assert late_steps([125, 250, 500, 1000, 2000, 4000, 8000, 16000]) == [2000, 4000, 8000, 16000]
    assert late_steps([10, 20]) == [10, 20]


def test_claim_words_agree_or_are_mixed():
    key2 = TrendKey("2a", "pruned_over_full", "zero", "probe_ln", above=False, scale="log")
    data = [series(RATIO, 0.3, k) + series(key2, 0.3, k + 10) for k in range(5)]
    out = claim_trends(data, list(range(5)), kinds=("zero",))
    assert [v.verdict for v in out["2a"]] == [AWAY, AWAY]
    assert summary_word(out["2a"]) == AWAY
    assert summary_word([out["2a"][0], trend_verdict([series(RATIO, -0.3, k) for k in range(5)], list(range(5)), RATIO)]) == "mixed"
