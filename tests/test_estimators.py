"""Every estimator against an independent reference: numpy closed forms and iterations, scikit-learn, brute force."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.linear_model import Lasso, Ridge

from icl_heads import estimators as E
from icl_heads.estimators import prefix
from icl_heads.estimators.lasso_homotopy import _lasso_cd
from icl_heads.config import ConfigError, TaskConfig, get_preset
from icl_heads.tasks import fixed_prompts, generator, sample_prompts

D, S, NMAX = 5, 2, 9  # covers k < d, k = d and k > d


@pytest.fixture(scope="module")
def data():
    task = TaskConfig(d=D, s=S, sigma=0.2, n_max=NMAX)
    p = sample_prompts(task, 6, generator(3, "test"), dtype=torch.float64)
    return p.x, p.y, p.w


def _prefixes(x, y):
    """(b, k, X_k, y_k, x_k) for every prompt and context length k >= 1, as numpy."""
    X, Y = x.numpy(), y.numpy()
    for b in range(X.shape[0]):
        for k in range(1, X.shape[1]):
            yield b, k, X[b, :k], Y[b, :k], X[b, k]


def test_ols_matches_numpy_lstsq(data):
    x, y, _ = data
    pred = E.ols(x, y).numpy()
    assert np.all(pred[:, 0] == 0)
    for b, k, Xk, yk, q in _prefixes(x, y):
        w = np.linalg.lstsq(Xk, yk, rcond=None)[0]  # minimum-norm solution
        assert pred[b, k] == pytest.approx(q @ w, rel=1e-8, abs=1e-8)


def test_ridge_matches_sklearn_and_closed_form(data):
    x, y, _ = data
    for lam in (0.01, 1.0, 30.0):
        pred = E.ridge(x, y, lam).numpy()
        for b, k, Xk, yk, q in _prefixes(x, y):
            w = np.linalg.solve(Xk.T @ Xk + lam * np.eye(D), Xk.T @ yk)
            sk = Ridge(alpha=lam, fit_intercept=False, solver="svd").fit(Xk, yk).coef_
            assert pred[b, k] == pytest.approx(q @ w, rel=1e-9, abs=1e-10)
            assert pred[b, k] == pytest.approx(q @ sk, rel=1e-7, abs=1e-9)


def _sk_lasso(Xk, yk, alpha):
    return Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=1_000_000).fit(Xk, yk).coef_


@pytest.mark.parametrize("alpha", [1e-3, 0.05, 0.5])
def test_lasso_matches_sklearn(data, alpha):
    x, y, _ = data
    pred = E.lasso(x, y, alpha).numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        assert pred[b, k] == pytest.approx(q @ _sk_lasso(Xk, yk, alpha), abs=1e-6)


def test_lasso_per_column_alpha_and_grid_path(data):
    """One homotopy path serves a whole grid: each (prefix, alpha) equals scikit-learn at that alpha."""
    x, y, _ = data
    alphas = np.geomspace(1e-3, 1.0, NMAX + 1)
    pred = E.lasso(x, y, alphas).numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        assert pred[b, k] == pytest.approx(q @ _sk_lasso(Xk, yk, alphas[k]), abs=1e-6)


def test_lasso_coordinate_descent_fallback_matches_sklearn(data):
    """The CD solver (used where the homotopy fails KKT) is itself exact, run from a cold start."""
    x, y, _ = data
    st = E.PrefixStats.of(x, y)
    H, g = st.mean_hessian()
    B, N, d = g.shape
    alpha = 0.02
    w, failed = _lasso_cd(H.reshape(-1, d, d), g.reshape(-1, d), torch.full((B * N,), alpha, dtype=torch.float64),
                          1e-12, 50_000)
    assert failed == 0
    w = w.reshape(B, N, d).numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        np.testing.assert_allclose(w[b, k], _sk_lasso(Xk, yk, alpha), atol=1e-6)


def _np_gd(Xk, yk, eta, T):
    w = np.zeros(Xk.shape[1])
    path = [w.copy()]
    for _ in range(T):
        w = w - eta * Xk.T @ (Xk @ w - yk) / len(yk)
        path.append(w.copy())
    return path


def test_gd_matches_numpy_iteration_all_steps(data):
    x, y, _ = data
    steps = [0, 1, 2, 7, 40]
    fixed = E.gd(x, y, eta=0.05, steps=steps).numpy()
    sf = E.gd(x, y, eta=1.5, step="scale_free", steps=steps).numpy()
    assert fixed.shape == (len(steps), *y.shape)
    assert np.allclose(E.gd(x, y, 7, 0.05).numpy(), fixed[3])
    for b, k, Xk, yk, q in _prefixes(x, y):
        path = _np_gd(Xk, yk, 0.05, max(steps))
        lmax = np.linalg.eigvalsh(Xk.T @ Xk / k)[-1]
        path_sf = _np_gd(Xk, yk, 1.5 / lmax, max(steps))
        for i, t in enumerate(steps):
            assert fixed[i, b, k] == pytest.approx(q @ path[t], rel=1e-8, abs=1e-10)
            assert sf[i, b, k] == pytest.approx(q @ path_sf[t], rel=1e-8, abs=1e-10)


def _np_pto(Xk, yk, q, T, eta, gamma=1.0, step="scale_free"):
    r = np.abs(Xk.T @ yk / len(yk))
    if step == "normalized":
        r = r / r.max()
    D_ = r**gamma
    Xt = Xk * D_
    if step == "scale_free":
        eta = eta / np.linalg.eigvalsh(Xt.T @ Xt / len(yk))[-1]
    return [(D_ * q) @ v for v in _np_gd(Xt, yk, eta, T)]


@pytest.mark.parametrize("step,eta,gamma", [("scale_free", 1.2, 1.0), ("normalized", 0.1, 1.0), ("fixed", 0.2, 2.0),
                                            ("scale_free", 0.7, 0.5)])
def test_pto_matches_numpy(data, step, eta, gamma):
    x, y, _ = data
    steps = [0, 1, 3, 25]
    pred = E.pto(x, y, eta=eta, gamma=gamma, step=step, steps=steps).numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        ref = _np_pto(Xk, yk, q, max(steps), eta, gamma, step)
        for i, t in enumerate(steps):
            assert pred[i, b, k] == pytest.approx(ref[t], rel=1e-7, abs=1e-10)


def test_pto_is_gd_preconditioned_by_r_squared_closed_form(data):
    """T steps of w <- w - eta diag(r^2) (H w - g) from 0 give w_T = [I - (I - eta P H)^T] H^{-1} g (k > d)."""
    x, y, _ = data
    eta, T = 0.3, 17
    pred = E.pto(x, y, T, eta, step="fixed").numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        if k <= D:
            continue
        H, g = Xk.T @ Xk / k, Xk.T @ yk / k
        P = np.diag((Xk.T @ yk / k) ** 2)
        w = (np.eye(D) - np.linalg.matrix_power(np.eye(D) - eta * P @ H, T)) @ np.linalg.solve(H, g)
        assert pred[b, k] == pytest.approx(q @ w, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("step,eta", [("scale_free", 1.1), ("fixed", 0.3)])
def test_pto_groups_with_d_groups_is_pto(data, step, eta):
    x, y, _ = data
    steps = [1, 4, 30]
    a = E.pto_groups(x, y, D, 0.0, eta=eta, step=step, steps=steps)
    b = E.pto(x, y, eta=eta, step=step, steps=steps)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_pto_groups_matches_explicit_features(data):
    x, y, _ = data
    h, a, eta, T = 2, 0.3, 0.9, 12
    pred = E.pto_groups(x, y, h, a, T, eta).numpy()
    groups = np.array_split(np.arange(D), h)
    for b, k, Xk, yk, q in _prefixes(x, y):
        r = Xk.T @ yk / k
        phi = lambda X: np.concatenate([a * X, np.stack([X[..., g] @ r[g] for g in groups], -1)], -1)  # noqa: E731
        F = phi(Xk)
        c = eta / np.linalg.eigvalsh(F.T @ F / k)[-1]
        assert pred[b, k] == pytest.approx(phi(q) @ _np_gd(F, yk, c, T)[-1], rel=1e-7, abs=1e-10)


def test_oracle_ls_matches_lstsq_on_support(data):
    x, y, w = data
    pred = E.oracle_ls(x, y, w).numpy()
    for b, k, Xk, yk, q in _prefixes(x, y):
        S_ = np.flatnonzero(w[b].numpy())
        ws = np.linalg.lstsq(Xk[:, S_], yk, rcond=None)[0]
        assert pred[b, k] == pytest.approx(q[S_] @ ws, rel=1e-8, abs=1e-8)


def _brute_bayes(Xk, yk, q, s, sigma, tau):
    """Posterior mean from full k x k Gaussian marginal likelihoods (scipy) and per-support posterior means."""
    d = Xk.shape[1]
    logp, means = [], []
    for S_ in itertools.combinations(range(d), s):
        XS = Xk[:, S_]
        cov = tau**2 * XS @ XS.T + sigma**2 * np.eye(len(yk))
        logp.append(multivariate_normal(mean=np.zeros(len(yk)), cov=cov).logpdf(yk))
        wS = np.linalg.solve(XS.T @ XS + (sigma / tau) ** 2 * np.eye(s), XS.T @ yk)
        means.append(q[list(S_)] @ wS)
    logp = np.array(logp)
    p = np.exp(logp - logp.max())
    return float(p @ np.array(means) / p.sum())


@pytest.mark.parametrize("s,sigma,tau", [(1, 0.3, 1.0), (2, 0.5, 1.5), (2, 0.0, 1.0)])
def test_bayes_matches_brute_force(s, sigma, tau):
    task = TaskConfig(d=3, s=s, sigma=sigma, tau=tau, n_max=6)
    p = sample_prompts(task, 5, generator(11, "test"), dtype=torch.float64)
    pred = E.bayes(p.x, p.y, s, sigma, tau, chunk_elems=7).numpy()  # tiny chunks: exercise the running log-sum-exp
    sig = max(sigma, E.BAYES_MIN_SIGMA * tau)
    for b, k, Xk, yk, q in _prefixes(p.x, p.y):
        assert pred[b, k] == pytest.approx(_brute_bayes(Xk, yk, q, s, sig, tau), rel=1e-6, abs=1e-8)
    assert np.all(pred[:, 0] == 0)


def test_prefix_semantics_every_estimator(data):
    """Column k depends on examples 0..k-1 and the query x_k only: perturbing later examples changes nothing."""
    x, y, w = data
    fns = {
        "ols": lambda x, y: E.ols(x, y), "ridge": lambda x, y: E.ridge(x, y, 0.3),
        "lasso": lambda x, y: E.lasso(x, y, 0.05), "gd": lambda x, y: E.gd(x, y, 20, 0.1),
        "pto": lambda x, y: E.pto(x, y, 20, 1.0), "pto_groups": lambda x, y: E.pto_groups(x, y, 2, 0.1, 20, 1.0),
        "oracle_ls": lambda x, y: E.oracle_ls(x, y, w), "bayes": lambda x, y: E.bayes(x, y, S, 0.2),
    }
    gen = torch.Generator().manual_seed(0)
    for k in (0, 3, D, NMAX - 1):
        x2, y2 = x.clone(), y.clone()
        y2[:, k:] += torch.randn(y2[:, k:].shape, generator=gen, dtype=torch.float64)
        x2[:, k + 1:] += torch.randn(x2[:, k + 1:].shape, generator=gen, dtype=torch.float64)
        for name, fn in fns.items():
            a, b = fn(x, y), fn(x2, y2)
            assert torch.allclose(a[:, : k + 1], b[:, : k + 1], rtol=1e-9, atol=1e-11), name
            if k < NMAX - 1 and name != "oracle_ls":
                assert not torch.allclose(a[:, k + 1:], b[:, k + 1:]), name  # and later columns do see them


def test_bayes_has_lowest_risk_on_small_setting():
    """No estimator beats the Bayes posterior mean beyond the paired 95% CI (oracle_ls excluded: it knows S)."""
    preset = get_preset("smoke", **{"eval.n_val": 300, "eval.n_test": 1500, "eval.pto_steps": [1, 5, 20, 100]})
    names = [n for n in E.ESTIMATOR_NAMES if n not in ("oracle_ls", "pto_fixed", "pto_normalized")]
    tuned = E.tuned_predictions(preset, names)
    test = E.eval_prompts(preset)[1]
    err = {n: ((t.pred - test.f) ** 2).numpy() for n, t in tuned.items()}
    for n in names:
        diff = err[n] - err["bayes"]
        se = diff.std(0, ddof=1) / np.sqrt(diff.shape[0])
        assert np.all(diff.mean(0)[1:] >= -1.96 * se[1:] - 1e-12), n
    # and the floor is strictly informative: clearly below ridge once n >= d
    d = preset.task.d
    assert err["bayes"].mean(0)[d:].mean() < 0.5 * err["ridge"].mean(0)[d:].mean()


def test_tuning_picks_validation_argmin():
    preset = get_preset("smoke", **{"eval.n_val": 100, "eval.n_test": 100})
    val, _ = E.eval_prompts(preset)
    fam = E.make_family("ridge", preset)
    combos = fam.grid()
    risk = E.val_risk(fam, val, combos)
    chosen = E.tune_grid(fam, val)
    for k, c in enumerate(chosen):
        assert risk[combos.index(c), k] == risk[:, k].min()
    only_big = E.choose(combos, risk, [c["lambda"] >= 10 for c in combos])
    assert all(c["lambda"] >= 10 for c in only_big)


def test_unknown_estimator_and_bad_arguments(data):
    x, y, _ = data
    with pytest.raises(ConfigError, match=r"^estimator: unknown 'foo' \(choose from zero, ols"):
        E.resolve_names(["ridge", "foo"])
    with pytest.raises(ConfigError, match="^step:"):
        E.pto(x, y, 5, 1.0, step="adaptive")
    with pytest.raises(ConfigError, match="^h:"):
        E.pto_groups(x, y, D + 1, 0.0, 5, 1.0)
    with pytest.raises(ConfigError, match="^lam:"):
        E.ridge(x, y, 0.0)
    with pytest.raises(ConfigError, match="^x, y:"):
        E.ols(x[0], y)


def test_large_batches_are_chunked_consistently(data, monkeypatch):
    """Processing prompts in memory-bounded blocks gives the same numbers as one block."""
    x, y, w = data
    full = [E.pto(x, y, 10, 1.0), E.lasso(x, y, 0.05), E.bayes(x, y, S, 0.2)]
    monkeypatch.setattr(prefix, "_ELEMS_BUDGET", NMAX * D * D * 2)  # two prompts per block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked = [E.pto(x, y, 10, 1.0), E.lasso(x, y, 0.05), E.bayes(x, y, S, 0.2)]
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fixed_prompts_streams_are_used():
    preset = get_preset("smoke", **{"eval.n_val": 20, "eval.n_test": 30})
    val, test = E.eval_prompts(preset)
    ref = fixed_prompts(preset.task, 30, preset.seed, "test")
    assert torch.equal(test.x, ref.x) and val.batch == 20


@pytest.mark.parametrize("fn,eta", [(E.gd, 0.6), (E.pto, 4.0)])
def test_step_guard_rejects_and_clips_unstable_steps(data, fn, eta):
    """A fixed step with step * lambda_max >= 2 is NaN under "reject" and GD with step GUARD_C / lambda_max
    under "clip" (numpy iteration); stable prefixes are untouched."""
    x, y, _ = data
    T = 30
    raw, rej, clip = (fn(x, y, T, eta, step="fixed", guard=g).numpy() for g in ("off", "reject", "clip"))
    unstable = 0
    for b, k, Xk, yk, q in _prefixes(x, y):
        D_ = np.abs(Xk.T @ yk / k) if fn is E.pto else np.ones(D)  # PtO: GD on diag(|r|) x
        Xt = Xk * D_
        lmax = np.linalg.eigvalsh(Xt.T @ Xt / k)[-1]
        if eta * lmax >= 2:
            unstable += 1
            assert np.isnan(rej[b, k])
            ref = (D_ * q) @ _np_gd(Xt, yk, E.GUARD_C / lmax, T)[-1]
            assert clip[b, k] == pytest.approx(ref, rel=1e-8, abs=1e-10)
        else:
            assert rej[b, k] == raw[b, k] == clip[b, k]
    assert 0 < unstable < (NMAX - 1) * x.shape[0]  # the case mixes stable and unstable prefixes
    with pytest.raises(ConfigError, match="^guard:"):
        fn(x, y, T, eta, step="fixed", guard="maybe")


def test_tuning_rejects_steps_unstable_on_any_validation_prompt():
    """val_risk is infinite exactly where a fixed step is unstable on at least one validation prompt."""
    preset = get_preset("smoke", **{"eval.n_val": 40, "eval.n_test": 40, "eval.pto_steps": [5]})
    val, _ = E.eval_prompts(preset)
    fam = E.make_family("gd", preset)
    combos = [c for c in fam.grid() if c["step"] == "fixed"]
    risk = E.val_risk(fam, val, combos).numpy()
    X = val.x.double().numpy()
    for k in range(1, X.shape[1]):
        lmax = max(np.linalg.eigvalsh(X[b, :k].T @ X[b, :k] / k)[-1] for b in range(X.shape[0]))
        for i, c in enumerate(combos):
            assert np.isinf(risk[i, k]) == (c["eta"] * lmax >= 2), (k, c)
    assert np.isinf(risk).any() and np.isfinite(risk[:, 1:]).any()


@pytest.mark.parametrize("base,fn", [("gd", E.gd), ("pto", E.pto)])
def test_depth_matched_is_the_direct_call_with_the_validation_best_step(base, fn):
    """gd_depth / pto_depth: exactly T = L - 1 steps, the step that minimises validation risk among the grid
    (computed here by direct calls), and test predictions equal to the direct call with that step."""
    preset = get_preset("smoke", **{"eval.n_val": 60, "eval.n_test": 80})
    T = preset.model.n_layers - 1
    val, test = E.eval_prompts(preset)
    tuned = E.depth_matched_predictions(preset, T, (val, test))[f"{base}_depth"]
    cands = [(c["step"], c.get("c", c.get("eta"))) for c in E.FAMILIES[base](preset.task, [T]).grid()]
    with np.errstate(invalid="ignore"):
        vr = np.stack([((fn(val.x, val.y, T, e, step=r, guard="reject") - val.f.double()) ** 2).mean(0).numpy()
                       for r, e in cands])
    vr = np.where(np.isfinite(vr), vr, np.inf)
    for n in range(1, preset.task.n_max + 1):
        hp = tuned.hparams[n]
        assert hp["T"] == T and cands[int(np.argmin(vr[:, n]))] == (hp["step"], hp.get("c", hp.get("eta")))
        direct = fn(test.x, test.y, T, hp.get("c", hp.get("eta")), step=hp["step"], guard="clip")[:, n]
        assert torch.allclose(tuned.pred[:, n], direct, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="^T:"):
        E.depth_matched_predictions(preset, 0, (val, test))


def test_few_step_recurrence_equals_the_closed_form_and_the_iteration(data):
    """``Spectrum.gd`` takes the recurrence up to RECURSE_STEPS steps, the closed form beyond: both agree with
    each other and with plain GD iteration, for steps below, at and above the stability limit (x >= 1)."""
    from icl_heads.estimators.prefix import RECURSE_STEPS, Spectrum

    x, y, _ = data
    H = torch.einsum("bni,bnj->bij", x, x) / x.shape[1]
    g = torch.einsum("bni,bn->bi", x, y) / x.shape[1]
    sp = Spectrum.of(H, g, x[:, -1])
    steps = [0, 1, 2, 3, 5, RECURSE_STEPS]
    lam_max = sp.lam_max
    for c in (0.0, 0.3, 1.0, 1.9, 2.5):  # step c / lambda_max: c >= 2 diverges
        eta = c / lam_max
        x_ = eta[..., None] * sp.lam
        few, closed = sp._gd_few(x_, eta, steps), sp._gd_closed(x_, eta, steps)
        assert torch.allclose(few, closed, rtol=1e-10, atol=1e-12), c
        assert torch.equal(sp.gd(eta, steps), few)
        for b in range(3):
            Xk, yk = x[b].numpy(), y[b].numpy()
            path = _np_gd(Xk, yk, float(eta[b]), max(steps))
            ref = [x[b, -1].numpy() @ path[t] for t in steps]
            assert np.allclose(few[:, b].numpy(), ref, rtol=1e-9, atol=1e-12), (c, b)
    assert torch.equal(sp.gd(eta, [RECURSE_STEPS + 1]), sp._gd_closed(x_, eta, [RECURSE_STEPS + 1]))
