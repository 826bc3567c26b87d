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
from icl_heads.model import CONTEXT, QUERY, Transformer, act_name, attention_mask, head_hooks, token_layout

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
    got = m.run_with_hooks(x, y, fwd_hooks=head_hooks(torch.ones(2, 4)))
    torch.testing.assert_close(got, m(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_gate_zero_equals_removing_that_heads_slice_of_the_output_projection(attention: str) -> None:
    m = make(attention, heads=4)
    x, y = prompts()
    dh = 16 // 4
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        gates = torch.ones(2, 4, dtype=torch.float64)
        gates[layer, head] = 0.0
        gated = m.run_with_hooks(x, y, fwd_hooks=head_hooks(gates))
        ref = make(attention, heads=4)
        with torch.no_grad():
            ref.blocks[layer].attn.proj.weight[:, head * dh:(head + 1) * dh] = 0.0
        torch.testing.assert_close(gated, ref(x, y), rtol=1e-10, atol=1e-12)
        assert (gated - m(x, y)).abs().max() > 1e-6  # and the head did matter
        torch.testing.assert_close(m.pruned(gates)(x, y), gated, rtol=0, atol=0)  # the stored mask: the same gate


def test_per_prompt_gates_equal_separate_runs() -> None:
    m = make(heads=2)
    x, y = prompts(B=3)
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.5, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
                     dtype=torch.float64)
    batched = m.run_with_hooks(x, y, fwd_hooks=head_hooks(g))
    for b in range(3):
        one = m.run_with_hooks(x[b:b + 1], y[b:b + 1], fwd_hooks=head_hooks(g[b]))
        torch.testing.assert_close(batched[b], one[0], rtol=1e-12, atol=1e-12)
        # a pass over prompts b.. of the set takes rows b.. of the per-prompt gates
        torch.testing.assert_close(m.run_with_hooks(x[b:], y[b:], fwd_hooks=head_hooks(g, start=b)), batched[b:],
                                   rtol=1e-12, atol=1e-12)


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
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(attn(h, mask, ones), attn.proj(out), rtol=1e-10, atol=1e-12)
    seen = {}
    attn.hook_pattern.add_hook(lambda t, hook: seen.setdefault("pattern", t))  # the explicit path: weights / #visible
    try:
        torch.testing.assert_close(attn(h, mask, ones), attn.proj(out), rtol=1e-10, atol=1e-12)
    finally:
        attn.hook_pattern.remove_hooks()
    for hd in range(2):  # the pattern: (q_i . k_j) / #visible on visible keys, 0 elsewhere
        s = slice(hd * 8, (hd + 1) * 8)
        want = (q[:, :, s] @ k[:, :, s].transpose(1, 2)) * mask / mask.sum(-1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(seen["pattern"][:, hd], want, rtol=1e-10, atol=1e-12)


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
    """Caching hook_pattern takes the explicit softmax path: same predictions as SDPA, rows summing to 1
    over the keys the mask allows and 0 elsewhere; an explicit reference recomputes layer 0's pattern."""
    import math

    torch.manual_seed(0)
    cfg = ModelConfig(n_dims=4, n_max=6, d_model=16, n_layers=2, n_heads=2, mlp=True)
    m = Transformer(cfg).eval()
    x, y = torch.randn(3, 7, 4, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)  # float64 is cast
    patterns = [act_name("pattern", l) for l in range(2)]
    with torch.no_grad():
        base, plain = m.run_with_cache(x, y, names_filter=[act_name("resid_pre", 0)], return_cache_object=False)
        pred, cache = m.run_with_cache(x, y, names_filter=patterns + [act_name("resid_pre", 0)],
                                       return_cache_object=False)
    assert act_name("pattern", 1) not in plain and torch.equal(base, m(x, y))  # SDPA unless asked
    torch.testing.assert_close(pred, base, rtol=1e-5, atol=1e-6)
    lay, mask = m.token_layout(7)
    T = lay.token_type.numel()
    for l in range(2):
        p = cache[act_name("pattern", l)]
        assert p.shape == (3, 2, T, T)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, T))
        assert (p[:, :, ~mask] == 0).all()
    # reference for layer 0 from the cached residual stream, by hand
    h = torch.nn.functional.layer_norm(cache[act_name("resid_pre", 0)], (16,), m.blocks[0].ln_1.weight,
                                       m.blocks[0].ln_1.bias)
    q, k, _ = m.blocks[0].attn.qkv(h).split(16, dim=-1)
    q, k = (t.view(3, T, 2, 8).transpose(1, 2) for t in (q, k))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.where(mask, s, torch.full_like(s, -1e30)).softmax(-1)
    torch.testing.assert_close(cache[act_name("pattern", 0)], ref)


def test_activation_names_are_transformer_lens_names():
    assert act_name("embed") == "hook_embed" and act_name("resid_pre", 2) == "blocks.2.hook_resid_pre"
    assert act_name("z", 1) == "blocks.1.attn.hook_z" and act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert act_name("pre", 0) == "blocks.0.mlp.hook_pre" and act_name("scale", 1, "ln2") == "blocks.1.ln2.hook_scale"
    assert act_name("normalized") == "ln_final.hook_normalized" and act_name("blocks.0.hook_mlp_out") == "blocks.0.hook_mlp_out"
    for bad, match in ((("queries", 0), "unknown activation point"), (("z",), "needs a layer"),
                       (("embed", 0), "has no layer"), (("scale", 0, "ln3"), "layer_type")):
        with pytest.raises(ValueError, match=match):
            act_name(*bad)
    m = make()
    with pytest.raises(KeyError, match="no hook point"):
        m.run_with_cache(*prompts(), names_filter=["blocks.9.hook_resid_post"])


@pytest.mark.parametrize("fmt,mask,attention", [("pair", "prefix", "softmax"), ("interleaved", "prefix", "softmax"),
                                                ("pair", "full", "linear"), ("pair", "prefix", "linear")])
def test_start_at_any_layer_equals_the_full_pass(fmt: str, mask: str, attention: str) -> None:
    """start_at_layer: the cached residual entering layer l, run from l with the same hooks, gives the full
    pass's predictions and activations exactly (per-prompt gates and head values on every layer)."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=3, n_heads=2, mlp=True, token_format=fmt, mask=mask,
                      attention=attention)
    m = Transformer(cfg).eval()
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6)
    gates = torch.rand(4, 3, 2)
    T = m.token_layout(6)[0].token_type.numel()
    values = torch.randn(4, 3, T, 2, 4)
    names = lambda n: "hook_resid" in n or n.endswith("hook_z")  # noqa: E731
    with torch.no_grad(), m.hooks(head_hooks(gates, values)):
        pred, cache = m.run_with_cache(x, y, names_filter=names, return_cache_object=False)
        for l in range(4):
            resid = cache[act_name("resid_pre", l)] if l < 3 else cache[act_name("resid_post", 2)]
            got, part = m.run_with_cache(resid, start_at_layer=l, names_filter=names, return_cache_object=False)
            assert torch.equal(got, pred)
            assert set(part) == {k for k in cache if any(k.startswith(f"blocks.{j}.") for j in range(l, 3))}
            for k, v in part.items():
                assert torch.equal(v, cache[k]), k
    assert not torch.equal(m(cache[act_name("resid_pre", 0)], start_at_layer=0), pred)  # the hooks did matter
    with pytest.raises(ValueError, match="start_at_layer"):
        m(cache[act_name("resid_pre", 0)], start_at_layer=4)
    with pytest.raises(ValueError, match="residual stream alone"):
        m(x, y, start_at_layer=1)


def test_hooks_are_removed_and_permanent_ones_stay() -> None:
    m = make()
    x, y = prompts()
    clean = m(x, y)
    zero = lambda z, hook: torch.zeros_like(z)  # noqa: E731
    with m.hooks([(act_name("z", 0), zero)]):
        assert not torch.equal(m(x, y), clean)
    assert torch.equal(m(x, y), clean)
    with pytest.raises(RuntimeError, match="inside"):
        with m.hooks([(act_name("z", 0), zero)]):
            raise RuntimeError("inside")
    assert torch.equal(m(x, y), clean)  # an error inside the block still removes the hook
    m.add_hook(act_name("z", 0), zero, is_permanent=True)
    m.reset_hooks()
    assert not torch.equal(m(x, y), clean)  # a permanent hook survives reset_hooks()
    m.reset_hooks(including_permanent=True)
    assert torch.equal(m(x, y), clean)
    with pytest.raises(KeyError, match="no hook point"):
        m.add_hook("blocks.0.attn.hook_zz", zero)


def test_without_transformer_lens_the_cache_object_says_how_to_get_it(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # as if the `lens` extra were not installed
    m = make()
    with pytest.raises(ImportError, match=r"icl-heads\[lens\].*return_cache_object=False"):
        m.run_with_cache(*prompts(), names_filter=[act_name("z", 0)])
    _, cache = m.run_with_cache(*prompts(), names_filter=[act_name("z", 0)], return_cache_object=False)
    assert list(cache) == [act_name("z", 0)]


def test_backward_hooks_see_the_gradient_of_the_activation() -> None:
    m = make()
    x, y = prompts()
    seen, kept = {}, {}

    def keep(t: torch.Tensor, hook) -> None:
        t.retain_grad()
        kept[hook.name] = t

    name = act_name("resid_post", 0)
    with m.hooks([(name, keep)], [(name, lambda g, hook: seen.__setitem__(hook.name, g.clone()))]):
        m(x, y).pow(2).sum().backward()
    torch.testing.assert_close(seen[name], kept[name].grad, rtol=0, atol=0)
    assert seen[name].abs().max() > 0 and not any(p.has_hooks() or p.bwd_hooks for p in m.hook_points())


def test_mlp_is_addressed_by_name_and_keeps_checkpoint_names() -> None:
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer

    m = Transformer(ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=2, n_heads=2, mlp=True))
    blk = m.blocks[1]
    assert blk.mlp.fc_in is blk.mlp[0] and blk.mlp.fc_out is blk.mlp[2] and isinstance(blk.mlp.act, torch.nn.GELU)
    assert {"blocks.1.mlp.0.weight", "blocks.1.mlp.2.bias"} <= set(m.state_dict())  # the zoo's names
    assert {"blocks.1.ln_1.weight", "ln_f.bias", "head_gates"} <= set(m.state_dict())  # hook names do not enter
    assert "blocks.1.ln1.hook_scale" in m.hook_dict and "ln_final.hook_normalized" in m.hook_dict


def _every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Transformer, "_read_out_rows_only", lambda self, block: False)


@pytest.mark.parametrize("attention,fmt", VARIANTS)
@pytest.mark.parametrize("mlp", [True, False])
def test_last_block_computing_the_read_out_rows_only_gives_the_full_passs_predictions(
        attention: str, fmt: str, mlp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation pass computes the last block at the query tokens only; the predictions equal the pass
    over every row, plain, with per-token head values (mean ablation) and with per-prompt ones (resample),
    and from a later layer."""
    m = make(attention, fmt, heads=2, mlp=mlp)
    x, y = prompts(B=4)
    T = m.embed(x, y).shape[1]
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    token_vals = torch.randn(2, T, 2, 8, dtype=torch.float64)  # (L, T, h, d_head)
    prompt_vals = torch.randn(4, 2, T, 2, 8, dtype=torch.float64)  # (B, L, T, h, d_head)
    resid = m.embed(x, y)
    runs = {"plain": lambda: m(x, y),
            "token values": lambda: m.run_with_hooks(x, y, fwd_hooks=head_hooks(g, token_vals)),
            "prompt values": lambda: m.run_with_hooks(x, y, fwd_hooks=head_hooks(g, prompt_vals)),
            "from layer 1": lambda: m.run_with_hooks(m.blocks[0](resid, m.token_layout(x.shape[1])[1]),
                                                     start_at_layer=1, fwd_hooks=head_hooks(g, prompt_vals))}
    with torch.no_grad():
        fast = {k: f() for k, f in runs.items()}
        with monkeypatch.context() as mp:
            _every_row(mp)
            full = {k: f() for k, f in runs.items()}
    for k in runs:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-12, atol=1e-12, msg=k)


def test_the_read_out_rows_pass_is_taken_only_when_nothing_watches_the_other_rows() -> None:
    """Gate hooks see the query rows (and ``hook.rows``) in an evaluation pass; a hook that reads ``hook_z``
    or anything after it in the last block, or training, sees every token."""
    m = make("softmax", "pair")
    x, y = prompts()
    T, Q = m.embed(x, y).shape[1], x.shape[1]
    seen = {}

    def record(key: str):
        def hook(t: torch.Tensor, hook) -> None:
            seen[key] = (t.shape[1], None if hook.rows is None else hook.rows.tolist())
        return hook

    gate = head_hooks(torch.ones(2, 2, dtype=torch.float64))[-1][1]

    def rowwise_record(t: torch.Tensor, hook) -> torch.Tensor:
        seen["gate"] = (t.shape[1], None if hook.rows is None else len(hook.rows))
        return gate(t, hook=hook)
    rowwise_record.rowwise = True  # type: ignore[attr-defined]

    last_z, last_mid = act_name("z", 1), act_name("resid_mid", 1)
    m.run_with_hooks(x, y, fwd_hooks=[(last_z, rowwise_record)])
    assert seen["gate"] == (Q, Q)
    m.run_with_hooks(x, y, fwd_hooks=[(last_z, record("z"))])
    assert seen["z"] == (T, None)
    m.run_with_hooks(x, y, fwd_hooks=[(last_z, rowwise_record), (last_mid, record("mid"))])
    assert seen["gate"] == (T, None) and seen["mid"] == (T, None)
    _, cache = m.run_with_cache(x, y, names_filter=[act_name("resid_post", 1)], return_cache_object=False)
    assert cache[act_name("resid_post", 1)].shape[1] == T
    m.train()
    m.run_with_hooks(x, y, fwd_hooks=[(last_z, rowwise_record)])
    assert seen["gate"] == (T, None)


def test_a_plain_torch_hook_after_the_last_attention_core_sees_every_row() -> None:
    m = make("softmax", "pair")
    x, y = prompts()
    seen = []
    handle = m.blocks[1].attn.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        m(x, y)
    finally:
        handle.remove()
    assert seen == [m.embed(x, y).shape[1]]
