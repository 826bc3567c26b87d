"""E6c: the hand-built linear-attention transformer computes PtO / grouped PtO exactly (float64).

Two independent references: the package's ``estimators.pto``/``pto_groups`` (closed form in an
eigenbasis, all prefixes) and an explicit GD loop in numpy written here.
"""

import numpy as np
import pytest
import torch

from icl_heads.config import ConfigError, TaskConfig
from icl_heads.analysis.construct import Slots, pto_transformer
from icl_heads.estimators import pto, pto_groups
from icl_heads.model import Transformer, act_name
from icl_heads.tasks import fixed_prompts

TOL = 1e-10


def numpy_pto(X, y, xq, etas, groups, a):
    """Reference: r from the context, features [a x, f(x)] with f_k = sum_{j in G_k} r_j x_j, explicit GD."""
    n, d = X.shape
    r = X.T @ y / n
    sizes = [d // groups + (k < d % groups) for k in range(groups)]  # contiguous, sizes differ by <= 1
    edges = np.concatenate([[0], np.cumsum(sizes)])

    def feats(M):
        f = np.stack([M[:, edges[k]:edges[k + 1]] @ r[edges[k]:edges[k + 1]] for k in range(groups)], 1)
        return np.concatenate([a * M, f], 1) if a else f

    Z, zq = feats(X), feats(xq[None])[0]
    v = np.zeros(Z.shape[1])
    for eta in etas:
        v = v - eta * Z.T @ (Z @ v - y) / n
    return zq @ v


def prompts(d, n, batch=64, seed=0):
    p = fixed_prompts(TaskConfig(d=d, s=min(2, d), sigma=0.1, n_max=n), batch, seed, "test")
    return p.x, p.y


@pytest.mark.parametrize("d, T, n, eta", [(3, 1, 5, 0.2), (5, 2, 8, 0.1), (5, 4, 12, 0.05), (10, 3, 20, 0.05),
                                          (4, 2, 2, 0.1)])
def test_matches_pto(d, T, n, eta):
    x, y = prompts(d, n)
    model = pto_transformer(d, T, eta)
    got = model(x, y)[:, 0].detach()
    ref = pto(x, y, T, eta, step="fixed")[:, n]
    assert ref.abs().max() > 1e-2  # not a trivially zero comparison
    assert (got - ref).abs().max() < TOL
    ref_np = [numpy_pto(x[b, :n].numpy(), y[b, :n].numpy(), x[b, n].numpy(), [eta] * T, d, 0.0) for b in range(len(x))]
    assert np.abs(got.numpy() - np.array(ref_np)).max() < TOL


@pytest.mark.parametrize("d, h, a, T, n", [(6, 2, 0.0, 3, 10), (10, 4, 0.3, 2, 12), (7, 3, 1.0, 4, 9),
                                           (5, 1, 0.0, 2, 6), (8, 8, 0.5, 2, 10)])
def test_matches_grouped_pto(d, h, a, T, n):
    x, y = prompts(d, n, seed=1)
    eta = 0.05
    model = pto_transformer(d, T, eta, groups=h, a=a)
    got = model(x, y)[:, 0].detach()
    ref = pto_groups(x, y, h, a, T, eta, step="fixed")[:, n]
    assert ref.abs().max() > 1e-2
    assert (got - ref).abs().max() < TOL
    ref_np = [numpy_pto(x[b, :n].numpy(), y[b, :n].numpy(), x[b, n].numpy(), [eta] * T, h, a) for b in range(len(x))]
    assert np.abs(got.numpy() - np.array(ref_np)).max() < TOL


def test_every_layer_is_one_step():
    """The read-out applied after block l gives PtO after l - 1 steps (the E6b 'lens' readout)."""
    d, T, n, eta = 5, 4, 9, 0.1
    x, y = prompts(d, n, seed=2)
    model = pto_transformer(d, T, eta)
    _, cache = model.run_with_cache(x, y, names_filter=lambda n: n.endswith("hook_resid_post"))
    ref = pto(x, y, eta=eta, step="fixed", steps=list(range(T + 1)))[:, :, n]
    for l in range(T + 1):
        lens = model.read_out(cache[act_name("resid_post", l)][:, -1]).squeeze(-1).detach()
        assert (lens - ref[l]).abs().max() < TOL


def test_per_step_etas():
    d, n, etas = 4, 7, [0.3, 0.05, 0.15]
    x, y = prompts(d, n, seed=3)
    got = pto_transformer(d, len(etas), etas)(x, y)[:, 0].detach().numpy()
    ref = [numpy_pto(x[b, :n].numpy(), y[b, :n].numpy(), x[b, n].numpy(), etas, d, 0.0) for b in range(len(x))]
    assert np.abs(got - np.array(ref)).max() < TOL


def test_layer1_writes_diag_r_x():
    """After block 0 every context token holds r_j x_ij (r of the full context) in the f slots."""
    d, n = 4, 6
    x, y = prompts(d, n, seed=4)
    model = pto_transformer(d, 2, 0.1)
    _, cache = model.run_with_cache(x, y, names_filter=[act_name("resid_post", 0)])
    r = (x[:, :n] * y[:, :n, None]).mean(1)
    f = cache[act_name("resid_post", 0)][:, :n][..., Slots(d, d).f].detach()
    assert (f - r[:, None] * x[:, :n]).abs().max() < TOL


def test_is_the_project_transformer_with_rank_one_heads():
    d, T = 5, 2
    model = pto_transformer(d, T, 0.1)
    cfg = model.cfg
    assert isinstance(model, Transformer) and next(model.parameters()).dtype == torch.float64
    assert (cfg.attention, cfg.mlp, cfg.layer_norm, cfg.pos_emb, cfg.mask) == ("linear", False, False, False, "full")
    assert cfg.n_heads == d and cfg.n_layers == T + 1
    D, dh = cfg.d_model, cfg.d_model // d
    W = model.blocks[0].attn.qkv.weight.detach()
    Wq, Wk, Wv = W[:D], W[D:2 * D], W[2 * D:]
    Wo = model.blocks[0].attn.proj.weight.detach()
    for k in range(d):
        sl = slice(k * dh, (k + 1) * dh)
        assert torch.linalg.matrix_rank(Wq[sl].T @ Wk[sl]) == 1  # rank-one QK circuit
        assert torch.linalg.matrix_rank(Wo[:, sl] @ Wv[sl]) == 1  # rank-one OV circuit
    for l in range(1, T + 1):  # later layers: only head 0 has weights or an open gate
        W = model.blocks[l].attn.qkv.weight.detach()
        for k in range(1, d):
            sl = slice(k * dh, (k + 1) * dh)
            assert W[sl].abs().sum() == 0 and W[D:][sl].abs().sum() == 0 and W[2 * D:][sl].abs().sum() == 0
        assert model.head_gates[l, 0] == 1 and model.head_gates[l, 1:].abs().sum() == 0
    assert (model.head_gates[0] == 1).all()


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="groups"):
        pto_transformer(5, 2, 0.1, groups=6)
    with pytest.raises(ConfigError, match="eta"):
        pto_transformer(5, 2, [0.1])
    with pytest.raises(ConfigError, match="n_steps"):
        pto_transformer(5, -1, 0.1)
    with pytest.raises(ConfigError, match="a:"):
        pto_transformer(5, 2, 0.1, groups=2, a=-1.0)


@pytest.mark.parametrize("d,h,a,gd_heads", [(4, 4, 0.0, 4), (5, 5, 0.0, 2), (6, 3, 1.0, 3)])
def test_gd_step_split_over_heads_computes_the_same_function(d, h, a, gd_heads):
    """Splitting the GD kernel over heads (the 2a negative control) changes no prediction."""
    task = TaskConfig(d=d, s=min(2, d), sigma=0.1, n_max=12)
    p = fixed_prompts(task, 30, 0, "test")
    one = pto_transformer(d, 2, 0.1, groups=h, a=a)
    split = pto_transformer(d, 2, 0.1, groups=h, a=a, gd_heads=gd_heads)
    with torch.no_grad():
        assert torch.allclose(split(p.x, p.y), one(p.x, p.y), atol=1e-12)
    assert split.head_gates[1:].sum(-1).tolist() == [float(gd_heads)] * 2


def test_gd_heads_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="gd_heads"):
        pto_transformer(4, 1, 0.1, gd_heads=5)
