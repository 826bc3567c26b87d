"""The claim rules (icl_heads.claims): across-seed scales and power, N_eff and sufficiency, typed keys, controls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from icl_heads.analysis.importance import HeadImportance, assess_heads, effective_heads, prefix_errors
from icl_heads.analysis.pruning import claim2a_stats, control_policy, default_policy, prune_gates
from icl_heads.claims.across_seeds import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Stat, Verdict, across_seeds,
                                           power, power_table, summarise)
from icl_heads.claims.keys import AblationKind, ClaimDataError, ModelKey, Readout, Variant, select
from icl_heads.claims.rules import claim_1a, claim_2b, judge_1b, judge_2a
from icl_heads.config import TaskConfig, get_preset
from icl_heads.analysis.construct import pto_transformer, spread_gd_transformer
from icl_heads.io import write_csv
from icl_heads.tasks import Prompts

DOCS = Path(__file__).resolve().parents[1] / "docs" / "report.md"


def ratio_seed(verdict: str, ratio: float) -> Verdict:
    return Verdict("2a", verdict, [], [Stat("pruned/full", ratio, 1.25, above=False, scale="log")])


# --------------------------------------------------------------------------- across seeds

def test_log_scale_rule_calls_the_quick_2a_ratios_not_reproduced():
    """Issue 15: 4.40, 3.55, 2.25 against < 1.25 -- a linear t-interval reaches 0.71, the log one does not."""
    vals = [4.40, 3.55, 2.25]
    v = across_seeds([ratio_seed(NOT_REPRODUCED, r) for r in vals], [0, 1, 2])
    assert v.verdict == NOT_REPRODUCED
    lo, hi = np.exp(stats.t.interval(0.95, 2, loc=np.mean(np.log(vals)), scale=stats.sem(np.log(vals))))
    assert v.stats[0].ci == pytest.approx((lo, hi)) and v.stats[0].ci[0] == pytest.approx(1.40, abs=0.01)
    assert v.stats[0].value == pytest.approx(stats.gmean(vals)) and v.stats[0].passes == 0
    lin = Verdict("2a", NOT_REPRODUCED, [], [Stat("pruned/full", 0.0, 1.25, above=False)])
    lin_seeds = [Verdict("2a", NOT_REPRODUCED, [], [Stat("pruned/full", r, 1.25, above=False)]) for r in vals]
    assert lin.stats[0].scale == "linear" and across_seeds(lin_seeds, [0, 1, 2]).verdict == INCONCLUSIVE


def test_prediction_interval_is_the_t_interval_for_one_new_seed():
    vals = np.array([1.1, 1.3, 0.9, 1.2, 1.0])
    s = summarise(Stat("x", 0.0, 0.0, above=True), vals).stat
    sd = vals.std(ddof=1)
    want = stats.t.interval(0.95, 4, loc=vals.mean(), scale=sd * np.sqrt(1 + 1 / 5))
    assert s.pi == pytest.approx(want) and s.ci == pytest.approx(stats.t.interval(0.95, 4, vals.mean(), stats.sem(vals)))
    assert s.passes == 5


def test_logit_scale_keeps_a_bounded_statistic_inside_its_bounds():
    st = Stat("share", 0.0, 0.5, above=True, scale="logit", bounds=(0.0, 1.0))
    s = summarise(st, [0.97, 0.6, 0.99]).stat
    assert 0 < s.ci[0] < s.ci[1] < 1 and 0 < s.pi[0] and s.pi[1] < 1
    lin = summarise(Stat("share", 0.0, 0.5, above=True), [0.97, 0.6, 0.99]).stat
    assert lin.ci[1] > 1  # the linear interval leaves [0, 1]


def test_a_sign_flip_between_seeds_is_never_a_pass():
    seeds = [ratio_seed(REPRODUCED, r) for r in (1.0, 1.01, 1.02, 1.0)] + [ratio_seed(NOT_REPRODUCED, 1.3)]
    v = across_seeds(seeds, list(range(5)))
    assert v.verdict == INCONCLUSIVE and v.stats[0].passes == 4


def test_power_of_the_rule_matches_the_noncentral_t_reference():
    """Reproduced needs the one-sided t-test at 2.5% (plus every seed on the claim side): at effect 0 it
    fires at most 2.5% of the time; otherwise its rate is at most the noncentral-t power and close to it."""
    trials = 4000
    se = np.sqrt(0.25 / trials)
    for k in (3, 5):
        assert power(0.0, k, trials)[REPRODUCED] <= 0.025 + 3 * se
        for e in (1.0, 2.0):
            ref = 1 - stats.nct.cdf(stats.t.ppf(0.975, k - 1), k - 1, e * np.sqrt(k))
            got = power(e, k, trials)[REPRODUCED]
            assert ref - 0.05 <= got <= ref + 3 * se, (k, e, got, ref)
    assert power(2.0, 5, trials)[NOT_REPRODUCED] == 0.0


def test_docs_give_the_power_table_the_code_computes():
    text = DOCS.read_text()
    for r in power_table():
        row = (f"| {r['effect_sd']:g} | {r['seeds']} | {r[REPRODUCED]:.2f} | {r[NOT_REPRODUCED]:.2f} | "
               f"{r[INCONCLUSIVE]:.2f} |")
        assert row in text, row


# --------------------------------------------------------------------------- claim 1b statistics

def test_effective_heads_closed_forms():
    got = effective_heads(np.array([[0.55, 0.15, 0.15, 0.15], [1.0, 0, 0, 0], [2.0, 2, 2, 2], [1.0, -1, 0, 1]]))
    assert got == pytest.approx([1 / (0.55 ** 2 + 3 * 0.15 ** 2), 1.0, 4.0, 2.0])
    assert np.isnan(effective_heads(np.array([[0.0, -1.0]])))[0]


def test_claim1b_stats_on_hand_built_importances():
    """Layer 1: three heads each adding 1 to the risk; layer 2: head 1 adds 2, the others nothing.
    Keeping only a layer-1 head costs 3x, only layer 2's top head 1.1x: closed forms for every statistic."""
    P, N = 40, 6
    base = np.ones((P, N))
    abl = 1 + np.array([[1.0, 1, 1], [2, 0, 0]])[:, :, None, None] * np.ones((2, 3, P, N))
    keep = np.array([[3.0, 3, 3], [1.1, 2, 2]])[:, :, None, None] * np.ones((2, 3, P, N))
    abl[..., :2] = 50.0  # n < n_from must not count
    layers, model = HeadImportance(base, abl, keep, np.ones((2, 3)), 1.0).claim1b_stats(n_from=2, n_boot=50)
    assert [r["n_eff"] for r in layers] == pytest.approx([3.0, 1.0])
    assert [r["keep_top_ratio"] for r in layers] == pytest.approx([3.0, 1.1])
    got = {r["statistic"]: r for r in model}
    assert got["neff_contrast"]["value"] == pytest.approx(2.0)
    assert got["keep_top_contrast"]["value"] == pytest.approx(3.0 / 1.1)
    assert got["later_keep_top"]["value"] == pytest.approx(1.1)
    v = judge_1b(model, layers, AblationKind.ZERO)
    assert v.verdict == REPRODUCED


# --------------------------------------------------------------------------- typed keys

def test_model_keys_spell_each_experiments_label():
    assert ModelKey(4).e1_label == "transformer h=4" and ModelKey(4).e4_label == "h=4 full"
    assert ModelKey(4, Variant.PRUNED, AblationKind.MEAN).e4_label == "h=4 pruned (mean)"
    assert ModelKey(4, Variant.PRUNED).e4_label == "h=4 pruned" and ModelKey(2).e6_label == "h2"


def test_an_unknown_label_raises_instead_of_giving_nan(tmp_path):
    e4 = tmp_path / "probes.csv"
    write_csv(e4, [dict(model="h=2 full", layer="1", n=n, risk_norm=0.5, ci_low=0.4, ci_high=0.6) for n in range(4)])
    with pytest.raises(ClaimDataError, match=r"no rows for model h=4 full in .*probes.csv"):
        claim_2b(e4, ModelKey(4), ModelKey(2))
    e1 = tmp_path / "e1_heads.csv"
    write_csv(e1, [dict(label="transformer h=1", n=n, risk_norm=0.5, ci_low=0.4, ci_high=0.6) for n in range(6)])
    with pytest.raises(ClaimDataError, match="transformer h=2"):
        claim_1a(e1, get_preset("smoke"))
    with pytest.raises(ClaimDataError, match="claim 2a"):
        judge_2a([dict(ablation="zero", readout="model", n="pooled", statistic="pruned_over_full")],
                 AblationKind.MEAN, Readout.MODEL)
    assert select([dict(a="1")], "x", "a=1", a=1) == [dict(a="1")]


# --------------------------------------------------------------------------- controls

D, S, N_MAX, N_FROM = 4, 1, 32, 16
TASK = TaskConfig(d=D, s=S, sigma=0.1, n_max=N_MAX)


def signed_prompts(batch: int, seed: int) -> Prompts:
    """Prompts with w*_j = +-1 on a random support: fixed-magnitude weights, where a fixed step (what a
    linear-attention layer computes) is well scaled on every prompt; Gaussian w* make the fixed-step
    construction's mean risk heavy-tailed (worse than the zero predictor at small n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N_MAX + 1, D, generator=g)
    w = torch.zeros(batch, D)
    for i in range(batch):
        w[i, torch.randperm(D, generator=g)[:S]] = torch.randint(0, 2, (S,), generator=g).float() * 2 - 1
    f = (x @ w[:, :, None])[..., 0]
    return Prompts(x, f + 0.1 * torch.randn(f.shape, generator=g), w, f)


def judged(full, single) -> tuple[Verdict, Verdict]:
    """Claims 1b and 2a for a hand-built model by E2's and E3's own functions and the report's rules
    (heads ranked on "val" prompts over n >= N_FROM, scored on "test" prompts, zero ablation, own read-out)."""
    val, test = signed_prompts(300, 1), signed_prompts(300, 2)
    imp = assess_heads(full, val, TASK, n_min=N_FROM)
    layers, model = imp.claim1b_stats(N_FROM, n_boot=300)
    policy = default_policy(full.cfg.n_layers)
    errs = {"full": prefix_errors(full, test), "single": prefix_errors(single, test),
            "pruned": prefix_errors(full, test, prune_gates(imp, policy)),
            "control": prefix_errors(full, test, prune_gates(imp, control_policy(policy)))}
    rows = claim2a_stats(errs, N_FROM, n_boot=300, ablation="zero", readout="model")
    return judge_1b(model, layers, AblationKind.ZERO), judge_2a(rows, AblationKind.ZERO, Readout.MODEL)


def test_hand_built_pto_transformer_reproduces_1b_and_2a():
    """Positive control (E6c): d rank-one heads in layer 1, one GD head in the later layer; h = 1 counterpart:
    the same construction with one coordinate group."""
    v1b, v2a = judged(pto_transformer(D, 1, 0.4).float(), pto_transformer(D, 1, 0.4, groups=1).float())
    assert v1b.verdict == REPRODUCED, v1b.evidence
    assert v2a.verdict == REPRODUCED, v2a.evidence
    assert v1b.numbers["n_eff"][1] == pytest.approx(1.0) and v1b.numbers["n_eff"][0] > 3.5


def test_control_with_one_head_in_layer_1_and_spread_later_layers_does_not_reproduce():
    """Negative control: one working head in layer 1 (<r, x>), each later GD step split over d + 1 heads.
    1b comes out not reproduced; 2a never reproduced (here inconclusive: the model is weak, so pruning
    can cost it at most ~1.2x, and its h = 1 counterpart is no worse, so no advantage can be lost)."""
    full = spread_gd_transformer(D, 1, 0.1, D + 1, b=0.3).float()
    v1b, v2a = judged(full, pto_transformer(D, 1, 0.1, groups=1, a=1.0).float())
    assert v1b.verdict == NOT_REPRODUCED, v1b.evidence
    assert v1b.numbers["n_eff"][0] == pytest.approx(1.0) and v1b.numbers["n_eff"][1] > 3
    assert v2a.verdict != REPRODUCED, v2a.evidence


def test_spread_control_is_grouped_pto_with_one_group():
    from icl_heads.estimators import pto_groups

    p = signed_prompts(50, 3)
    x, y = p.x.double()[:, :9], p.y.double()[:, :9]
    got = spread_gd_transformer(D, 2, 0.05, 3)(x, y)[:, 0]
    assert torch.allclose(got, pto_groups(x, y, 1, 1.0, 2, 0.05, step="fixed")[:, 8], atol=1e-10)


def test_full_mask_models_are_assessed_per_prefix():
    """A full-mask model's E2 errors at context length n are its errors on the first n + 1 examples."""
    m = pto_transformer(D, 1, 0.3).float()
    p = signed_prompts(20, 4)
    imp = assess_heads(m, p, TASK)
    assert imp.base_err.shape == (20, N_MAX + 1)
    n = 7
    sub = Prompts(p.x[:, :n + 1], p.y[:, :n + 1], p.w, p.f[:, n:n + 1])
    want = ((m(sub.x, sub.y)[:, 0].double() - sub.f[:, 0].double()) ** 2).detach().numpy()
    assert imp.base_err[:, n] == pytest.approx(want, rel=1e-6)


def test_effective_heads_by_n_on_hand_built_importances():
    """Per n: at n = 3 layer 1's three heads matter equally (N_eff 3), at n = 4 only head 2 (N_eff 1)."""
    P, N = 10, 5
    base = np.ones((P, N))
    abl = np.ones((2, 3, P, N))
    abl[0, :, :, 3] += 1.0
    abl[0, 1, :, 4] += 2.0
    abl[1, 0] += 1.0
    keep = np.full((2, 3, P, N), 2.0)
    rows = HeadImportance(base, abl, keep, np.ones((2, 3)), 1.0, n_min=3).effective_heads_by_n()
    at = {(r["layer"], r["n"]): r for r in rows}
    assert at[(1, 3)]["n_eff"] == pytest.approx(3.0) and at[(1, 4)]["n_eff"] == pytest.approx(1.0)
    assert at[(1, 4)]["top_head"] == 2 and at[(2, 3)]["n_eff"] == pytest.approx(1.0)
    assert at[(2, 4)]["keep_top_ratio"] == pytest.approx(2.0) and min(n for _, n in at) == 3


def test_competent_control_with_the_gd_step_split_over_heads_does_not_reproduce_2a():
    """Competent negative control for 2a: exact PtO (d rank-one heads in layer 1) whose GD step is split
    over d heads by coordinate (``pto_transformer(gd_heads=d)``, the same function as the positive
    control). Pruning the later layer to its top head keeps one feature's share of the step, so it must
    lose the multi-head advantage: 2a not reproduced. 1b is not reproduced either (the later layer
    needs as many heads as layer 1)."""
    full = pto_transformer(D, 1, 0.4, gd_heads=D).float()
    v1b, v2a = judged(full, pto_transformer(D, 1, 0.4, groups=1).float())
    assert v2a.verdict == NOT_REPRODUCED, v2a.evidence
    assert v2a.numbers["pruned_over_full"]["ci_low"] > 1.25
    assert v1b.verdict == NOT_REPRODUCED, v1b.evidence


def test_bootstrap_counts_are_a_fresh_multinomial_draw_shared_read_only():
    """The cached resample counts equal the draw each statistic used to make, and cannot be altered by a caller."""
    from icl_heads.metrics import boot_counts

    c = boot_counts(50, 30, 4)
    fresh = np.random.default_rng(4).multinomial(50, np.full(50, 1 / 50), size=30)
    np.testing.assert_array_equal(c, fresh)
    assert c.dtype == np.float64 and (c.sum(1) == 50).all() and boot_counts(50, 30, 4) is c
    with pytest.raises(ValueError):
        c[0, 0] = 1.0
    assert not np.array_equal(boot_counts(50, 30, 5), c)
