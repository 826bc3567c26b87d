"""E2/E3: head importance and pruning, checked on a hand-built model and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_heads.checkpoint import save_checkpoint
from icl_heads.cli import main
from icl_heads.config import ConfigError, ModelConfig, Preset, TaskConfig
from icl_heads.evaluation import predict
from icl_heads.io import read_csv, read_json
from icl_heads.model import Transformer, act_name
from icl_heads.tasks import fixed_prompts, generator, sample_prompts
from icl_heads.analysis.importance import ABLATE, KEEP, HeadImportance, assess_heads, top_share
from icl_heads.analysis.pruning import control_policy, default_policy, finetune, paired_ratio, parse_policy, prune_gates

TASK = TaskConfig(d=4, s=2, sigma=0.1, n_max=12)
A, B = 0.25, 0.2  # weights of the layer-1 half-GD heads and of the layer-2 GD head
SIGNAL, NOISE = 1, 0  # head indices (0-based) in layer 2


def hand_model() -> Transformer:
    """Linear attention, no LN/MLP/positions; residual slots: x (0-3), y (4), output (5), junk (6).

    Layer 1: head k computes the GD-step term over coordinate group k ({0,1} and {2,3}),
    ``(1/n) sum_i y_i <x_i[G_k], x_q[G_k]>``, and adds ``A`` times it to the output slot.
    Layer 2: head 2 (SIGNAL) adds ``B`` times the full GD-step term to the output slot;
    head 1 (NOISE) computes the same thing but writes it to a slot nobody reads.
    So the prediction is ``(A + B) (1/n) sum_i y_i <x_i, x_q>``.
    """
    cfg = ModelConfig(n_dims=4, n_max=12, d_model=8, n_layers=2, n_heads=2, attention="linear",
                      mlp=False, pos_emb=False, layer_norm=False)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.read_in.weight[:5, :5] = torch.eye(5)
        m.read_out.weight[0, 5] = 1.0
        D = 8
        W0, P0 = m.blocks[0].attn.qkv.weight, m.blocks[0].attn.proj.weight
        for head, coords in ((0, (0, 1)), (1, (2, 3))):
            for j, c in enumerate(coords):
                W0[head * 4 + j, c] = 1.0  # q
                W0[D + head * 4 + j, c] = 1.0  # k
            W0[2 * D + head * 4, 4] = 1.0  # v <- y
            P0[5, head * 4] = A
        W1, P1 = m.blocks[1].attn.qkv.weight, m.blocks[1].attn.proj.weight
        for head in (NOISE, SIGNAL):
            for c in range(4):
                W1[head * 4 + c, c] = 1.0
                W1[D + head * 4 + c, c] = 1.0
            W1[2 * D + head * 4, 4] = 1.0
        P1[6, NOISE * 4] = 1.0
        P1[5, SIGNAL * 4] = B
    return m.eval()


def gd_term(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed form ``(1/k) sum_{i<k} y_i <x_i, x_k>`` for every k (0 at k = 0), shape (P, N)."""
    P, N, _ = x.shape
    out = np.zeros((P, N))
    for k in range(1, N):
        out[:, k] = np.einsum("pi,pid,pd->p", y[:, :k], x[:, :k], x[:, k]) / k
    return out


@pytest.fixture(scope="module")
def prompts():
    return fixed_prompts(TASK, 300, seed=1, stream="test")


@pytest.fixture(scope="module")
def hand_importance(prompts):
    return assess_heads(hand_model(), prompts, TASK)


def random_model(attention: str = "softmax", heads: int = 2, layers: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(n_dims=4, n_max=12, d_model=16, n_layers=layers, n_heads=heads, attention=attention))
    with torch.no_grad():  # larger weights than GPT-2 init so every head visibly matters
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 / np.sqrt(p.shape[1]))
    return m.eval()


def test_hand_model_is_the_closed_form(prompts):
    x, y = prompts.x.numpy(), prompts.y.numpy()
    got = predict(hand_model(), prompts).numpy()
    np.testing.assert_allclose(got, (A + B) * gd_term(x, y), rtol=1e-4, atol=1e-5)


def test_e2_ranks_the_signal_head_first_with_the_closed_form_importance(prompts, hand_importance):
    imp = hand_importance
    assert imp.ranking(1)[0] == SIGNAL
    score = imp.score(ABLATE)
    assert abs(score[1, NOISE]) < 1e-6  # the junk head's output is never read
    # independent reference: the closed-form risk change when the B * GD term is removed
    f, g = prompts.f.numpy(), gd_term(prompts.x.numpy(), prompts.y.numpy())
    full, ablated = ((A + B) * g - f) ** 2, (A * g - f) ** 2
    want = (ablated - full)[:, 1:].mean() / (TASK.s * TASK.tau ** 2)
    assert want > 0.05
    np.testing.assert_allclose(score[1, SIGNAL], want, rtol=1e-4)
    # keep only the noise head in layer 2 == ablate the signal head (and vice versa: keep signal == base)
    np.testing.assert_allclose(imp.score(KEEP)[1, NOISE], want, rtol=1e-4)
    assert abs(imp.score(KEEP)[1, SIGNAL]) < 1e-6
    # layer 1: both half-GD heads matter, and the concentration score sees it
    assert (score[0] > 0.01).all()
    conc = imp.concentration(n_boot=200, seed=0)
    assert conc[1]["top_head"] == SIGNAL + 1 and conc[1]["top_share"] == pytest.approx(1.0, abs=1e-4)
    assert conc[0]["top_share"] < 0.7
    assert conc[0]["ci_low"] <= conc[0]["top_share"] <= conc[0]["ci_high"]


def test_e3_pruned_hand_model_keeps_the_risk_and_the_control_does_not(prompts, hand_importance):
    gates = prune_gates(hand_importance, "1:all,2:top1")
    assert gates.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    m = hand_model()
    full = predict(m, prompts).numpy()
    np.testing.assert_allclose(predict(m, prompts, head_gates=gates).numpy(), full, rtol=1e-6, atol=1e-7)
    control = prune_gates(hand_importance, control_policy("1:all,2:top1"))
    assert control.sum(1).tolist() == [1.0, 1.0]
    f = prompts.f.numpy()
    err_c = (predict(m, prompts, head_gates=control).numpy() - f) ** 2
    err_f = (full - f) ** 2
    r = paired_ratio(err_c, err_f, n_boot=200)
    assert r["ci_low"] > 1.0  # dropping a layer-1 head hurts


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_batched_assessment_equals_one_forward_per_gate_setting(attention):
    m = random_model(attention, heads=2, layers=3)
    p = fixed_prompts(TASK, 20, seed=3, stream="val")
    base = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # start from an already-pruned model
    imp = assess_heads(m, p, TASK, gates=base, batch_rows=12)  # several chunks
    f = p.f.numpy()

    def err(g: torch.Tensor) -> np.ndarray:
        return (predict(m, p, head_gates=g).numpy() - f) ** 2

    np.testing.assert_allclose(imp.base_err, err(base), rtol=1e-5, atol=1e-7)
    for l in range(3):
        for k in range(2):
            g = base.clone()
            g[l, k] = 0
            np.testing.assert_allclose(imp.ablate_err[l, k], err(g), rtol=1e-5, atol=1e-7)
            g = base.clone()
            g[l] = 0
            g[l, k] = base[l, k]
            np.testing.assert_allclose(imp.keep_err[l, k], err(g), rtol=1e-5, atol=1e-7)
    assert np.abs(imp.delta(ABLATE)).max() > 1e-4  # the random heads do matter


def test_gate_off_equals_zeroing_the_heads_output_projection_columns():
    m = random_model("softmax", heads=4, layers=2, seed=5)
    p = fixed_prompts(TASK, 16, seed=2, stream="val")
    l, k, dh = 1, 2, 16 // 4
    g = torch.ones(2, 4)
    g[l, k] = 0
    gated = predict(m, p, head_gates=g)
    with torch.no_grad():
        m.blocks[l].attn.proj.weight[:, k * dh:(k + 1) * dh] = 0
    zeroed = predict(m, p)
    assert (gated - predict(random_model("softmax", heads=4, layers=2, seed=5), p)).abs().max() > 1e-4
    torch.testing.assert_close(gated, zeroed, rtol=1e-6, atol=1e-7)


def _synthetic(deltas: np.ndarray) -> HeadImportance:
    """HeadImportance whose per-prompt ablation deltas (L, h, P) are given (one n >= 1 column)."""
    L, h, P = deltas.shape
    base = np.ones((P, 2))
    ab = np.broadcast_to(base, (L, h, P, 2)).copy()
    ab[..., 1] += deltas
    return HeadImportance(base, ab, ab.copy(), np.ones((L, h)), norm=1.0)


def test_concentration_share_ci_and_stability_against_numpy():
    rng = np.random.default_rng(0)
    d = np.stack([rng.normal([1.0, 1.0, 1.0, 1.0], 0.5, size=(400, 4)).T,  # layer 1: spread
                  rng.normal([3.0, 0.2, 0.1, -0.5], 0.5, size=(400, 4)).T,  # layer 2: one head
                  np.zeros((4, 400))])  # layer 3: nothing matters
    imp = _synthetic(d)
    conc = imp.concentration(n_boot=500, seed=1)
    m = d.mean(-1)
    pos = np.clip(m, 0, None)
    for l in range(2):
        assert conc[l]["top_share"] == pytest.approx(pos[l].max() / pos[l].sum(), rel=1e-12)
        assert conc[l]["top_head"] == int(m[l].argmax()) + 1
        assert conc[l]["ci_low"] < conc[l]["top_share"] < conc[l]["ci_high"]
    # bootstrap CI width ~ normal-theory width (delta method is rough; factor-2 agreement)
    assert 0.01 < conc[1]["ci_high"] - conc[1]["ci_low"] < 0.1
    assert conc[0]["top_share"] < 0.35 and conc[1]["top_share"] > 0.85
    assert conc[1]["top_head_stability"] == 1.0 and conc[0]["top_head_stability"] < 0.9
    assert np.isnan(conc[2]["top_share"]) and np.isnan(top_share(np.zeros((1, 4))))[0]
    assert conc[1]["share_minus_layer1_ci_low"] > 0.4  # layer 2 clearly more concentrated than layer 1
    swapped = _synthetic(d[[1, 0]]).concentration(n_boot=300)  # concentrated first layer, spread second
    assert swapped[1]["share_minus_layer1_ci_high"] < 0
    # constant deltas: every resample gives the same share, so the CI collapses
    const = imp.__class__(imp.base_err, imp.ablate_err.copy(), imp.keep_err, imp.base_gates, 1.0)
    const.ablate_err[..., 1] = 1.0 + np.array([2.0, 1.0, 1.0, 0.0])[None, :, None]
    c = const.concentration(n_boot=50)[0]
    assert c["ci_low"] == pytest.approx(0.5) and c["ci_high"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", ["", "1:all,,2:top1", "0:all", "1:top0", "1:al", "a:all", "1:all,1:top1",
                                 "1-all", "1:top1x", "-1:all"])
def test_policy_parser_rejects_bad_strings_naming_keep(bad):
    with pytest.raises(ConfigError, match=r"^keep: "):
        parse_policy(bad)


def test_policy_resolution(hand_importance):
    assert parse_policy(" 1:all, 3:top2 ,2:top1") == {1: "all", 3: "top2", 2: "top1"}
    assert default_policy(4) == "1:all,2:top1,3:top1,4:top1"
    assert control_policy(default_policy(3)) == "1:top1,2:top1,3:top1"
    with pytest.raises(ConfigError, match="keep: policy must list every layer 1..2"):
        prune_gates(hand_importance, "1:all")
    with pytest.raises(ConfigError, match="keep: policy must list every layer"):
        prune_gates(hand_importance, "1:all,2:top1,3:top1")
    with pytest.raises(ConfigError, match="keep: layer 2 asks for top3"):
        prune_gates(hand_importance, "1:all,2:top3")
    assert prune_gates(hand_importance, "1:top2,2:all").tolist() == [[1, 1], [1, 1]]


def test_finetune_keeps_gated_heads_frozen_and_moves_the_rest():
    m = random_model("softmax", heads=2, layers=2, seed=7)
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    tuned = finetune(m, gates, TASK, steps=3, batch_size=16, lr=1e-2, seed=0)
    assert torch.equal(tuned.head_gates, gates)
    dh = 8
    q0 = slice(0, dh)  # query rows of head 0 in layer 2: its gate is 0, so its gradient is 0
    before, after = m.blocks[1].attn.qkv.weight, tuned.blocks[1].attn.qkv.weight
    assert torch.equal(before[q0], after[q0])
    assert not torch.equal(before[dh:2 * dh], after[dh:2 * dh])
    assert torch.equal(m.head_gates, torch.ones(2, 2))  # the original is untouched
    # it actually trains: the loss on fresh prompts goes down over a few more steps
    p = sample_prompts(TASK, 256, generator(9, "val"))
    loss = lambda mod: torch.nn.functional.mse_loss(mod(p.x, p.y), p.y).item()  # noqa: E731
    assert loss(finetune(m, gates, TASK, steps=40, batch_size=64, lr=3e-3)) < loss(tuned)


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_finetune_with_values_trains_through_hooks_and_leaves_none_behind(kind):
    """Mean/resample fine-tuning: the gated-off head gets no gradient, its values change what the rest
    learns (unlike zero), a resample run is reproducible, and the returned pruned model has no hooks."""
    from icl_heads.analysis.ablation import make_ablation

    m = random_model("softmax", heads=2, layers=2, seed=8)
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    abl = make_ablation(m, kind, fixed_prompts(TASK, 30, 0, "ablation"), seed=1)
    tuned = finetune(m, gates, TASK, steps=3, batch_size=16, lr=1e-2, seed=0, ablation=abl)
    zero = finetune(m, gates, TASK, steps=3, batch_size=16, lr=1e-2, seed=0)
    q0 = slice(0, 8)
    assert torch.equal(tuned.blocks[1].attn.qkv.weight[q0], m.blocks[1].attn.qkv.weight[q0])
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, zero.blocks[0].attn.qkv.weight)
    assert torch.equal(tuned.head_gates, gates) and not any(p.has_hooks() for p in tuned.hook_points())
    again = finetune(m, gates, TASK, steps=3, batch_size=16, lr=1e-2, seed=0, ablation=abl)
    assert all(torch.equal(a, b) for a, b in zip(tuned.parameters(), again.parameters()))


@pytest.fixture(scope="module")
def hand_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hand"
    pre = Preset(name="hand", task=TASK, model=dict(d_model=8, n_layers=2, attention="linear", mlp=False, pos_emb=False), heads=[2],
                 train=dict(steps=1, batch_size=8, lr=1e-3), eval=dict(n_val=200, n_test=200))
    save_checkpoint(path, hand_model(), {"preset": pre.model_dump()})
    return path


def test_cli_assess_heads_and_prune_on_the_hand_model(hand_ckpt, tmp_path):
    main(["assess-heads", str(hand_ckpt), "--out", str(tmp_path / "e2"), "--boot", "100"])
    rows = read_csv(tmp_path / "e2" / "head_importance.csv")
    top = {(r["layer"], r["head"]): r for r in rows}
    assert top[("2", str(SIGNAL + 1))]["rank_in_layer"] == "1"
    assert float(top[("2", str(SIGNAL + 1))]["share_in_layer"]) == pytest.approx(1.0, abs=1e-4)
    conc = read_csv(tmp_path / "e2" / "concentration.csv")
    assert [c["top_head"] for c in conc][1] == str(SIGNAL + 1)
    by_n = read_csv(tmp_path / "e2" / "head_importance_by_n.csv")
    assert len(by_n) == 2 * 2 * (TASK.n_max + 1)
    for f in ("head_importance.png", "config.json", "summary.json"):
        assert (tmp_path / "e2" / f).exists()

    main(["prune", str(hand_ckpt), "--out", str(tmp_path / "e3"), "--keep", "1:all,2:top1", "--finetune", "2"])
    s = read_json(tmp_path / "e3" / "summary.json")
    assert s["experiment"] == "E3" and s["ablations"] == ["zero"] and "kept_heads" not in s  # kinds own their numbers
    s = s["by_ablation"]["zero"]
    assert s["kept_heads"]["pruned"] == [[1, 2], [SIGNAL + 1]]
    assert s["risk_ratio_vs_full"]["pruned"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert s["risk_ratio_vs_full"]["control"]["ratio"] > 1.0
    assert {"pruned+ft", "control+ft"} <= set(s["risk_ratio_vs_full"])
    assert {r["model"] for r in read_csv(tmp_path / "e3" / "pruning.csv")} == {"full", "pruned", "control",
                                                                               "pruned+ft", "control+ft"}


def test_cli_rejects_a_bad_policy_with_one_line(hand_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", str(hand_ckpt), "--out", str(tmp_path / "x"), "--keep", "1:all,2:top0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: keep: ") and "\n" not in err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- ablation kinds

def _constant_head_model(layer: int = 1, head: int = 0) -> Transformer:
    """A random softmax model whose head ``(layer, head)`` outputs the same vector everywhere:
    its value rows are 0 and its value bias is 1, and softmax weights sum to 1."""
    m = random_model("softmax", heads=2, layers=2, seed=4)
    D, dh = m.cfg.d_model, m.cfg.d_model // 2
    rows = slice(2 * D + head * dh, 2 * D + (head + 1) * dh)
    with torch.no_grad():
        m.blocks[layer].attn.qkv.weight[rows] = 0
        m.blocks[layer].attn.qkv.bias[rows] = 1.0
    return m


def test_mean_ablation_of_a_constant_head_changes_nothing_but_zero_ablation_does():
    m = _constant_head_model(layer=1, head=0)
    p, ref = fixed_prompts(TASK, 40, 1, "test"), fixed_prompts(TASK, 30, 1, "ablation")
    _, cache = m.run_with_cache(p.x.float(), p.y.float(), names_filter=[act_name("z", 1)])
    out = cache[act_name("z", 1)][..., 0, :]
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-6)  # the head really is constant
    zero = assess_heads(m, p, TASK, ablation="zero").score(ABLATE)
    mean = assess_heads(m, p, TASK, ablation="mean", reference=ref).score(ABLATE)
    assert abs(zero[1, 0]) > 1e-3
    assert abs(mean[1, 0]) < 1e-6
    assert abs(mean[1, 1]) > 1e-3  # the other head of the layer still matters


def _patched_errors(m: Transformer, p, layer: int, heads: list[int], donor_out: torch.Tensor) -> np.ndarray:
    """Squared errors with ``heads`` of ``layer`` replaced by ``donor_out`` ((P, T, h, dh) or (T, h, dh))
    at the output projection's input: a hand-made patch, not the model's gate/value path."""
    dh = m.cfg.d_model // m.cfg.n_heads

    def hook(module, args):
        z = args[0].clone().view(*args[0].shape[:2], m.cfg.n_heads, dh)
        for k in heads:
            z[..., k, :] = donor_out[..., k, :]
        return (z.view(args[0].shape),)

    handle = m.blocks[layer].attn.proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            pred = m(p.x.float(), p.y.float())
    finally:
        handle.remove()
    return (pred.double().numpy() - p.f.numpy()) ** 2


@pytest.mark.parametrize("kind", ["resample", "mean"])
def test_resample_and_mean_ablation_equal_patching_the_head_by_hand(kind):
    from icl_heads.analysis.ablation import make_ablation

    m = random_model("softmax", heads=2, layers=3, seed=6)
    p, ref = fixed_prompts(TASK, 24, 2, "test"), fixed_prompts(TASK, 30, 2, "ablation")
    abl = make_ablation(m, kind, reference=ref, seed=11)
    imp = assess_heads(m, p, TASK, ablation=abl, batch_rows=20)  # several chunks: donor offsets matter
    with torch.no_grad():
        _, ref_cache = m.run_with_cache(ref.x.float(), ref.y.float(), names_filter=lambda n: n.endswith("hook_z"))
    donors = np.random.default_rng(11).permutation(30)[:24]  # the documented pairing
    assert len(set(donors.tolist())) == 24
    for l in range(3):
        clean = ref_cache[act_name("z", l)]  # (R, T, h, dh)
        donor_out = clean[torch.as_tensor(donors)] if kind == "resample" else clean.mean(0)
        for k in range(2):
            want = _patched_errors(m, p, l, [k], donor_out)
            np.testing.assert_allclose(imp.ablate_err[l, k], want, rtol=1e-4, atol=1e-6)
            keep_want = _patched_errors(m, p, l, [1 - k], donor_out)  # keep k = ablate the other head
            np.testing.assert_allclose(imp.keep_err[l, k], keep_want, rtol=1e-4, atol=1e-6)
    zero = assess_heads(m, p, TASK)
    assert np.abs(imp.ablate_err - zero.ablate_err).max() > 1e-4  # the kinds really differ


def test_several_kinds_share_the_base_pass_and_equal_single_runs():
    from icl_heads.analysis.ablation import make_ablations
    from icl_heads.analysis.importance import assess_heads_kinds

    m = random_model("softmax", heads=2, layers=2, seed=8)
    p = fixed_prompts(TASK, 16, 3, "test")
    abls = make_ablations(m, "all", TASK, 20, seed=0)
    both = assess_heads_kinds(m, p, TASK, list(abls.values()))
    for kind, abl in abls.items():
        one = assess_heads(m, p, TASK, ablation=abl)
        assert both[kind].ablation == kind
        np.testing.assert_array_equal(both[kind].ablate_err, one.ablate_err)
        np.testing.assert_array_equal(both[kind].base_err, both["zero"].base_err)


def test_ablation_only_assessment_equals_the_full_one_without_keep_settings():
    """keep=False (E3's ranking, E7) gives the same base and ablation errors, and no keep-only errors."""
    from icl_heads.analysis.ablation import make_ablations
    from icl_heads.analysis.importance import assess_heads_kinds

    m = random_model("softmax", heads=4, layers=3, seed=9)
    p = fixed_prompts(TASK, 16, 4, "test")
    abls = list(make_ablations(m, "all", TASK, 20, seed=0).values())
    full, half = assess_heads_kinds(m, p, TASK, abls), assess_heads_kinds(m, p, TASK, abls, keep=False)
    for kind in full:
        np.testing.assert_array_equal(half[kind].ablate_err, full[kind].ablate_err)
        np.testing.assert_array_equal(half[kind].base_err, full[kind].base_err)
        assert np.isnan(half[kind].keep_err).all() and np.isfinite(full[kind].keep_err).all()
        assert [half[kind].ranking(l) for l in range(3)] == [full[kind].ranking(l) for l in range(3)]


def test_top_keep_assessment_gives_claim_1b_statistics_of_the_full_one():
    """keep="top" (E7's trend statistics) runs one keep-only setting per layer, the top head's, and claim 1b's
    statistics equal the full assessment's; every other head's keep-only error is NaN."""
    from icl_heads.analysis.ablation import make_ablations
    from icl_heads.analysis.importance import assess_heads_kinds

    m = random_model("softmax", heads=4, layers=3, seed=9)
    p = fixed_prompts(TASK, 24, 4, "val")
    abls = list(make_ablations(m, "all", TASK, 24, seed=0).values())
    n_from = 3
    full = assess_heads_kinds(m, p, TASK, abls, n_min=n_from, batch_rows=40)  # 5 prompts a chunk: the second
    top = assess_heads_kinds(m, p, TASK, abls, n_min=n_from, keep="top", batch_rows=40)  # pass chunks them again
    for kind in full:
        heads = full[kind].top_heads(n_from)
        np.testing.assert_array_equal(top[kind].top_heads(n_from), heads)
        for l, k in enumerate(heads):
            # one setting per pass instead of 2h: the same arithmetic in differently sized float32 batches
            np.testing.assert_allclose(top[kind].keep_err[l, k], full[kind].keep_err[l, k], rtol=1e-6, atol=1e-7)
            others = [j for j in range(4) if j != k]
            assert np.isnan(top[kind].keep_err[l, others]).all()
        np.testing.assert_array_equal(top[kind].ablate_err, full[kind].ablate_err)
        for a, b in zip(full[kind].claim1b_stats(n_from, 200, 1), top[kind].claim1b_stats(n_from, 200, 1)):
            for ra, rb in zip(a, b):
                assert ra.keys() == rb.keys()
                for key in ra:
                    if isinstance(ra[key], float):
                        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=key)
                    else:
                        assert rb[key] == ra[key], key


def test_e3_probe_ratio_equals_a_hand_fitted_ridge_probe(hand_ckpt, tmp_path):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from icl_heads.experiments.e3_pruning import run_e3
    from icl_heads.analysis.probes import ALPHAS

    s = run_e3(hand_ckpt, tmp_path / "e3", "1:top1,2:top1", n_prompts=60, seed=5, n_boot=200)["by_ablation"]["zero"]
    m = hand_model()
    fit, test = fixed_prompts(TASK, 60, 5, "probe"), fixed_prompts(TASK, 60, 5, "test")
    q = m.token_layout(TASK.n_max + 1)[0].query_index

    def last_states(p, drop: list[tuple[int, int]]) -> np.ndarray:
        mm = hand_model()
        with torch.no_grad():  # prune by hand: zero the dropped heads' output-projection columns
            for l, k in drop:
                mm.blocks[l].attn.proj.weight[:, k * 4:(k + 1) * 4] = 0
            _, cache = mm.run_with_cache(p.x.float(), p.y.float(), names_filter=[act_name("resid_post", 1)])
        return cache[act_name("resid_post", 1)][:, q].double().numpy()  # (P, N, D)

    def probe_err(drop: list[tuple[int, int]]) -> np.ndarray:
        a, b = last_states(fit, drop), last_states(test, drop)
        err = np.empty((60, TASK.n_max + 1))
        for n in range(TASK.n_max + 1):
            pipe = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(a[:, n], fit.f[:, n].numpy())
            err[:, n] = (pipe.predict(b[:, n]) - test.f[:, n].numpy()) ** 2
        return err[:, 1:].mean()

    kept = s["kept_heads"]["pruned"]  # 1-based
    drop = [(l, k) for l in range(2) for k in range(2) if k + 1 not in kept[l]]
    assert len(drop) == 2
    want = probe_err(drop) / probe_err([])
    assert s["probe_ratio"] == pytest.approx(want, rel=1e-6)
    assert abs(want - 1) > 1e-3  # pruning changes the probe's risk
    lo, hi = s["probe_ratio_ci"]
    assert lo <= s["probe_ratio"] <= hi
    own = s["risk_ratio_vs_full"]["pruned"]["ratio"]
    assert own != pytest.approx(want, rel=1e-3)  # the probe is not the model's own read-out


def test_cli_ablation_all_writes_every_kind_and_rejects_a_bad_kind(hand_ckpt, tmp_path, capsys):
    main(["assess-heads", str(hand_ckpt), "--out", str(tmp_path / "e2"), "--boot", "50", "--prompts", "40",
          "--ablation", "all"])
    for name in ("head_importance.csv", "concentration.csv", "head_importance_by_n.csv"):
        rows = read_csv(tmp_path / "e2" / name)
        assert [r["ablation"] for r in rows][:: len(rows) // 3] == ["zero", "mean", "resample"]
    s = read_json(tmp_path / "e2" / "summary.json")
    assert s["ablations"] == ["zero", "mean", "resample"] and set(s["by_ablation"]) == set(s["ablations"])
    with pytest.raises(SystemExit) as e:
        main(["prune", str(hand_ckpt), "--out", str(tmp_path / "x"), "--ablation", "gaussian"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ablation: ") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_report_judges_2a_per_kind_by_read_out_and_by_probe(hand_ckpt, tmp_path):
    """2a per ablation kind by own read-out and by the post-LN probe, from e3/claim2a.csv (pooled n >= d/2);
    1b per kind from e2/claim1b.csv; the verdicts follow from the CSVs' CIs and the named thresholds."""
    from icl_heads.experiments.e2_importance import run_e2
    from icl_heads.experiments.e3_pruning import run_e3
    from icl_heads.claims import rules
    from icl_heads.claims.rules import claims_1b, claims_2a

    run_e3(hand_ckpt, tmp_path / "e3", n_prompts=40, n_boot=100, ablations="all", single_ckpt=hand_ckpt)
    vs = claims_2a(tmp_path / "e3")
    assert [(v.numbers["ablation"], v.numbers["readout"]) for v in vs] == [
        (k, r) for k in ("zero", "mean", "resample") for r in ("model", "probe_ln")]
    csv = read_csv(tmp_path / "e3" / "claim2a.csv")
    assert {r["readout"] for r in csv} == {"model", "probe", "probe_ln"}
    for v in vs:
        at = {r["statistic"]: r for r in csv if r["ablation"] == v.numbers["ablation"]
              and r["readout"] == v.numbers["readout"] and r["n"] == "pooled"}
        p, c = at["pruned_over_full"], at["control_over_pruned"]
        assert float(at["single_over_full"]["value"]) == 1.0  # the model is its own single-head reference
        fails = float(p["ci_low"]) > rules.PRUNED_OVER_FULL_MAX or float(c["ci_high"]) < 1
        want = "not reproduced" if fails else "inconclusive"  # the fraction lost is NaN (no advantage): never reproduced
        assert v.verdict == want and v.numbers["pruned_over_full"]["value"] == float(p["value"])
    run_e2(hand_ckpt, tmp_path / "e2", n_prompts=40, n_boot=50, ablations=["resample", "zero"])
    v1 = claims_1b(tmp_path / "e2")
    assert [v.numbers["ablation"] for v in v1] == ["resample", "zero"]
    conc = [r for r in read_csv(tmp_path / "e2" / "concentration.csv") if r["ablation"] == "zero"]
    assert v1[1].numbers["top_share"] == [float(r["top_share"]) for r in conc]
    eff = [r for r in read_csv(tmp_path / "e2" / "effective_heads.csv") if r["ablation"] == "zero"]
    assert v1[1].numbers["n_eff"] == [float(r["n_eff"]) for r in eff]
