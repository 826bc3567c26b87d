"""E7's ``trend``: how the head pattern moves over training, on hand-built snapshot rows with a known answer."""

from __future__ import annotations

from typing import Any

import pytest

from icl_heads.analysis.emergence import LEARNING, trend


def _row(step: int, layer: int, risk: float, share: float, pruned: float, w: float = 0.02) -> dict[str, Any]:
    """One (snapshot, layer) row: top-head share and pruned/full, each with a CI of half-width ``w``."""
    return {"step": step, "layer": layer, "risk_norm_at_d": risk, "top_share": share, "ci_low": share - w,
            "ci_high": share + w, "pruned_ratio": pruned, "pruned_ci_low": pruned - w, "pruned_ci_high": pruned + w}


def _snaps(*snaps: tuple[int, float, list[float], float], w: float = 0.02) -> list[dict[str, Any]]:
    """``(step, risk at n = d, top share per layer, pruned/full)`` -> rows, shuffled by layer order."""
    rows = [_row(s, l + 1, r, sh, p, w) for s, r, shares, p in snaps for l, sh in enumerate(shares)]
    return rows[::-1]  # trend sorts steps and layers itself


def test_the_paper_pattern_emerging_strengthens_both_claims_from_the_first_learning_snapshot():
    rows = _snaps((100, 0.99, [0.3, 0.3, 0.3], 5.0),  # predict-zero plateau: skipped
                  (200, 0.60, [0.6, 0.4, 0.4], 3.0),
                  (400, 0.20, [0.4, 0.8, 0.7], 1.5))
    t = trend(rows)
    assert (t["from_step"], t["to_step"]) == (200, 400)
    assert t["layer_top_share"] == {1: "falls", 2: "rises", 3: "rises"}
    assert t["claim_1b"] == "strengthens" and t["pruned_ratio"] == "falls" and t["claim_2a"] == "strengthens"
    assert t["first"] == {"shares": [0.6, 0.4, 0.4], "pruned_ratio": 3.0}
    assert t["last"] == {"shares": [0.4, 0.8, 0.7], "pruned_ratio": 1.5}


def test_the_mirror_pattern_fades_and_moves_both_ways_are_mixed():
    fade = trend(_snaps((10, 0.5, [0.4, 0.8], 1.2), (20, 0.3, [0.7, 0.5], 2.0)))
    assert fade["layer_top_share"] == {1: "rises", 2: "falls"} and fade["claim_1b"] == "fades"
    assert fade["claim_2a"] == "fades"
    mixed = trend(_snaps((10, 0.5, [0.4, 0.4], 1.2), (20, 0.3, [0.7, 0.7], 1.2)))
    assert mixed["layer_top_share"] == {1: "rises", 2: "rises"} and mixed["claim_1b"] == "mixed"
    assert mixed["claim_2a"] == "flat"


def test_overlapping_intervals_are_flat_and_no_learning_snapshot_starts_at_the_first():
    wide = trend(_snaps((10, 0.5, [0.4, 0.5], 2.0), (20, 0.3, [0.5, 0.4], 1.9), w=0.1))
    assert wide["layer_top_share"] == {1: "flat", 2: "flat"} and wide["claim_1b"] == "flat"
    assert wide["pruned_ratio"] == "flat"
    # the same moves with tight intervals are decided: the CI width, not the point, is what gates
    tight = trend(_snaps((10, 0.5, [0.4, 0.5], 2.0), (20, 0.3, [0.5, 0.4], 1.9), w=0.01))
    assert tight["layer_top_share"] == {1: "rises", 2: "falls"} and tight["claim_1b"] == "fades"
    plateau = trend(_snaps((10, LEARNING + 0.05, [0.3, 0.3], 3.0), (20, LEARNING + 0.01, [0.3, 0.3], 3.0)))
    assert plateau["from_step"] == 10


def test_claim_rows_with_the_h1_snapshot_add_the_fraction_lost_as_e3_defines_it():
    """With the single-head model of the same step, each (ablation, read-out) gains single/full and the fraction
    lost; single/full is the pooled mean error of the h = 1 model over the full model's (by the same read-out,
    computed here independently), and the fraction is (pruned/full - 1) / (single/full - 1) on the same prompts."""
    import numpy as np
    import torch

    from icl_heads.analysis.emergence import claim_stat_rows
    from icl_heads.analysis.probes import final_readouts
    from icl_heads.claims.keys import in_context_n_min
    from icl_heads.config import ModelConfig, TaskConfig
    from icl_heads.model import Transformer
    from icl_heads.tasks import fixed_prompts

    task = TaskConfig(d=4, s=2, sigma=0.1, n_max=8)
    models = []
    for h in (2, 1):
        torch.manual_seed(h)
        models.append(Transformer(ModelConfig(n_dims=4, n_max=8, n_heads=h, d_model=16, n_layers=2)).eval())
    multi, single = models
    val, test, fit = (fixed_prompts(task, 64, 0, s) for s in ("val", "test", "probe"))
    plain = claim_stat_rows(multi, task, 100, val, test, fit, 0, kinds=("zero",), n_boot=50)
    rows = claim_stat_rows(multi, task, 100, val, test, fit, 0, kinds=("zero",), n_boot=50, single=single)
    assert {r["statistic"] for r in plain} & {"single_over_full", "fraction_lost"} == set()
    assert [r for r in rows if r["statistic"] not in ("single_over_full", "fraction_lost")] == plain
    at = {(r["statistic"], r["readout"]): r["value"] for r in rows}
    n0 = in_context_n_min(task.d)
    full, one = final_readouts(multi, fit, test), final_readouts(single, fit, test)
    for readout in ("model", "probe_ln"):
        want = one[readout][:, n0:].mean() / full[readout][:, n0:].mean()
        assert at["single_over_full", readout] == pytest.approx(want, rel=1e-9)
        frac = (at["pruned_over_full", readout] - 1) / (at["single_over_full", readout] - 1)
        assert at["fraction_lost", readout] == pytest.approx(frac, rel=1e-9)
