"""E4: layer-wise ridge probes, checked on known linear targets and a closed-form floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_heads.checkpoint import save_checkpoint
from icl_heads.cli import main
from icl_heads.config import ConfigError, ModelConfig, Preset, TaskConfig
from icl_heads.evaluation import predict
from icl_heads.io import read_csv, read_json
from icl_heads.model import Transformer
from icl_heads.tasks import Prompts, fixed_prompts
from icl_heads.analysis.probes import final_probe_errors, final_readouts, layer_labels, probe_layers, query_states
from icl_heads.metrics import squared_errors

TASK = TaskConfig(d=4, s=2, sigma=0.1, n_max=8)


def small_model(heads: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_dims=4, n_max=8, d_model=16, n_layers=2, n_heads=heads)).eval()


@pytest.fixture(scope="module")
def sets():
    return fixed_prompts(TASK, 300, 0, "probe"), fixed_prompts(TASK, 300, 0, "test")


def test_query_states_are_what_the_read_out_sees(sets):
    m = small_model()
    _, test = sets
    s = query_states(m, test, batch_size=64)  # several batches
    assert s.shape == (3, 300, TASK.n_max + 1, 16)
    with torch.no_grad():
        again = m.read_out(m.ln_f(torch.from_numpy(s[-1]).float())).squeeze(-1).double()
    torch.testing.assert_close(again, predict(m, test), rtol=1e-5, atol=1e-6)


def test_final_readouts_are_the_three_separate_readouts(sets):
    """E3's one-pass read-outs equal the model's own predictions and both final probes computed apart."""
    m = small_model(heads=2, seed=3)
    fit, test = sets
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = final_readouts(m, fit, test, gates)
    np.testing.assert_array_equal(got["model"], squared_errors(predict(m, test, head_gates=gates), test.f))
    np.testing.assert_allclose(got["probe"], final_probe_errors(m, fit, test, gates), rtol=1e-9)
    np.testing.assert_allclose(got["probe_ln"], final_probe_errors(m, fit, test, gates, after_ln=True), rtol=1e-9)


def test_probe_recovers_a_known_linear_function_of_the_hidden_state(sets):
    m = small_model(seed=1)
    fit, test = sets
    rng = np.random.default_rng(0)
    a, c = rng.normal(size=16), 0.3
    layer = 1  # after block 1

    def relabel(p: Prompts) -> Prompts:
        t = query_states(m, p)[layer] @ a + c  # (P, N): a linear function of the state at each query
        return Prompts(p.x, p.y, p.w, torch.from_numpy(t))

    fit2, test2 = relabel(fit), relabel(test)
    rows = probe_layers(m, fit2, test2, TASK)
    by = {(r["layer"], r["n"]): r for r in rows}
    var = float(test2.f.var())
    for n in range(TASK.n_max + 1):
        assert by[("1", n)]["risk"] < 1e-6 * var, n
    # the same target is not linear in the read-in embedding: those probes do much worse
    assert np.mean([by[("embed", n)]["risk"] for n in range(1, TASK.n_max + 1)]) > 1e-3 * var


def test_embed_probe_has_the_zero_predictor_floor(sets):
    """The read-in sees only x_q at a query token; E[w*] = 0, so the best linear guess of <w*, x_q> is 0:
    the held-out probe risk must match the zero predictor's risk on the same test prompts."""
    fit, test = sets
    rows = probe_layers(small_model(), fit, test, TASK, labels={"model": "m"})
    emb = sorted((r for r in rows if r["layer"] == "embed"), key=lambda r: r["n"])
    zero = (test.f.numpy() ** 2).mean(0)  # risk of predicting 0, per n
    ratio = np.array([r["risk"] for r in emb]) / zero
    assert np.all((ratio > 0.97) & (ratio < 1.05)), ratio
    assert abs(ratio.mean() - 1) < 0.02
    assert all(r["model"] == "m" and r["layer_index"] == 0 for r in emb)
    assert {r["layer"] for r in rows} == set(layer_labels(2))


def test_probe_needs_enough_fit_prompts(sets):
    with pytest.raises(ConfigError, match="^probe: "):
        probe_layers(small_model(), sets[0].slice(0, 2), sets[1], TASK)


def test_cli_probe_full_pruned_and_compare(tmp_path):
    pre = Preset(name="tiny", task=TASK, model=dict(d_model=16, n_layers=2), heads=[1, 2],
                 train=dict(steps=1, batch_size=8, lr=1e-3), eval=dict(n_val=120, n_test=120))
    for h in (1, 2):
        save_checkpoint(tmp_path / f"h{h}", small_model(heads=h, seed=h), {"preset": pre.model_dump()})
    main(["probe", str(tmp_path / "h2"), "--prune", "default", "--compare", str(tmp_path / "h1"),
          "--out", str(tmp_path / "e4")])
    rows = read_csv(tmp_path / "e4" / "probes.csv")
    assert {r["model"] for r in rows} == {"h=2 full", "h=2 pruned", "h=1 full"}
    assert {r["layer"] for r in rows} == {"embed", "1", "2", "model output"}
    s = read_json(tmp_path / "e4" / "summary.json")
    assert s["prune_policy"] == "1:all,2:top1"
    assert s["experiment"] == "E4" and set(s["models"]) == {"h=2 full", "h=1 full"}
    assert np.asarray(s["by_ablation"]["zero"]["h=2 pruned"]["gates"]).sum(1).tolist() == [2.0, 1.0]
    assert (tmp_path / "e4" / "probes.png").exists() and (tmp_path / "e4" / "config.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["probe", str(tmp_path / "h2"), "--prune", "1:every", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2


def test_probe_pruned_with_mean_and_resample_ablation(tmp_path):
    """Pruned heads ablated by mean/resample: layer 1 of a 1:all,2:top1 model is untouched, so its
    probe equals the full model's; the own output of each kind equals evaluate() with those values."""
    from icl_heads.analysis.ablation import make_ablations
    from icl_heads.evaluation import evaluate

    pre = Preset(name="tiny", task=TASK, model=dict(d_model=16, n_layers=2), heads=[2],
                 train=dict(steps=1, batch_size=8, lr=1e-3), eval=dict(n_val=40, n_test=40))
    m = small_model(heads=2, seed=3)
    save_checkpoint(tmp_path / "h2", m, {"preset": pre.model_dump()})
    s = run_e4_cli(tmp_path, ["--prune", "default", "--ablation", "mean,resample"])
    rows = read_csv(tmp_path / "e4" / "probes.csv")
    assert {r["model"] for r in rows} == {"h=2 full", "h=2 pruned (mean)", "h=2 pruned (resample)"}
    by = {(r["model"], r["layer"], r["n"]): float(r["risk"]) for r in rows}
    for kind in ("mean", "resample"):
        assert by[(f"h=2 pruned ({kind})", "1", "5")] == pytest.approx(by[("h=2 full", "1", "5")], rel=1e-9)
    abl = make_ablations(m, ["resample"], TASK, 40, seed=pre.seed)["resample"]
    g = torch.tensor(s["by_ablation"]["resample"]["h=2 pruned (resample)"]["gates"])
    test = fixed_prompts(TASK, 40, pre.seed, "test")
    want = evaluate(m, test, TASK, head_gates=g, head_values=abl.values(40)).rows()
    got = sorted((r for r in rows if r["model"] == "h=2 pruned (resample)" and r["layer"] == "model output"),
                 key=lambda r: int(r["n"]))
    np.testing.assert_allclose([float(r["risk"]) for r in got], [w["risk"] for w in want], rtol=1e-9)
    assert abs(float(got[5]["risk"]) - by[("h=2 full", "model output", "5")]) > 1e-6


def run_e4_cli(tmp_path, extra):
    main(["probe", str(tmp_path / "h2"), "--out", str(tmp_path / "e4"), "--device", "cpu", *extra])
    return read_json(tmp_path / "e4" / "summary.json")


def test_e4_reuses_e3s_ranking_only_when_e3_ranked_as_e4_would(tmp_path):
    """The main job hands E4 the seed's E3 folder: E4 then takes E3's pruned gates (the same ranking: same
    checkpoint, seed, val prompts and policy) and writes what it writes when it ranks itself; an E3 run with
    another policy or prompt count is not used."""
    from icl_heads.experiments.e3_pruning import run_e3
    from icl_heads.experiments.e4_probes import e3_pruned_gates, run_e4

    pre = Preset(name="tiny", task=TASK, model=dict(d_model=16, n_layers=2), heads=[2],
                 train=dict(steps=1, batch_size=8, lr=1e-3), eval=dict(n_val=40, n_test=40))
    save_checkpoint(tmp_path / "h2", small_model(heads=2, seed=3), {"preset": pre.model_dump()})
    ck, kinds = tmp_path / "h2", ("zero", "resample")
    run_e3(ck, tmp_path / "e3", ablations=kinds, n_boot=50)
    run_e3(ck, tmp_path / "e3-other", policy="1:top1,2:top1", ablations=kinds, n_boot=50)
    own = run_e4(ck, tmp_path / "own", prune="default", ablations=kinds)
    reused = run_e4(ck, tmp_path / "reused", prune="default", ablations=kinds, ranking_from=tmp_path / "e3")
    assert e3_pruned_gates(tmp_path / "e3", ck, "1:all,2:top1", kinds, 40, pre.seed) is not None
    assert e3_pruned_gates(tmp_path / "e3-other", ck, "1:all,2:top1", kinds, 40, pre.seed) is None
    assert e3_pruned_gates(tmp_path / "e3", ck, "1:all,2:top1", kinds, 20, pre.seed) is None
    assert e3_pruned_gates(tmp_path / "e3", ck, "1:all,2:top1", ("zero", "mean"), 40, pre.seed) is None
    assert reused["by_ablation"] == own["by_ablation"]
    assert read_csv(tmp_path / "reused" / "probes.csv") == read_csv(tmp_path / "own" / "probes.csv")
