"""TransformerLens interop: a TL user's code runs unchanged on a zoo model.

References: TransformerLens itself (``utils.get_act_name``, ``ActivationCache``, ``FactoredMatrix``,
``HookedRootModule``'s signatures), hook functions written as a TL user writes them (in-place edits of
``hook_z``), numpy's eigenvalues, and the documented shape table of docs/architecture.md.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import icl_heads
from icl_heads.analysis.ablation import head_mask, make_ablation
from icl_heads.analysis.importance import assess_heads
from icl_heads.config import ModelConfig
from icl_heads.evaluation import predict
from icl_heads.model import HookedRootModule, Transformer, act_name
from icl_heads.tasks import fixed_prompts

tl = pytest.importorskip("transformer_lens")  # the `lens` extra; the `test` extra installs it
from transformer_lens import ActivationCache, FactoredMatrix  # noqa: E402
from transformer_lens.utilities import get_act_name  # noqa: E402

ZOO_A = Path(__file__).resolve().parents[1] / "zoo" / "A" / "seed0" / "h4"  # committed: L = 3, h = 4, no MLP


@pytest.fixture(scope="module")
def zoo_a():
    run = icl_heads.load(ZOO_A)
    return run.model, run.task


def tl_patch(l: int, k: int, value: torch.Tensor | None):
    """A TransformerLens user's hook: head ``k`` of ``z`` set to ``value`` (zero when None), in place."""
    def hook(z: torch.Tensor, hook) -> torch.Tensor:
        z[:, :, k, :] = 0.0 if value is None else value[..., k, :]
        return z
    return [(get_act_name("z", l), hook)]


def test_activation_names_are_transformer_lens_own():
    for point in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "z", "attn_scores",
                  "pattern", "result", "pre", "post"):
        for layer in (0, 2):
            assert act_name(point, layer) == get_act_name(point, layer)
    assert act_name("scale", 1, "ln2") == get_act_name("scale", 1, "ln2")
    assert act_name("embed") == get_act_name("embed") and act_name("pos_embed") == get_act_name("pos_embed")


def test_the_hook_surface_takes_transformer_lens_arguments():
    """Every parameter of TransformerLens's HookedRootModule methods is accepted, in the same order."""
    for name in ("run_with_hooks", "hooks", "add_hook", "reset_hooks", "run_with_cache", "get_caching_hooks"):
        theirs = [p for p in inspect.signature(getattr(tl.HookedRootModule, name)).parameters
                  if p not in ("remove_batch_dim", "pos_slice", "cache")]  # batch-of-one and position slicing: not offered
        ours = list(inspect.signature(getattr(HookedRootModule, name)).parameters)
        assert [p for p in ours if p in theirs] == theirs, name


def test_a_tl_hook_zero_ablating_a_head_equals_the_project_zero_ablation(zoo_a):
    model, task = zoo_a
    p = fixed_prompts(task, 40, 0, "test")
    x, y = p.x.float(), p.y.float()
    imp = assess_heads(model, p, task, batch_rows=64)  # E2's batched fan-out path
    for l, k in [(0, 1), (1, 3), (2, 0)]:
        with torch.no_grad():
            tl_pred = model.run_with_hooks(x, y, fwd_hooks=tl_patch(l, k, None))
        ours = predict(model, p, head_gates=head_mask(model, [(l, k)]))
        assert torch.equal(tl_pred.double(), ours)
        assert not torch.equal(ours, predict(model, p))  # the head matters
        np.testing.assert_allclose(imp.ablate_err[l, k], (tl_pred.double() - p.f).numpy() ** 2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_tl_hook_ablation_equals_the_project_ablation_of_every_kind(zoo_a, kind):
    """Mean: the head's mean ``z`` over the reference prompts; resample: the ``z`` of reference prompt
    ``perm[i]`` (``perm`` from the seed, the documented pairing); both read from a TL cache. The project's
    ablation runs in chunks of 7 prompts (more than one chunk), E2 in chunks of 8."""
    model, task = zoo_a
    p, ref = fixed_prompts(task, 30, 1, "test"), fixed_prompts(task, 40, 1, "ablation")
    abl = make_ablation(model, kind, ref, seed=5)
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(ref.x.float(), ref.y.float(), names_filter=lambda n: n.endswith("hook_z"))
    assert isinstance(ref_cache, ActivationCache)
    donors = torch.as_tensor(np.random.default_rng(5).permutation(40)[:30])
    imp = assess_heads(model, p, task, ablation=abl, batch_rows=64)
    for l, k in [(0, 2), (2, 3)]:
        z = ref_cache["z", l]  # (R, T, h, d_head)
        value = None if kind == "zero" else z.mean(0) if kind == "mean" else z[donors]
        with torch.no_grad():
            tl_pred = model.run_with_hooks(p.x.float(), p.y.float(), fwd_hooks=tl_patch(l, k, value)).double()
        ours = predict(model, p, 7, head_gates=head_mask(model, [(l, k)]), head_values=abl.values(30))
        torch.testing.assert_close(ours, tl_pred, rtol=1e-6, atol=1e-7)
        with torch.no_grad():  # the same through the Ablation's own hooks, one batch
            hooked = model.run_with_hooks(p.x.float(), p.y.float(), fwd_hooks=abl.hooks(head_mask(model, [(l, k)])))
        torch.testing.assert_close(hooked.double(), tl_pred, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(imp.ablate_err[l, k], (tl_pred - p.f).numpy() ** 2, rtol=1e-4, atol=1e-7)


def test_resample_donors_do_not_depend_on_the_chunking(zoo_a):
    model, task = zoo_a
    p, ref = fixed_prompts(task, 50, 2, "test"), fixed_prompts(task, 20, 2, "ablation")  # more prompts than donors
    abl = make_ablation(model, "resample", ref, seed=3)
    gates = head_mask(model, [(0, 0), (1, 2)])
    whole = predict(model, p, 1000, head_gates=gates, head_values=abl.values(50))
    for chunk in (7, 16):  # equal to float rounding (batch sizes change the kernels' blocking)
        torch.testing.assert_close(predict(model, p, chunk, head_gates=gates, head_values=abl.values(50)), whole,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(predict(model, p, chunk, head_gates=gates, head_values=lambda s, n: abl.values(n, s)),
                                   whole, rtol=1e-6, atol=1e-6)
        restart = predict(model, p, chunk, head_gates=gates, head_values=lambda s, n: abl.values(n))  # the old twin's bug
        assert (restart - whole).abs().max() > 1e-2
    big = assess_heads(model, p, task, ablation=abl, batch_rows=4096)
    small = assess_heads(model, p, task, ablation=abl, batch_rows=40)  # 5 prompts per chunk
    np.testing.assert_allclose(small.ablate_err, big.ablate_err, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(small.keep_err, big.keep_err, rtol=1e-5, atol=1e-8)


def test_activation_cache_patterns_and_head_results(zoo_a):
    """cache["pattern", 0]; stack_head_results (TL computes them from hook_z and W_O) sum, per layer, to the
    layer's output (hook_attn_out from the fused projection) less its bias; decompose_resid plus the type
    embedding (a term TransformerLens does not know) is the final residual stream."""
    model, task = zoo_a
    p = fixed_prompts(task, 12, 0, "test")
    with torch.no_grad():
        pred, cache = model.run_with_cache(p.x.float(), p.y.float())
    L, h = model.cfg.n_layers, model.cfg.n_heads
    lay, mask = model.token_layout(p.x.shape[1])
    pattern = cache["pattern", 0]
    assert pattern.shape == (12, h, mask.shape[0], mask.shape[0])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(12, h, mask.shape[0]))
    assert (pattern[:, :, ~mask] == 0).all()
    results, labels = cache.stack_head_results(layer=-1, return_labels=True)  # (L h, B, T, D)
    assert labels[:h + 1] == [f"L0H{k}" for k in range(h)] + ["L1H0"] and results.shape[0] == L * h
    for l in range(L):
        torch.testing.assert_close(results[l * h:(l + 1) * h].sum(0) + model.blocks[l].attn.b_O,
                                   cache["attn_out", l], rtol=1e-4, atol=1e-5)
    parts = cache.decompose_resid(layer=L, mode="attn", incl_embeds=True)
    torch.testing.assert_close(parts.sum(0) + cache["hook_type_embed"], cache["resid_post", L - 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, model(p.x.float(), p.y.float()), rtol=1e-5, atol=1e-6)  # explicit paths agree


def test_a_transformer_lens_circuit_utility_runs_on_a_zoo_model(zoo_a):
    """FactoredMatrix's OV circuit of every head equals W_V W_O formed by hand; its eigenvalues, numpy's:
    the nonzero eigenvalues of the (D, D) product A B are those of the (dh, dh) product B A, which numpy
    solves in float64. (numpy on the rank-dh (D, D) matrix is no reference for a head's smallest eigenvalue:
    in the 64k A model it is 1e-4 beside a largest of 3.8 and shifts by 2% among the 48 zero ones.)"""
    model, _ = zoo_a
    for l, block in enumerate(model.blocks):
        attn = block.attn
        for k in range(model.cfg.n_heads):
            ov = FactoredMatrix(attn.W_V[k], attn.W_O[k])
            D, dh = attn.qkv.weight.shape[1], attn.d_head
            Wv = attn.qkv.weight[2 * D + k * dh: 2 * D + (k + 1) * dh]  # (dh, D): v = x Wv^T
            Wo = attn.proj.weight[:, k * dh:(k + 1) * dh]  # (D, dh): out = z Wo^T
            full = (Wv.T @ Wo.T).detach().double().numpy()  # x -> the head's contribution
            np.testing.assert_allclose(ov.AB.detach().double().numpy(), full, rtol=1e-5, atol=1e-7)
            ba = (Wo.T @ Wv.T).detach().double().numpy()  # (dh, dh): B A of A B = Wv^T Wo^T
            want = np.sort(np.abs(np.linalg.eigvals(ba)))
            got = np.sort(np.abs(ov.eigenvalues.detach().cpu().numpy()))
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def documented_shapes(cfg: ModelConfig, B: int, T: int, Q: int) -> dict[str, tuple[int, ...]]:
    """The hook-point table of docs/architecture.md."""
    D, h = cfg.d_model, cfg.n_heads
    dh = D // h
    want = {"hook_embed": (B, T, D), "hook_pos_embed": (B, T, D), "hook_type_embed": (B, T, D),
            "ln_final.hook_scale": (B, Q, 1), "ln_final.hook_normalized": (B, Q, D), "hook_readout": (B, Q)}
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        want.update({b + "hook_resid_pre": (B, T, D), b + "hook_attn_out": (B, T, D), b + "hook_resid_mid": (B, T, D),
                     b + "hook_resid_post": (B, T, D), b + "ln1.hook_scale": (B, T, 1), b + "ln1.hook_normalized": (B, T, D),
                     b + "attn.hook_q": (B, T, h, dh), b + "attn.hook_k": (B, T, h, dh), b + "attn.hook_v": (B, T, h, dh),
                     b + "attn.hook_attn_scores": (B, h, T, T), b + "attn.hook_pattern": (B, h, T, T),
                     b + "attn.hook_z": (B, T, h, dh), b + "attn.hook_result": (B, T, h, D)})
        if cfg.mlp:
            want.update({b + "ln2.hook_scale": (B, T, 1), b + "ln2.hook_normalized": (B, T, D),
                         b + "mlp.hook_pre": (B, T, 4 * D), b + "mlp.hook_post": (B, T, 4 * D),
                         b + "hook_mlp_out": (B, T, D)})
        else:
            want.update({b + "ln2.hook_scale": None, b + "ln2.hook_normalized": None})  # exist, never run
    return want


@pytest.mark.parametrize("fmt", ["pair", "interleaved"])
@pytest.mark.parametrize("mlp", [True, False])
def test_every_hook_point_fires_with_its_documented_shape(fmt, mlp):
    torch.manual_seed(0)
    cfg = ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=2, n_heads=2, mlp=mlp, token_format=fmt)
    m = Transformer(cfg).eval()
    x, y = torch.randn(3, 6, 3), torch.randn(3, 6)
    T, Q = m.token_layout(6)[0].token_type.numel(), 6
    want = documented_shapes(cfg, 3, T, Q)
    assert set(m.hook_dict) == set(want)
    fired: dict[str, tuple[int, ...]] = {}
    record = lambda t, hook: fired.__setitem__(hook.name, tuple(t.shape))  # noqa: E731
    with torch.no_grad():
        pred = m.run_with_hooks(x, y, fwd_hooks=[(lambda name: True, record)])
    assert fired == {k: v for k, v in want.items() if v is not None}
    torch.testing.assert_close(pred, m(x, y), rtol=1e-5, atol=1e-6)  # every explicit path equals the fused one


def test_nnsight_reads_a_head_output(zoo_a):
    """NNsight (optional, not a dependency) traces the model and reads hook_z like any module output."""
    nnsight = pytest.importorskip("nnsight")
    model, task = zoo_a
    p = fixed_prompts(task, 6, 0, "test")
    x, y = p.x.float(), p.y.float()
    traced = nnsight.NNsight(model)
    with traced.trace(x, y):
        z = traced.blocks[1].attn.hook_z.output.save()
    _, cache = model.run_with_cache(x, y, names_filter=[act_name("z", 1)], return_cache_object=False)
    torch.testing.assert_close(getattr(z, "value", z), cache[act_name("z", 1)])


def test_without_the_extra_a_plain_dict_is_there():
    m = Transformer(ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=1, n_heads=2))
    _, cache = m.run_with_cache(torch.randn(2, 6, 3), torch.randn(2, 6), names_filter=[act_name("z", 0)],
                                return_cache_object=False)
    assert type(cache) is dict and list(cache) == ["blocks.0.attn.hook_z"]
