"""The prompt sampler: shapes, sparsity, distribution, seeding and stream separation."""

import numpy as np
import pytest
import torch
from scipy import stats

from icl_heads.config import TaskConfig
from icl_heads.metrics import risk_curve
from icl_heads.tasks import fixed_prompts, generator, sample_prompts, stream_seed

TASK = TaskConfig(d=6, s=2, sigma=0.3, n_max=7)


def test_shapes_and_exact_sparsity():
    p = sample_prompts(TASK, 500, generator(0, "train"))
    assert p.x.shape == (500, 8, 6) and p.y.shape == (500, 8) and p.w.shape == (500, 6)
    assert ((p.w != 0).sum(1) == TASK.s).all()
    torch.testing.assert_close(p.f, torch.einsum("bnd,bd->bn", p.x, p.w))


def test_support_is_uniform_over_coordinates_and_values_gaussian():
    p = sample_prompts(TASK, 6000, generator(1, "train"), dtype=torch.float64)
    counts = (p.w != 0).sum(0).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    pairs = {}
    for row in (p.w != 0).numpy():
        key = tuple(np.flatnonzero(row))
        pairs[key] = pairs.get(key, 0) + 1
    assert len(pairs) == 15 and stats.chisquare(list(pairs.values())).pvalue > 1e-3
    vals = p.w[p.w != 0].numpy() / TASK.tau
    assert stats.kstest(vals, "norm").pvalue > 1e-3
    noise = (p.y - p.f).numpy().ravel() / TASK.sigma
    assert stats.kstest(noise, "norm").pvalue > 1e-3


def test_same_seed_same_prompts_and_streams_differ():
    a = fixed_prompts(TASK, 10, 3, "test")
    b = fixed_prompts(TASK, 10, 3, "test")
    c = fixed_prompts(TASK, 10, 3, "val")
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert not torch.equal(a.x, c.x)
    seeds = {stream_seed(s, k) for s in range(5) for k in ("train", "val", "test", "probe")}
    assert len(seeds) == 20


def test_zero_predictor_normalised_risk_is_one():
    task = TaskConfig(d=5, s=3, tau=2.0, sigma=0.0, n_max=4)
    p = fixed_prompts(task, 20000, 0, "test")
    curve = risk_curve(torch.zeros_like(p.f), p.f, task)
    half_norm = (curve.ci_high - curve.ci_low) / 2 / curve.norm
    assert curve.norm == 12.0
    assert np.all(np.abs(curve.risk_norm - 1) < 3 * half_norm)  # E f^2 = s tau^2 exactly
    assert np.all(curve.ci_low < curve.risk) and np.all(curve.risk < curve.ci_high)


@pytest.mark.parametrize("bad", [dict(s=7), dict(sigma=-0.1), dict(n_max=0), dict(tau=0)])
def test_invalid_task_rejected(bad):
    with pytest.raises(ValueError):
        TaskConfig(**{**dict(d=6, s=2, sigma=0.1, n_max=5), **bad})

