"""Closed-form estimators: zero, minimum-norm least squares (ols), oracle least squares, ridge."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import ConfigError
from .prefix import PrefixStats, Spectrum, Tensor, _by_chunks, _check_xy


def zero(x: Any, y: Any) -> Tensor:
    """The zero predictor (normalised excess risk 1 by construction)."""
    x, y = _check_xy(x, y)
    return torch.zeros_like(y)


def _pinv_predict(x: Tensor, y: Tensor) -> Tensor:
    """Minimum-norm least squares per prefix: loop over k, batched pinv (SVD) over prompts."""
    B, N, d = x.shape
    out = torch.zeros_like(y)
    for k in range(1, N):
        w = torch.einsum("bdk,bk->bd", torch.linalg.pinv(x[:, :k]), y[:, :k])
        out[:, k] = torch.einsum("bd,bd->b", w, x[:, k])
    return out


def ols(x: Any, y: Any) -> Tensor:
    """Minimum-norm least squares ``pinv(X_k) y_k`` (interpolates when k < d)."""
    x, y = _check_xy(x, y)
    return _pinv_predict(x, y)


def oracle_ls(x: Any, y: Any, support: Any) -> Tensor:
    """Least squares on the true support (an oracle; min-norm when k < s). ``support``: (B, d) bool or w*."""
    x, y = _check_xy(x, y)
    mask = torch.as_tensor(support)
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ConfigError(f"support: expected shape {(x.shape[0], x.shape[2])} (got {tuple(mask.shape)})")
    mask = (mask != 0).to(x.dtype)
    # zero columns off the support get zero weight in the min-norm solution
    return _pinv_predict(x * mask[:, None, :], y)


def _ridge_block(x: Tensor, y: Tensor, lams: Sequence[float]) -> Tensor:
    st = PrefixStats.of(x, y)
    sp = Spectrum.of(st.G, st.b, st.q)
    return torch.stack([sp.ridge(float(l)) for l in lams])


def ridge(x: Any, y: Any, lam: float) -> Tensor:
    """Ridge ``(X_k^T X_k + lam I)^{-1} X_k^T y_k`` (scikit-learn ``Ridge(alpha=lam, fit_intercept=False)``)."""
    x, y = _check_xy(x, y)
    if not lam > 0:
        raise ConfigError(f"lam: ridge penalty must be > 0, use ols for 0 (got {lam})")
    return _by_chunks(lambda a, b: _ridge_block(a, b, [lam]), x, y)[0]
