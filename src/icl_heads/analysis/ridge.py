"""Batched ridge probes: ``StandardScaler`` + ``RidgeCV`` for many independent problems at once.

Every probe and decoder in E3, E4 and E6 is scikit-learn's ``make_pipeline(StandardScaler(),
RidgeCV(alphas))``: standardised features, an unpenalised intercept and the ridge penalty chosen by
efficient leave-one-out (generalised) cross-validation. E3/E4 fit one such probe per (layer, context
length): dozens of small problems, where scikit-learn's per-alpha Python loop and its
``O(P D^2)``-per-alpha hat-diagonal dominate the whole analysis. :func:`ridge_cv` solves a stack of
``G`` problems with one batched eigendecomposition each and every alpha in a few matrix products;
``tests/test_ridge.py`` checks it against the scikit-learn pipeline (chosen alphas equal,
predictions to float rounding).

The algebra (as scikit-learn's ``gcv_mode="eigen"``): with ``Xs`` the standardised, centred features,
``Xs' Xs = V diag(s) V'`` and ``Z = Xs V``, the ridge fit at ``alpha`` is ``Z (Z'y / (s + alpha))``
and its hat diagonal is ``1/P + sum_j Z_ij^2 / (s_j + alpha)`` (the ``1/P`` is the intercept); the
leave-one-out residual is ``r_i / (1 - H_ii)``. The alpha with the smallest mean squared LOO
residual wins, the first on ties, per target column as ``alpha_per_target=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RidgeFit:
    """Fitted probes for ``G`` problems: ``predict`` maps features ``(G, P', D)`` to ``(G, P'[, K])``."""

    mean: np.ndarray  # (G, D) feature means (StandardScaler)
    scale: np.ndarray  # (G, D) feature scales (1 for constant features)
    coef: np.ndarray  # (G, D, K) on the standardised features
    intercept: np.ndarray  # (G, K)
    alpha: np.ndarray  # (G, K) chosen penalty
    squeeze: bool  # the targets were (G, P): predictions come back (G, P')

    def predict(self, X: np.ndarray) -> np.ndarray:
        Xs = (np.asarray(X, dtype=np.float64) - self.mean[:, None, :]) / self.scale[:, None, :]
        out = Xs @ self.coef + self.intercept[:, None, :]
        return out[..., 0] if self.squeeze else out


_LOO_ELEMS = 1 << 22  # leave-one-out residuals held at once (32 MB of float64)


def _scale(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean and scale (population std; near-constant features get scale 1)."""
    P = X.shape[1]
    mean = X.mean(axis=1)
    var = X.var(axis=1)
    eps = np.finfo(np.float64).eps
    constant = var <= P * eps * var + (P * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant | (scale < 10 * eps)] = 1.0
    return mean, scale


def ridge_cv(X: np.ndarray, Y: np.ndarray, alphas: np.ndarray, alpha_per_target: bool = True) -> RidgeFit:
    """Fit ``G`` standardise + RidgeCV probes: ``X (G, P, D)``, ``Y (G, P)`` or ``(G, P, K)``.

    ``alpha_per_target=False`` chooses one alpha per problem from the LOO error averaged over its
    ``K`` targets (scikit-learn's default for a multi-output ``RidgeCV``).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    squeeze = Y.ndim == 2
    Y = Y[..., None] if squeeze else Y
    G, P, D = X.shape
    alphas = np.asarray(alphas, dtype=np.float64)
    mean, scale = _scale(X)
    Xs = (X - mean[:, None, :]) / scale[:, None, :]
    Xc = Xs - Xs.mean(axis=1, keepdims=True)  # RidgeCV centres again (rounding only)
    y_mean = Y.mean(axis=1)  # (G, K)
    Yc = Y - y_mean[:, None, :]
    s, V = np.linalg.eigh(np.swapaxes(Xc, 1, 2) @ Xc)  # (G, D), (G, D, D)
    s = np.clip(s, 0.0, None)
    Z = Xc @ V  # (G, P, D)
    Zy = np.swapaxes(Z, 1, 2) @ Yc  # (G, D, K)
    w = 1.0 / (s[:, None, :] + alphas[None, :, None])  # (G, A, D)
    hat = 1.0 / P + (Z * Z) @ np.swapaxes(w, 1, 2)  # (G, P, A)
    K = Y.shape[2]
    best_mse = np.full((G, K), np.inf)
    best = np.zeros((G, K), dtype=int)
    per = max(1, _LOO_ELEMS // (G * P * K))  # alphas per block: (G, P, per, K) stays bounded for large P
    for a0 in range(0, len(alphas), per):
        sl = slice(a0, min(len(alphas), a0 + per))
        coef = np.swapaxes(w[:, sl], 1, 2)[..., None] * Zy[:, :, None, :]  # (G, D, a, K)
        fit = (Z @ coef.reshape(G, D, -1)).reshape(G, P, -1, K)  # every alpha of the block in one product
        loo = (Yc[:, :, None, :] - fit) / (1.0 - hat[:, :, sl, None])
        mse = (loo * loo).mean(axis=1)  # (G, a, K)
        if not alpha_per_target:
            mse = np.broadcast_to(mse.mean(axis=2, keepdims=True), mse.shape)
        for j in range(mse.shape[1]):
            better = mse[:, j] < best_mse  # strict: the first alpha wins ties, as scikit-learn
            best_mse = np.where(better, mse[:, j], best_mse)
            best = np.where(better, a0 + j, best)
    wb = np.take_along_axis(w, best[:, :, None].repeat(D, axis=2), axis=1)  # (G, K, D)
    coef = V @ (np.swapaxes(wb, 1, 2) * Zy)  # (G, D, K)
    intercept = y_mean - np.einsum("gd,gdk->gk", Xs.mean(axis=1), coef)
    return RidgeFit(mean, scale, coef, intercept, alphas[best], squeeze)
