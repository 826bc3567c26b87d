"""E6a/E6b: the readouts recover what the hand-built PtO transformer computes, and nothing it does not."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from icl_heads.analysis.mechanism import (ALGORITHMS, Activations, Algorithm, activations, algorithm_paths,
                                          analyse_model, decodable_directions, feature_targets, final_output_any_t,
                                          optimisation_readout, preprocessing_readout, summarise_e6b, verdicts)
from icl_heads.checkpoint import save_checkpoint
from icl_heads.config import TaskConfig, get_preset
from icl_heads.analysis.construct import pto_transformer
from icl_heads.estimators import gd, group_slices, pto
from icl_heads.experiments.e6_mechanism import run_e6
from icl_heads.io import read_csv
from icl_heads.model import Transformer
from icl_heads.tasks import fixed_prompts

TASK = TaskConfig(d=4, s=2, sigma=0.1, n_max=8)
ETA = 0.1


@pytest.fixture(scope="module")
def construct_results():
    model = pto_transformer(TASK.d, 2, ETA)
    sets = [fixed_prompts(TASK, b, 0, s) for b, s in ((400, "probe"), (200, "val"), (200, "test"))]
    algs = [Algorithm("pto_fixed", "pto", "fixed", (0.5 * ETA, ETA, 2 * ETA)), ALGORITHMS["gd_fixed"]]
    return analyse_model(model, TASK, *sets, "construct", algs)


def test_feature_targets_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 6))
    pos = np.arange(5)
    t = feature_targets(x, y, pos)
    for b in range(3):
        full = sum(y[b, k] * x[b, k] for k in range(5)) / 5
        for i in range(5):
            pre = sum(y[b, k] * x[b, k] for k in range(i + 1)) / (i + 1)
            np.testing.assert_allclose(t["pto_prefix"][b, i], pre * x[b, i], rtol=1e-12)
            np.testing.assert_allclose(t["pto_full"][b, i], full * x[b, i], rtol=1e-12)
            np.testing.assert_allclose(t["yx"][b, i], y[b, i] * x[b, i], rtol=1e-12)


def test_e6a_construct_decodes_full_context_features(construct_results):
    r2 = {(r["source"], r["target"], r["feature"]): r["r2"] for r in construct_results["r2"]}
    for j in range(TASK.d):  # layer 1 of the construction writes r_j x_ij exactly: R^2 = 1 per feature
        assert r2[("layer1", "pto_full", str(j))] > 1 - 1e-8
    assert r2[("layer1", "x", "mean")] > 1 - 1e-8  # positive control: the skip connection carries x
    assert r2[("embed", "pto_full", "mean")] < 0.6  # before layer 1 the features are not linearly there
    assert r2[("layer1", "pto_prefix", "mean")] < 0.9  # the construction uses the full context, not prefixes
    assert r2[("layer1", "yx", "mean")] < 0.2


def test_e6b_construct_lens_is_exactly_pto(construct_results):
    rows = [r for r in construct_results["agreement"] if r["readout"] == "lens" and r["eta_fit"] == "match"]
    assert {r["layer"] for r in rows} == {2, 3}
    for r in rows:
        assert r["n"] == TASK.n_max  # full mask: one query with N - 1 context examples
        if r["algorithm"] == "pto_fixed":
            assert r["step_size"] == ETA and r["rel_err"] < 1e-20 and r["corr"] > 1 - 1e-12
        else:
            assert r["rel_err"] > 1e-2 and r["corr"] < 0.99
    summary = summarise_e6b(construct_results["agreement"])
    for r in summary:  # the per-prompt detail used by the bootstrap reproduces the summary
        sq, r2, n = construct_results["detail"][(r["model"], r["readout"], r["layer"], r["algorithm"], r["eta_fit"])]
        assert np.mean(sq.sum(0) / r2.sum(0)) == pytest.approx(r["mean_rel_err"], rel=1e-9)
        assert list(n) == [TASK.n_max]
    v = verdicts(construct_results["detail"], TASK.d)
    assert {x["n_range"] for x in v} == {"all", f"n>{TASK.d}"}  # the one query has n = 8 > d = 4
    lens = [x for x in v if x["readout"] == "lens" and x["eta_fit"] == "match"]
    assert len(lens) == 4 and all(x["tracks"] == "pto" and x["diff_ci_low"] > 0 for x in lens)


def _fake_acts(reads: np.ndarray, q_pos: np.ndarray) -> Activations:
    L, B, Q = reads.shape
    return Activations({}, np.zeros((L, B, Q, 1)), reads, np.zeros(0, int), q_pos, q_pos)


def test_e6b_recovers_a_planted_gd_step():
    """A 'layer' whose output is GD after one step of size 0.2 (from estimators.gd) is matched by gd_fixed."""
    task = TaskConfig(d=3, s=1, sigma=0.1, n_max=6)
    val, test = fixed_prompts(task, 100, 1, "val"), fixed_prompts(task, 100, 1, "test")
    q_pos = np.arange(task.n_max + 1)
    planted = {k: gd(p.x, p.y, 1, 0.2).numpy() for k, p in (("val", val), ("test", test))}
    reads = {k: {"lens": np.stack([np.zeros_like(v), v]), "probe": np.stack([np.zeros_like(v), v])}
             for k, v in planted.items()}
    acts = {k: _fake_acts(reads[k]["lens"], q_pos) for k in reads}
    algs = [Algorithm("gd_fixed", "gd", "fixed", (0.1, 0.2, 0.4)), ALGORITHMS["pto_fixed"]]
    rows = optimisation_readout(task, val, test, acts["val"], acts["test"], reads["val"], reads["test"], algs)
    assert {r["n"] for r in rows} == set(range(1, task.n_max + 1))
    for r in rows:
        if r["algorithm"] == "gd_fixed" and r["eta_fit"] == "match":
            assert r["step_size"] == 0.2 and r["rel_err"] < 1e-20
        if r["algorithm"] == "gd_fixed" and r["eta_fit"] == "risk":  # independent of the readout
            f = test.f.numpy()[:, r["n"]]
            a = gd(test.x, test.y, 1, r["step_size"]).numpy()[:, r["n"]]
            p = planted["test"][:, r["n"]]
            assert r["alg_risk_norm"] == pytest.approx(((a - f) ** 2).mean() / task.s, rel=1e-9)
            assert r["rel_err"] == pytest.approx(((p - a) ** 2).mean() / (p**2).mean(), rel=1e-9)
            assert r["corr"] == pytest.approx(np.corrcoef(p, a)[0, 1], rel=1e-9)


def test_activations_shapes_prefix_model():
    cfg = get_preset("smoke").model_config_for(2)
    model = Transformer(cfg)
    p = fixed_prompts(get_preset("smoke").task, 7, 0, "test")
    a = activations(model, p, batch_size=3)
    N = p.x.shape[1]
    assert a.context["layer1"].shape == (7, N - 1, cfg.d_model)
    assert a.query.shape == (cfg.n_layers, 7, N, cfg.d_model)
    np.testing.assert_array_equal(a.q_n, np.arange(N))
    with torch.no_grad():
        np.testing.assert_allclose(a.lens[-1], model(p.x.float(), p.y.float()).double().numpy(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    pre = get_preset("smoke")
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for h in (2, 1):
        torch.manual_seed(h)
        path = root / f"h{h}"
        save_checkpoint(path, Transformer(pre.model_config_for(h)),
                        {"task": pre.task.model_dump(), "preset": "smoke", "seed": 0})
        paths.append(path)
    return paths


def test_run_e6_writes_everything(tiny_ckpts, tmp_path):
    out = tmp_path / "e6"
    s = run_e6(tiny_ckpts[0], out, single_ckpt=tiny_ckpts[1], n_prompts=40)
    for f in ("e6a_r2.csv", "e6a_r2_by_position.csv", "e6b_agreement.csv", "e6b_summary.csv", "e6b_verdict.csv",
              "e6c_construct.csv", "e6a_r2.png", "e6b_agreement_h2.png", "e6b_agreement_h1.png",
              "summary.json", "config.json"):
        assert (out / f).exists(), f
    assert s["e6c_max_abs_dev"] < 1e-8
    models = {r["model"] for r in read_csv(out / "e6b_agreement.csv")}
    assert models == {"h2", "h1"}
    for row in read_csv(out / "e6c_construct.csv"):
        assert float(row["max_rel_dev"]) < 1e-12


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "icl_heads", "mechanism", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [(["--prompts", "2"], "prompts"), (["--preset", "huge"], "preset")])
def test_cli_bad_input(tiny_ckpts, tmp_path, args, needle):
    res = run_cli(str(tiny_ckpts[0]), "--out", str(tmp_path / "o"), *args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_missing_checkpoint(tmp_path):
    res = run_cli(str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not a checkpoint" in res.stderr


def test_final_any_t_finds_the_planted_number_of_steps():
    """A 'model' that outputs scale-free PtO after 5 steps (c = 0.5) is matched best at T = 5 by pto_scale_free."""
    task = TaskConfig(d=3, s=1, sigma=0.1, n_max=6)
    val, test = fixed_prompts(task, 80, 2, "val"), fixed_prompts(task, 80, 2, "test")
    planted = [pto(p.x, p.y, 5, 0.5, step="scale_free").numpy() for p in (val, test)]
    q = np.arange(task.n_max + 1)
    algs = [Algorithm("pto_scale_free", "pto", "scale_free", (0.25, 0.5, 1.0)), ALGORITHMS["gd_fixed"]]
    rows = final_output_any_t(task, val, test, *planted, q, q, T_grid=(1, 5, 20), algorithms=algs)
    by = {(r["algorithm"], r["T"]): r["mean_rel_err"] for r in rows}
    assert by[("pto_scale_free", 5)] < 1e-20
    assert min(by[("pto_scale_free", 1)], by[("pto_scale_free", 20)], *(v for k, v in by.items() if k[0] == "gd_fixed")) > 1e-4


def test_path_cache_reuses_and_equals_fresh_paths():
    """E6 shares the (model-independent) algorithm paths between models: cached paths equal fresh ones."""
    p = fixed_prompts(TASK, 30, 0, "val")
    algs = [Algorithm("pto_fixed", "pto", "fixed", (0.05, 0.1)), Algorithm("gd_sf", "gd", "scale_free", (0.5, 1.0))]
    cache: dict = {}
    first = algorithm_paths(TASK, p, [1, 3], algs, cache)
    again = algorithm_paths(TASK, p, [1, 3], algs, cache)
    fresh = algorithm_paths(TASK, p, [1, 3], algs)
    assert len(cache) == 2 and all(again[k] is first[k] for k in first)
    for k in first:
        np.testing.assert_array_equal(first[k], fresh[k])
    # the last axis holds every prefix: GD after T steps from w = 0 is the gd estimator with that step
    np.testing.assert_allclose(fresh["gd_sf"][1, 1], gd(p.x, p.y, 3, 1.0, step="scale_free").numpy(), rtol=1e-12)


def test_group_targets_sum_the_features_of_each_group():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 5, 5)), rng.normal(size=(2, 5))
    t = feature_targets(x, y, np.arange(4), heads=2)
    assert t["pto_full_groups"].shape == (2, 4, 2)
    for k, g in enumerate(group_slices(5, 2)):
        np.testing.assert_allclose(t["pto_full_groups"][..., k], t["pto_full"][..., g].sum(-1), rtol=1e-12)
    assert "pto_full_groups" not in feature_targets(x, y, np.arange(4), heads=5)  # h = d: the features themselves


def test_decodable_directions_closed_form():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(4000, 3)) @ np.array([[1.0, 0.3, 0], [0, 1, 0.5], [0.2, 0, 1]])
    pred = truth.copy()
    pred[:, 2] = 0.0  # the third coordinate cannot be decoded; the first two exactly
    k, r2 = decodable_directions(truth, pred)
    assert k == 2 and r2[:2] == pytest.approx([1, 1], abs=1e-9) and r2[2] < 0.5
    half = truth + rng.normal(size=truth.shape) * truth.std(0)  # noise as large as the signal: R^2 = 1/2 each
    assert decodable_directions(truth, truth + 0.1 * (half - truth))[0] == 3


@pytest.mark.parametrize("h", [2, 4])
def test_layer1_of_the_construction_carries_h_preprocessed_directions(h):
    """The grouped construction with h heads writes h group features: E6a decodes the h-group targets with
    R^2 = 1 and counts h directions of diag(r) x, not d (h = d = 4: all four)."""

    model = pto_transformer(TASK.d, 1, ETA, groups=h)
    probe, test = fixed_prompts(TASK, 400, 0, "probe"), fixed_prompts(TASK, 200, 0, "test")
    rows, _ = preprocessing_readout(activations(model, probe), probe, activations(model, test), test, heads=h)
    r2 = {(r["source"], r["target"], r["feature"]): r["r2"] for r in rows}
    assert r2[("layer1", "pto_full", "directions")] == h
    if h < TASK.d:
        assert r2[("layer1", "pto_full_groups", "mean")] > 1 - 1e-8
        assert r2[("layer1", "pto_full", "mean")] < 0.9


def test_e6b_puts_competent_baselines_beside_pto_and_gd(construct_results):
    """Ridge and GD with many steps sit beside PtO(l-1) / GD(l-1); the construction's lens is exact PtO,
    so PtO is closer than both baselines, and the baselines never count as the GD side of the verdict."""
    v = verdicts(construct_results["detail"], TASK.d, n_boot=100)
    lens = [r for r in v if r["readout"] == "lens" and r["eta_fit"] == "match" and r["n_range"] == "all"]
    assert lens and all({"ridge_rel_err", "gd_many_rel_err"} <= set(r) for r in lens)
    assert all(r["pto_closer_than_baselines"] and r["best_gd"] not in ("ridge", "gd_many") for r in lens)
    algs = {r["algorithm"]: r["kind"] for r in construct_results["agreement"]}
    assert algs["ridge"] == "baseline" and algs["gd_many"] == "baseline"
