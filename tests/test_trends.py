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


FRAC = TrendKey("2a", "fraction_lost", "zero", "model", above=False, scale="linear")


def advantage(steps, ci_lows):
    return [dict(step=s, statistic="single_over_full", ablation="zero", readout="model", value=lo + 0.1, ci_low=lo,
                 ci_high=lo + 0.2) for s, lo in zip(steps, ci_lows)]


def test_the_fraction_lost_trend_reads_only_steps_with_a_multi_head_advantage():
    # the fraction falls (toward the paper) where it is defined; the step without an advantage (CI low 0.9,
    # single/full not above 1) carries a wild value that would reverse the slope if it were read
    data = rows(FRAC, [0.8, 0.6, 0.4, 5.0]) + advantage(STEPS, [1.3, 1.2, 1.1, 0.9])
    v = seed_trend(data, FRAC)
    assert v.numbers["steps"] == STEPS[:3] and v.numbers["slope"] == pytest.approx(-0.2)
    assert v.stats[0].value == pytest.approx(0.2)  # oriented: a falling fraction moves toward the paper


def test_a_statistic_no_seed_measured_is_left_out_of_the_claim():
    data = [series(RATIO, 0.3, k) for k in range(3)]
    plain = [v.claim for v in claim_trends(data, [0, 1, 2], kinds=("zero",))["2a"]]
    assert len(plain) == 2 and not any("fraction_lost" in c for c in plain)  # pruned/full by both read-outs
    with_frac = [d + rows(FRAC, 0.5 + 0.01 * k + np.array([0.0, 0.1, 0.22, 0.3])) + advantage(STEPS, [1.5] * 4)
                 for k, d in enumerate(data)]
    out = claim_trends(with_frac, [0, 1, 2], kinds=("zero",))["2a"]
    assert [v.claim for v in out][2:] == ["trend " + FRAC.label, "trend " + FRAC.label.replace("own read-out", "probe after the final LN")]
    assert out[2].verdict == AWAY and out[3].verdict == UNDECIDED  # the probe read-out's rows were never written
