"""The batched ridge probes against scikit-learn's StandardScaler + RidgeCV pipeline."""

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from icl_heads.analysis.ridge import ridge_cv

ALPHAS = np.logspace(-6, 6, 25)


def _problems(seed: int, G: int, P: int, D: int, K: int | None, noise: float):
    """Fit rows and 50 held-out rows of the same design (with a constant and a nearly collinear feature)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(G, P + 50, D)) * rng.uniform(0.1, 10, size=(G, 1, D)) + rng.normal(size=(G, 1, D))
    X[:, :, 1] = 3.0  # a constant feature: scale 1, as StandardScaler
    X[:, :, 2] = X[:, :, 3] + 1e-9 * rng.normal(size=(G, P + 50))  # nearly collinear
    W = rng.normal(size=(G, D) if K is None else (G, D, K))
    Y = np.einsum("gpd,gd->gp", X, W) if K is None else np.einsum("gpd,gdk->gpk", X, W)
    Y = Y + noise * rng.normal(size=Y.shape)
    return X[:, :P], Y[:, :P], X[:, P:]


def _loo_curve(ref: RidgeCV, k: int | None) -> np.ndarray:
    cv = ref.cv_results_  # (P, [K,] A) squared LOO errors
    curve = cv.mean(0) if k is None or cv.ndim == 2 else cv[:, k].mean(0)
    return curve if curve.ndim == 1 else curve.mean(0)


def _mode_curves(X, Y, per_target: bool) -> list[RidgeCV]:
    """scikit-learn's ``svd`` and ``eigen`` modes fitted on the same problem (see :func:`_same_choice`)."""
    args = dict(alphas=ALPHAS, alpha_per_target=per_target, store_cv_results=True)
    return [make_pipeline(StandardScaler(), RidgeCV(gcv_mode=m, **args)).fit(X, Y)[-1] for m in ("svd", "eigen")]


def _same_choice(refs: list[RidgeCV], alpha: float, k: int | None = None) -> None:
    """Our alpha is scikit-learn's, or ties with it: its LOO error within 1e-9 of the minimum of one of
    scikit-learn's curves ``refs`` -- the default one, or the ``svd`` or ``eigen`` mode's. The modes compute
    the same curve in exact arithmetic, but on the nearly collinear design they differ by ~5e-7 relative
    at tiny alphas (measured), and which of those alphas wins then depends on the machine's BLAS:
    the curve is not determined more finely than that, by scikit-learn either."""
    curves = [_loo_curve(r, k) for r in refs]
    a = list(ALPHAS).index(alpha)
    assert any(c[a] <= c.min() * (1 + 1e-9) for c in curves), (alpha, refs[0].alpha_, [c[a] / c.min() - 1 for c in curves])


@pytest.mark.parametrize("noise", [0.01, 1.0, 100.0])
def test_single_target_matches_sklearn(noise):
    X, Y, Xt = _problems(0, 4, 300, 12, None, noise)
    fit = ridge_cv(X, Y, ALPHAS)
    pred = fit.predict(Xt)
    for g in range(4):
        ref = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, store_cv_results=True)).fit(X[g], Y[g])
        _same_choice([ref[-1], *_mode_curves(X[g], Y[g], ref[-1].alpha_per_target)], fit.alpha[g, 0])
        np.testing.assert_allclose(pred[g], ref.predict(Xt[g]), rtol=1e-7, atol=1e-8 * np.abs(Y[g]).max())


@pytest.mark.parametrize("per_target", [True, False])
def test_multi_target_matches_sklearn(per_target):
    X, Y, Xt = _problems(1, 2, 400, 8, 5, 2.0)
    fit = ridge_cv(X, Y, ALPHAS, alpha_per_target=per_target)
    pred = fit.predict(Xt)
    for g in range(2):
        ref = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, alpha_per_target=per_target,
                                                      store_cv_results=True)).fit(X[g], Y[g])
        refs = [ref[-1], *_mode_curves(X[g], Y[g], per_target)]
        for k in range(5):
            _same_choice(refs, fit.alpha[g, k], k if per_target else None)
        np.testing.assert_allclose(pred[g], ref.predict(Xt[g]), rtol=1e-7, atol=1e-8 * np.abs(Y[g]).max())


def test_exact_interpolation_small_alpha():
    """Noiseless, well-posed: the smallest alpha wins and the fit recovers the linear map."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1, 200, 5))
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    fit = ridge_cv(X, X @ w + 0.7, ALPHAS)
    assert fit.alpha[0, 0] == ALPHAS[0]
    Xt = rng.normal(size=(1, 10, 5))
    np.testing.assert_allclose(fit.predict(Xt)[0], Xt[0] @ w + 0.7, rtol=1e-5)
