"""The transformer's contract: causal prefix mask, head gates, linear attention, interleaved format.

References are brute force: a prompt truncated to examples ``0..k`` must give the
same column-``k`` prediction as the full prompt; a head gated off must equal the
model with that head's slice of the output projection zeroed; linear attention
must equal an explicit double loop.
"""

from __future__ import annotations

import pytest
import torch

from icl_heads.config import ModelConfig
from icl_heads.model import CONTEXT, QUERY, Transformer, attention_mask, token_layout

D, N_MAX = 4, 6


def make(attention: str = "softmax", fmt: str = "pair", heads: int = 2, mlp: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_dims=D, n_max=N_MAX, d_model=16, n_layers=2, n_heads=heads, attention=attention,
                      mlp=mlp, token_format=fmt)
    m = Transformer(cfg).double().eval()
    # GPT-2 init is tiny (std 0.02): enlarge weights so that every dependency is far above rounding
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def prompts(B: int = 3, N: int = N_MAX + 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=torch.float64), torch.randn(B, N, generator=g, dtype=torch.float64)


VARIANTS = [("softmax", "pair"), ("linear", "pair"), ("softmax", "interleaved"), ("linear", "interleaved")]


@pytest.mark.parametrize("attention,fmt", VARIANTS)
def test_prediction_k_depends_only_on_examples_before_k(attention: str, fmt: str) -> None:
    """Column k equals the prediction from the prompt truncated to examples 0..k (brute force)."""
    m = make(attention, fmt)
    x, y = prompts()
    full = m(x, y)
    assert full.shape == y.shape
    for k in range(x.shape[1]):
        trunc = m(x[:, : k + 1], y[:, : k + 1])[:, k]
        torch.testing.assert_close(full[:, k], trunc, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention,fmt", VARIANTS)
def test_perturbing_later_examples_changes_nothing_earlier_ones_do(attention: str, fmt: str) -> None:
    m = make(attention, fmt)
    x, y = prompts()
    base = m(x, y)
    N = x.shape[1]
    for j in range(N):
        x2, y2 = x.clone(), y.clone()
        x2[:, j] += 1.0
        y2[:, j] += 1.0
        out = m(x2, y2)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-12)  # k < j: unseen
        assert ((out[:, j + 1:] - base[:, j + 1:]).abs() > 1e-6).all()  # k > j: example j is context
        y3 = y.clone()
        y3[:, j] += 1.0  # the label of the example being predicted is never visible to its own query
        torch.testing.assert_close(m(x, y3)[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-12)


def test_prefix_mask_matches_brute_force() -> None:
    """Query k sees context tokens < k and itself (softmax); context tokens are causal among themselves."""
    for attention in ("softmax", "linear"):
        cfg = ModelConfig(n_dims=D, n_max=N_MAX, d_model=8, n_layers=1, n_heads=1, attention=attention)
        N = 5
        lay = token_layout(cfg, N)
        mask = attention_mask(cfg, lay)
        T = lay.token_type.numel()
        for i in range(T):
            for j in range(T):
                pi, pj = int(lay.position[i]), int(lay.position[j])
                if lay.token_type[i] == CONTEXT:
                    want = lay.token_type[j] == CONTEXT and pj <= pi
                else:
                    want = (lay.token_type[j] == CONTEXT and pj < pi) or (i == j and attention == "softmax")
                assert bool(mask[i, j]) == bool(want), (attention, i, j)
        assert (lay.token_type[lay.query_index] == QUERY).all()
        assert lay.query_n.tolist() == list(range(N))


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_gates_at_one_change_nothing(attention: str) -> None:
    m = make(attention, heads=4)
    x, y = prompts()
    torch.testing.assert_close(m(x, y, head_gates=torch.ones(2, 4)), m(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_gate_zero_equals_removing_that_heads_slice_of_the_output_projection(attention: str) -> None:
    m = make(attention, heads=4)
    x, y = prompts()
    dh = 16 // 4
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        gates = torch.ones(2, 4, dtype=torch.float64)
        gates[layer, head] = 0.0
        gated = m(x, y, head_gates=gates)
        ref = make(attention, heads=4)
        with torch.no_grad():
            ref.blocks[layer].attn.proj.weight[:, head * dh:(head + 1) * dh] = 0.0
        torch.testing.assert_close(gated, ref(x, y), rtol=1e-10, atol=1e-12)
        assert (gated - m(x, y)).abs().max() > 1e-6  # and the head did matter


def test_per_prompt_gates_equal_separate_runs() -> None:
    m = make(heads=2)
    x, y = prompts(B=3)
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.5, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
                     dtype=torch.float64)
    batched = m(x, y, head_gates=g)
    for b in range(3):
        torch.testing.assert_close(batched[b], m(x[b:b + 1], y[b:b + 1], head_gates=g[b])[0], rtol=1e-12, atol=1e-12)


def test_linear_attention_equals_explicit_loop() -> None:
    """Linear attention: out_i = sum_{j visible} (q_i . k_j) v_j / #visible, per head (double loop)."""
    m = make("linear", heads=2)
    attn = m.blocks[0].attn
    x, y = prompts(B=2)
    lay, mask = m.token_layout(x.shape[1])
    h = torch.randn(2, mask.shape[0], 16, dtype=torch.float64)
    q, k, v = attn.qkv(h).split(16, dim=-1)
    out = torch.zeros_like(h)
    for b in range(2):
        for i in range(mask.shape[0]):
            vis = mask[i].nonzero().flatten().tolist()
            for hd in range(2):
                s = slice(hd * 8, (hd + 1) * 8)
                acc = sum(((q[b, i, s] @ k[b, j, s]) * v[b, j, s] for j in vis), torch.zeros(8, dtype=torch.float64))
                out[b, i, s] = acc / max(len(vis), 1)
    torch.testing.assert_close(attn(h, mask, None), attn.proj(out), rtol=1e-10, atol=1e-12)


def test_interleaved_format_tokens() -> None:
    """Garg et al. layout: x_0, y_0, x_1, y_1, ..., x_{N-1}; predictions read at the x tokens."""
    cfg = ModelConfig(n_dims=D, n_max=N_MAX, d_model=8, n_layers=1, n_heads=1, token_format="interleaved")
    from icl_heads.model import tokens

    x, y = prompts(B=1, N=3)
    t = tokens(cfg, x, y)[0]
    assert t.shape == (5, D + 1)
    for k in range(3):
        torch.testing.assert_close(t[2 * k, :D], x[0, k])
        assert t[2 * k, D] == 0
    for k in range(2):
        assert (t[2 * k + 1, :D] == 0).all() and t[2 * k + 1, D] == y[0, k]
    assert token_layout(cfg, 3).query_index.tolist() == [0, 2, 4]



def test_attention_patterns_on_request_match_sdpa_and_the_mask():
    """patterns=True takes the explicit softmax path: same predictions as SDPA, rows summing to 1 over
    the keys the mask allows and 0 elsewhere; an explicit reference recomputes layer 0's pattern."""
    import math

    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer, act_name

    torch.manual_seed(0)
    cfg = ModelConfig(n_dims=4, n_max=6, d_model=16, n_layers=2, n_heads=2, mlp=True)
    m = Transformer(cfg).eval()
    x, y = torch.randn(3, 7, 4, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)  # float64 is cast
    with torch.no_grad():
        base, plain = m.run_with_cache(x, y)
        pred, cache = m.run_with_cache(x, y, patterns=True)
    assert act_name("pattern", 1) not in plain
    torch.testing.assert_close(pred, base, rtol=1e-5, atol=1e-6)
    lay, mask = m.token_layout(7)
    T = lay.token_type.numel()
    for l in range(2):
        p = cache[act_name("pattern", l)]
        assert p.shape == (3, 2, T, T)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, T))
        assert (p[:, :, ~mask] == 0).all()
    # reference for layer 0 from the cached embedding, by hand
    h = m.blocks[0].ln_1(cache["embed"])
    q, k, _ = m.blocks[0].attn.qkv(h).split(16, dim=-1)
    q, k = (t.view(3, T, 2, 8).transpose(1, 2) for t in (q, k))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.where(mask, s, torch.full_like(s, -1e30)).softmax(-1)
    torch.testing.assert_close(cache[act_name("pattern", 0)], ref)


def test_activation_names_and_shapes_are_pinned():
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer, act_name

    cfg = ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=2, n_heads=2, mlp=False)
    m = Transformer(cfg)
    x, y = torch.randn(2, 6, 3), torch.randn(2, 6)
    _, cache = m.run_with_cache(x, y, patterns=True)
    T = 2 * 6 - 1
    want = {"embed": (2, T, 8), "ln_final": (2, 6, 8)}
    for l in range(2):
        want.update({act_name("head_out", l): (2, T, 2, 4), act_name("pattern", l): (2, 2, T, T),
                     act_name("resid_mid", l): (2, T, 8), act_name("resid_post", l): (2, T, 8)})
    assert {k: tuple(v.shape) for k, v in cache.items()} == want
    _, few = m.run_with_cache(x, y, names=["embed", act_name("resid_post", 1)])
    assert list(few) == ["embed", "blocks.1.resid_post"]
    with pytest.raises(KeyError, match="no activation"):
        m.run_with_cache(x, y, names=["blocks.9.resid_post"])
    with pytest.raises(ValueError, match="unknown activation point"):
        act_name("queries", 0)


@pytest.mark.parametrize("fmt,mask,attention", [("pair", "prefix", "softmax"), ("interleaved", "prefix", "softmax"),
                                                ("pair", "full", "linear"), ("pair", "prefix", "linear")])
def test_forward_from_any_layer_equals_the_full_pass(fmt: str, mask: str, attention: str) -> None:
    """start_at_layer: the cached residual entering layer l, run from l, gives the full pass's predictions
    exactly, with per-prompt gates and head values given for all layers or for the layers run only."""
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer, act_name

    torch.manual_seed(1)
    cfg = ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=3, n_heads=2, mlp=True, token_format=fmt, mask=mask,
                      attention=attention)
    m = Transformer(cfg).eval()
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6)
    gates = torch.rand(4, 3, 2)
    T = m.token_layout(6)[0].token_type.numel()
    values = torch.randn(4, 3, T, 2, 4)
    with torch.no_grad():
        pred, cache = m.run_with_cache(x, y, gates, values)
        for l in range(4):
            resid = cache["embed"] if l == 0 else cache[act_name("resid_post", l - 1)]
            assert torch.equal(m.forward_from(resid, l, gates, values), pred)
            assert torch.equal(m.forward_from(resid, l, gates, values[:, l:]), pred)
            got, part = m.run_from_with_cache(resid, l, gates, values)
            assert torch.equal(got, pred)
            assert set(part) == {k for k in cache if k == "ln_final" or any(k.startswith(f"blocks.{j}.")
                                                                             for j in range(l, 3))}
            for k, v in part.items():
                assert torch.equal(v, cache[k]), k
        assert not torch.equal(m.forward_from(cache["embed"], 0), pred)  # the gates and values did matter
    with pytest.raises(ValueError, match="start_at_layer"):
        m.forward_from(cache["embed"], 4)


def test_ablated_context_equals_gates_and_the_analysis_ablations() -> None:
    """model.ablated(heads, kind) is the head gate at 0 with zero, mean or resample values, as
    analysis.ablation computes them; the model is unchanged after the block."""
    from icl_heads.analysis.ablation import make_ablation
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer
    from icl_heads.tasks import Prompts

    torch.manual_seed(2)
    cfg = ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=2, n_heads=2, mlp=False)
    m = Transformer(cfg).eval()
    x, y = torch.randn(5, 6, 3), torch.randn(5, 6)
    xr, yr = torch.randn(3, 6, 3), torch.randn(3, 6)
    ref = Prompts(xr, yr, torch.zeros(3, 3), torch.zeros(3, 6))
    gates = torch.ones(2, 2)
    gates[0, 1] = gates[1, 0] = 0
    with torch.no_grad():
        clean = m(x, y)
        for kind in ("zero", "mean", "resample"):
            want = m(x, y, head_gates=gates, head_values=make_ablation(m, kind, ref, seed=7).values(5))
            with m.ablated([(0, 1), (1, 0)], kind=kind, reference=(xr, yr), seed=7) as am:
                assert am is m
                got = m(x, y)
                got_mask = m.run_with_cache(x, y)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert torch.equal(got_mask, got) and not torch.equal(got, clean)
            assert torch.equal(m(x, y), clean)  # nothing left behind
        with m.ablated(gates == 0):  # a boolean (L, h) mask of the heads to ablate
            assert torch.equal(m(x, y), want_zero(m, x, y, gates))
        extra = torch.ones(2, 2)
        extra[1, 1] = 0
        with m.ablated([(0, 1)]):  # gates passed inside multiply the ablation's
            g = torch.ones(2, 2)
            g[0, 1] = 0
            g[1, 1] = 0
            assert torch.equal(m(x, y, head_gates=extra), want_zero(m, x, y, g))
    with pytest.raises(ValueError, match="no head"):
        with m.ablated([(2, 0)]):
            pass
    with pytest.raises(ValueError, match="needs reference"):
        with m.ablated([(0, 0)], kind="mean"):
            pass
    with pytest.raises(ValueError, match="kind must be"):
        with m.ablated([(0, 0)], kind="noise"):
            pass
    with pytest.raises(ValueError, match="one ablation at a time"):
        with m.ablated([(0, 0)]), m.ablated([(1, 0)]):
            pass
    with pytest.raises(ValueError, match="no head_values"):
        with m.ablated([(0, 0)]):
            m(x, y, head_values=torch.zeros(2, 11, 2, 4))
    with pytest.raises(RuntimeError, match="inside"):
        with m.ablated([(0, 0)]):
            raise RuntimeError("inside")
    assert torch.equal(m(x, y), clean)  # an error inside the block still restores the model


def want_zero(m, x, y, gates):
    return m(x, y, head_gates=gates)


def test_mlp_is_addressed_by_name_and_keeps_checkpoint_names() -> None:
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer

    m = Transformer(ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=2, n_heads=2, mlp=True))
    blk = m.blocks[1]
    assert blk.mlp.fc_in is blk.mlp[0] and blk.mlp.fc_out is blk.mlp[2] and isinstance(blk.mlp.act, torch.nn.GELU)
    assert {"blocks.1.mlp.0.weight", "blocks.1.mlp.2.bias"} <= set(m.state_dict())  # the zoo's names
