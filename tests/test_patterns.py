"""E2's attention figure: the CSV equals the patterns read from ``run_with_cache`` by hand, the figure is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_heads.analysis.patterns import PATTERN_PROMPTS, example_weights, pattern_rows, query_attention
from icl_heads.checkpoint import save_checkpoint
from icl_heads.config import ConfigError, ModelConfig, Preset, TaskConfig
from icl_heads.experiments.e2_importance import run_e2
from icl_heads.io import read_csv
from icl_heads.model import Transformer, act_name
from icl_heads.runs import layout
from icl_heads.tasks import fixed_prompts

TASK = TaskConfig(d=4, s=2, sigma=0.1, n_max=10)
PATTERNS = lambda name: name.endswith("hook_pattern")  # noqa: E731


def softmax_model(seed: int = 0, **arch) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(n_dims=4, n_max=10, d_model=16, n_layers=2, n_heads=2, **arch))
    with torch.no_grad():  # larger weights than GPT-2 init: patterns far from uniform, heads that matter
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.8 / np.sqrt(p.shape[1]))
    return m.eval()


@pytest.fixture(scope="module")
def e2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    pre = Preset(name="t", task=TASK, model=dict(d_model=16, n_layers=2, mlp=True), heads=[2],
                 train=dict(steps=1, batch_size=8, lr=1e-3), eval=dict(n_val=50, n_test=50))
    model = softmax_model()
    save_checkpoint(root / "ckpt", model, {"preset": pre.model_dump()})
    run_e2(root / "ckpt", root / "e2", n_prompts=50, n_boot=20)
    return root / "e2", model, pre


def test_e2_writes_the_attention_figure_and_csv(e2_run):
    out, model, _ = e2_run
    assert (out / layout.E2_PATTERNS_PNG).stat().st_size > 1000
    rows = read_csv(out / layout.E2_PATTERNS_CSV)
    conc = read_csv(out / layout.E2_CONCENTRATION)
    assert sorted({(r["layer"], r["head"]) for r in rows}) == [(c["layer"], c["top_head"]) for c in conc]
    assert {r["quantity"] for r in rows} == {"position", "abs_y"} and {r["ranked_by"] for r in rows} == {"zero"}


def test_csv_equals_the_patterns_read_from_run_with_cache(e2_run):
    """Recompute every number from the cached ``hook_pattern``: prefix mask, pair tokens, so the query
    for n = n_max is token 2 n_max and example k's context token is token k."""
    out, model, pre = e2_run
    rows = read_csv(out / layout.E2_PATTERNS_CSV)
    p = fixed_prompts(TASK, 50, pre.seed, "test")
    with torch.no_grad():
        _, cache = model.run_with_cache(p.x, p.y, names_filter=PATTERNS, return_cache_object=False)
    n = TASK.n_max
    for l, k in sorted({(int(r["layer"]), int(r["head"])) for r in rows}):
        w = cache[act_name("pattern", l - 1)][:, k - 1, 2 * n, :n].double().numpy()  # (P, n)
        mine = [r for r in rows if (int(r["layer"]), int(r["head"])) == (l, k)]
        pos = [float(r["weight"]) for r in mine if r["quantity"] == "position"]
        np.testing.assert_allclose(pos, w.mean(0), rtol=1e-6)
        abs_y = np.abs(p.y[:, :n].double().numpy())
        for r in (r for r in mine if r["quantity"] == "abs_y"):
            lo, hi = float(r["x_low"]), float(r["x_high"])
            last = hi == abs_y.max()
            sel = (abs_y >= lo) & ((abs_y <= hi) if last else (abs_y < hi))
            assert int(r["count"]) == sel.sum() > 0
            assert float(r["weight"]) == pytest.approx(w[sel].mean(), rel=1e-6)
            assert float(r["x"]) == pytest.approx(abs_y[sel].mean(), rel=1e-6)
    assert int(rows[0]["n_prompts"]) == min(50, PATTERN_PROMPTS)


def test_interleaved_weights_sum_each_example_and_leave_the_rest_to_the_query():
    model = softmax_model(1, token_format="interleaved")
    p = fixed_prompts(TASK, 20, 0, "test")
    att = query_attention(model, p, [(0, 0), (1, 1)])
    with torch.no_grad():
        _, cache = model.run_with_cache(p.x, p.y, names_filter=PATTERNS, return_cache_object=False)
    q, to_example, uniform = example_weights(model, TASK.n_max + 1)
    assert q == 2 * TASK.n_max and to_example.sum() == 2 * TASK.n_max  # x and y token of every example k < n
    n = TASK.n_max
    assert uniform == pytest.approx(2 / (2 * n + 1))  # the query sees 2n context tokens and itself
    assert example_weights(softmax_model(1), n + 1)[2] == pytest.approx(1 / (n + 1))  # paired: n and itself
    own = cache[act_name("pattern", 1)][:, 1, q, q].double().numpy()
    np.testing.assert_allclose(att.weight[:, 1].sum(-1) + own, 1.0, rtol=1e-6)
    assert len([r for r in pattern_rows(att, bins=4) if r["quantity"] == "abs_y"]) == 2 * 4


def test_bad_requests_raise_clear_errors():
    p = fixed_prompts(TASK, 5, 0, "test")
    with pytest.raises(ConfigError, match="heads:"):
        query_attention(softmax_model(), p, [(2, 0)])
    with pytest.raises(ConfigError, match="softmax"):
        query_attention(softmax_model(attention="linear"), p, [(0, 0)])
