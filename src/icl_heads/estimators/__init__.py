"""Classical in-context estimators for sparse linear regression, batched over prompts AND prefixes.

Every estimator maps ``x (B, N, d)``, ``y (B, N)`` to predictions ``(B, N)``: column ``k``
predicts ``y_k`` (i.e. ``<w*, x_k>``) from examples ``0..k-1`` only, so column 0 is context
length 0 (the same contract as the transformer, see :mod:`icl_heads.tasks`). Inputs may be
torch tensors or numpy arrays; work is done in float64 and float64 tensors are returned.

Plain functions (``from icl_heads.estimators import pto, gd, ...``)::

    zero(x, y)                                   -> 0 everywhere
    ols(x, y)                                    minimum-norm least squares (pinv of X_k)
    ridge(x, y, lam)                             argmin ||y - Xw||^2 + lam ||w||^2  (= sklearn Ridge(alpha=lam))
    lasso(x, y, alpha)                           argmin (1/2k)||y - Xw||^2 + alpha ||w||_1  (= sklearn Lasso(alpha))
    gd(x, y, T, eta, step="fixed", steps=None)   T GD steps from w=0 on (1/2k) sum (<w,x_i> - y_i)^2
    pto(x, y, T, eta, gamma=1, step="scale_free", steps=None)
                                                 preprocess-then-optimise (SPEC section 4)
    pto_groups(x, y, h, a, T, eta, step="scale_free", steps=None)
                                                 PtO with h contiguous coordinate groups, GD on [a x, f(x)]
    oracle_ls(x, y, support)                     least squares on the true support (support: (B, d) bool)
    bayes(x, y, s, sigma, tau=1)                 exact posterior mean under the task prior

Step rules of ``gd``/``pto``/``pto_groups`` (``eta`` is the step size, or ``c`` for scale_free):

* ``"fixed"``: step ``eta`` (what a linear-attention layer computes);
* ``"scale_free"``: step ``c / lambda_max`` of the (preprocessed) empirical covariance, ``c`` in (0, 2);
* ``"normalized"`` (``pto`` only): preprocess with ``(|r| / max_j |r_j|)^gamma`` and use step ``eta``.

``steps=[t0, t1, ...]`` returns a ``(len(steps), B, N)`` tensor with the predictions after each of
those numbers of steps, from one run (``T`` is then ignored).

How: all prefixes share cumulative Gram matrices ``G_k = X_k^T X_k`` and ``b_k = X_k^T y_k``.
GD on a quadratic from 0 has a closed form in the eigenbasis of its Hessian ``H = V diag(l) V^T``:
``<w_T, q> = sum_j (V^T g)_j (V^T q)_j (1 - (1 - eta l_j)^T) / l_j``, so one batched ``eigh`` per
prefix gives GD/PtO for every step size and every T at O(d) cost each (exact GD, checked against
explicit iteration in the tests). Ridge reuses the same eigenbasis; OLS uses a batched pinv of
``X_k``; lasso runs batched coordinate descent on the Gram matrices to tight convergence; bayes
enumerates all ``C(d, s)`` supports with s x s Cholesky factors (determinant lemma + Woodbury).

The second half of the module tunes hyper-parameters per context length on validation prompts
(fixed grids below) and returns tidy risk rows on the test prompts: :func:`tuned_predictions`,
:func:`estimator_table` (reused by the heads sweep, E1) and :func:`tune_grid`.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import ConfigError, Preset, TaskConfig
from .metrics import curve_from_errors
from .tasks import Prompts, fixed_prompts

Tensor = torch.Tensor

STEP_RULES = ("fixed", "scale_free", "normalized")
_ELEMS_BUDGET = 2**23  # float64 elements per (B, N, d, d)-sized block (64 MB): bounds memory for large presets


# ----------------------------------------------------------------------------------------------
# Prefix statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class PrefixStats:
    """Sufficient statistics of every prefix: ``G[:, j] = X_k^T X_k``, ``b[:, j] = X_k^T y_k``, query ``x_k``.

    ``k[j]`` is the context length of column ``j`` (all columns, or a chosen subset ``cols``).
    """

    G: Tensor  # (B, K, d, d)
    b: Tensor  # (B, K, d)
    q: Tensor  # (B, K, d)
    k: Tensor  # (K,) float64 context lengths

    @staticmethod
    def of(x: Tensor, y: Tensor, cols: Sequence[int] | None = None) -> "PrefixStats":
        B, N, d = x.shape
        G = torch.einsum("bni,bnj->bnij", x, x).cumsum(1)
        b = (x * y[..., None]).cumsum(1)
        # exclusive prefix sums: column k sums examples 0..k-1
        G = torch.cat([torch.zeros_like(G[:, :1]), G[:, :-1]], 1)
        b = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], 1)
        idx = torch.arange(N) if cols is None else torch.as_tensor(list(cols), dtype=torch.long)
        return PrefixStats(G[:, idx], b[:, idx], x[:, idx], idx.to(x.dtype).to(x.device))

    def mean_hessian(self) -> tuple[Tensor, Tensor]:
        """``H = G/k`` and ``g = b/k`` (zero at k = 0): the Hessian and minus the gradient at 0 of the (1/2k) loss."""
        inv = torch.where(self.k > 0, 1.0 / self.k.clamp(min=1), torch.zeros_like(self.k))
        return self.G * inv[:, None, None], self.b * inv[:, None]


def _as64(t: Any) -> Tensor:
    t = torch.as_tensor(t)
    return t.to(torch.float64) if t.is_floating_point() else t


def _check_xy(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    x, y = _as64(x), _as64(y)
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ConfigError(f"x, y: expected x (B, N, d) and y (B, N) (got {tuple(x.shape)} and {tuple(y.shape)})")
    return x, y


def _prompt_chunks(B: int, N: int, m: int) -> list[slice]:
    """Prompt blocks whose (B_c, N, m, m) tensors stay under the memory budget (vectorised within a block)."""
    per = max(1, _ELEMS_BUDGET // max(1, N * m * m))
    return [slice(i, min(B, i + per)) for i in range(0, B, per)]


def _by_chunks(fn: Callable[..., Tensor], x: Tensor, y: Tensor, *extra: Tensor | None, m: int | None = None) -> Tensor:
    """Apply ``fn(x_c, y_c, *extra_c)`` to prompt blocks and concatenate along the prompt axis."""
    B, N, d = x.shape
    outs = []
    for sl in _prompt_chunks(B, N, m or d):
        outs.append(fn(x[sl], y[sl], *(None if e is None else e[sl] for e in extra)))
    return torch.cat(outs, dim=-2)


# ----------------------------------------------------------------------------------------------
# Closed-form GD in the eigenbasis
# ----------------------------------------------------------------------------------------------


@dataclass
class Spectrum:
    """Eigen-decomposition of a batch of quadratics ``(1/2) v^T H v - g^T v`` with query ``z``.

    ``lam`` (P, m) eigenvalues of H, ``coef`` (P, m) = ``(V^T g) * (V^T z)``; the prediction of
    any method that is a spectral filter of H (GD, ridge) is ``sum_j coef_j * filter(lam_j)``.
    """

    lam: Tensor
    coef: Tensor

    @staticmethod
    def of(H: Tensor, g: Tensor, z: Tensor) -> "Spectrum":
        lam, V = torch.linalg.eigh(H)
        gv = torch.einsum("...ij,...i->...j", V, g)
        zv = torch.einsum("...ij,...i->...j", V, z)
        return Spectrum(lam, gv * zv)

    @property
    def lam_max(self) -> Tensor:
        return self.lam[..., -1]

    def step_size(self, rule: str, eta: float) -> Tensor:
        """Per-problem step: ``eta`` (fixed/normalized) or ``eta / lambda_max`` (scale_free; 0 where H = 0)."""
        if rule == "scale_free":
            lm = self.lam_max
            return torch.where(lm > 0, eta / lm.clamp(min=1e-300), torch.zeros_like(lm))
        return torch.full_like(self.lam_max, float(eta))

    def gd(self, eta: Tensor, steps: Sequence[int]) -> Tensor:
        """``(len(steps), ...)`` predictions ``<v_t, z>`` after t GD steps of size ``eta`` from v = 0."""
        x = eta[..., None] * self.lam  # eta * lambda_j
        lt1 = x < 1
        safe = torch.where(x == 0, torch.ones_like(x), x)
        log_q = torch.log1p(-torch.where(lt1, x, torch.zeros_like(x)))  # log(1 - x), accurate for small x
        out = []
        for t in steps:
            # psi_t(x) = (1 - (1 - x)^t) / x, psi_t(0) = t; expm1/log1p keep it accurate for tiny eta*lambda
            psi = torch.where(lt1, -torch.expm1(t * log_q), 1 - (1 - x) ** t) / safe
            psi = torch.where(x == 0, torch.full_like(x, float(t)), psi)
            out.append((self.coef * psi).sum(-1) * eta)
        return torch.stack(out)

    def ridge(self, lam: float) -> Tensor:
        return (self.coef / (self.lam + lam)).sum(-1)


def _steps_arg(T: int | Sequence[int], steps: Sequence[int] | None) -> tuple[list[int], bool]:
    """Normalise ``T``/``steps`` to a list of step counts and whether to return a stacked tensor."""
    if steps is not None:
        out, stacked = [int(t) for t in steps], True
    elif isinstance(T, (int, np.integer)):
        out, stacked = [int(T)], False
    else:
        out, stacked = [int(t) for t in T], True
    if any(t < 0 for t in out):
        raise ConfigError(f"T: number of GD steps must be >= 0 (got {out})")
    return out, stacked


def _check_rule(step: str, allowed: Sequence[str]) -> None:
    if step not in allowed:
        raise ConfigError(f"step: must be one of {', '.join(allowed)} (got {step!r})")


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------


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


def _lasso_polish(H: Tensor, g: Tensor, alpha: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Exact lasso solution on the support and signs of ``w``, and whether it satisfies the KKT conditions.

    On the active set A with signs s: ``w_A = H_AA^{-1} (g_A - alpha s_A)``, zero elsewhere. If
    ``sign(w_A) = s`` and ``|g_j - (H w)_j| <= alpha`` off A, it is a minimiser (KKT suffices for a
    convex problem), so coordinate descent only has to find the support, not converge digit by digit.
    """
    act = w != 0
    sgn = torch.sign(w)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    both = act[..., :, None] & act[..., None, :]
    M = torch.where(both, H, eye)
    rhs = torch.where(act, g - alpha[:, None] * sgn, torch.zeros_like(g))
    sol, info = torch.linalg.solve_ex(M, rhs)
    sol = torch.where(act, sol, torch.zeros_like(sol))
    ok = (info == 0) & torch.where(act, sol * sgn > 0, True).all(-1) & _lasso_kkt(H, g, alpha[:, None], sol[:, None])[:, 0]
    # a (numerically) singular H_AA can fake KKT with a huge solution: it must also not be worse than the iterate
    ok &= _lasso_objective(H, g, alpha, sol) <= _lasso_objective(H, g, alpha, w) + 1e-10
    return sol, ok


def _lasso_objective(H: Tensor, g: Tensor, alpha: Tensor, w: Tensor) -> Tensor:
    return 0.5 * torch.einsum("pi,pij,pj->p", w, H, w) - (g * w).sum(-1) + alpha * w.abs().sum(-1)


def _lasso_cd(H: Tensor, g: Tensor, alpha: Tensor, tol: float, max_sweeps: int,
              w0: Tensor | None = None) -> tuple[Tensor, int]:
    """Batched lasso ``min (1/2) w^T H w - g^T w + alpha ||w||_1``; H (P,d,d), g (P,d), alpha (P,).

    Coordinate descent keeps ``c = g - H w`` up to date (O(d) per coordinate). Every few sweeps each
    problem's current support and signs are polished to the exact solution (:func:`_lasso_polish`);
    problems whose polished solution passes the KKT check, or whose CD iterates stopped moving
    (no coordinate moved by more than ``tol * max(1, max|w|)`` in a sweep), leave the working set.
    Returns the solutions and the number of problems that hit ``max_sweeps`` without either.
    """
    P, d = g.shape
    w = torch.zeros_like(g) if w0 is None else w0.clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    inv_diag = torch.where(diag > 0, 1.0 / diag.clamp(min=1e-300), torch.zeros_like(diag))
    active = torch.arange(P, device=g.device)
    Ha, ga, da, ia, aa, wa = H, g, diag, inv_diag, alpha, w.clone()
    ca = g - torch.einsum("pij,pj->pi", H, wa)
    sweep, block = 0, 5
    while sweep < max_sweeps:
        moved = torch.zeros(len(active), dtype=g.dtype, device=g.device)
        for _ in range(min(block, max_sweeps - sweep)):
            moved.zero_()
            for j in range(d):
                z = ca[:, j] + da[:, j] * wa[:, j]
                new = torch.sign(z) * (z.abs() - aa).clamp(min=0) * ia[:, j]
                delta = new - wa[:, j]
                ca -= delta[:, None] * Ha[:, :, j]
                wa[:, j] = new
                moved = torch.maximum(moved, delta.abs())
            sweep += 1
        sol, ok = _lasso_polish(Ha, ga, aa, wa)
        stalled = moved <= tol * wa.abs().amax(1).clamp(min=1.0)
        w[active[ok]] = sol[ok]
        w[active[stalled & ~ok]] = wa[stalled & ~ok]
        keep = ~(ok | stalled)
        active, Ha, ga, da, ia, aa, wa, ca = (t[keep] for t in (active, Ha, ga, da, ia, aa, wa, ca))
        if len(active) == 0:
            return w, 0
        block = min(2 * block, 200)
    w[active] = wa
    return w, len(active)


def _lasso_kkt(H: Tensor, g: Tensor, alpha: Tensor, w: Tensor) -> Tensor:
    """Whether ``w`` satisfies the lasso optimality conditions (to a relative 1e-8), elementwise over (P, A)."""
    c = g[:, None] - torch.einsum("pij,paj->pai", H, w)
    a = alpha[..., None]
    slack = 1e-8 * (a + g.abs().amax(-1)[:, None, None]) + 1e-12
    ok = torch.where(w != 0, (c - a * torch.sign(w)).abs() <= slack, c.abs() <= a + slack)
    return ok.all(-1) & torch.isfinite(w).all(-1)


def _lasso_homotopy(H: Tensor, g: Tensor, alphas: Tensor, max_steps: int) -> tuple[Tensor, Tensor]:
    """Exact lasso solutions at every penalty of ``alphas`` (P, A) by the homotopy (LARS-lasso) path.

    Between events the solution is linear in alpha: on the active set A with signs s,
    ``w_A(alpha) = H_AA^{-1} g_A - alpha H_AA^{-1} s_A``. Starting from ``alpha_max = max|g|``, each
    step moves alpha down to the next event (an inactive ``|c_j|`` reaching alpha: join; an active
    coefficient reaching 0: leave), batched over all problems with identity-padded solves. One path
    gives every grid penalty, so tuning costs one run. Returns w (P, A, d) and which (P, A) were reached.
    """
    P, d = g.shape
    dev, dt = g.device, g.dtype
    W = torch.zeros(P, alphas.shape[1], d, dtype=dt, device=dev)
    a_cur, j0 = g.abs().max(-1)
    reached = alphas >= a_cur[:, None]  # above alpha_max the solution is 0
    idx = torch.nonzero(~reached.all(-1)).flatten()  # problems still on the path
    rows = torch.arange(len(idx), device=dev)
    Ha, ga, al, a_cur, j0 = H[idx], g[idx], alphas[idx], a_cur[idx], j0[idx]
    act = torch.zeros(len(idx), d, dtype=torch.bool, device=dev)
    sgn = torch.zeros(len(idx), d, dtype=dt, device=dev)
    act[rows, j0] = True
    sgn[rows, j0] = torch.sign(ga[rows, j0])
    neg_inf = torch.tensor(-math.inf, dtype=dt, device=dev)
    for _ in range(max_steps):
        if len(idx) == 0:
            break
        u, v, info = _active_solve(Ha, ga, sgn, act)
        p = ga - torch.einsum("pij,pj->pi", Ha, u)  # c(alpha) = p + alpha * q
        q = torch.einsum("pij,pj->pi", Ha, v)
        lim = (a_cur * (1 - 1e-10))[:, None]
        up = p / (1 - q)  # c_j = +alpha
        dn = -p / (1 + q)  # c_j = -alpha
        up = torch.where(~act & (up > 0) & (up < lim), up, neg_inf)
        dn = torch.where(~act & (dn > 0) & (dn < lim), dn, neg_inf)
        jb, jj = torch.maximum(up, dn).max(-1)
        lv = torch.where(act & (v != 0), u / torch.where(v != 0, v, 1.0), neg_inf)
        lv = torch.where((lv > 0) & (lv < lim), lv, neg_inf)
        lb, lj = lv.max(-1)
        a_next = torch.maximum(torch.maximum(jb, lb), torch.zeros_like(jb))
        ok = info == 0
        seg = ok[:, None] & (al <= a_cur[:, None]) & (al >= a_next[:, None])
        hit = seg.any(-1)  # only the few problems whose grid penalties lie on this segment are written
        if bool(hit.any()):
            ih = idx[hit]
            W[ih] = torch.where(seg[hit][..., None], u[hit][:, None, :] - al[hit][..., None] * v[hit][:, None, :], W[ih])
            reached[ih] |= seg[hit]
        is_join = (jb >= lb) & (jb > 0)
        is_leave = (lb > jb) & (lb > 0)
        act[rows[is_join], jj[is_join]] = True
        sgn[rows[is_join], jj[is_join]] = torch.where(up[rows, jj] >= dn[rows, jj], 1.0, -1.0).to(dt)[is_join]
        act[rows[is_leave], lj[is_leave]] = False
        sgn[rows[is_leave], lj[is_leave]] = 0.0
        a_cur = a_next
        keep = ok & (a_next > al.min(-1).values) & ~reached[idx].all(-1)
        if not bool(keep.all()):
            idx, Ha, ga, al, a_cur, act, sgn = (t[keep] for t in (idx, Ha, ga, al, a_cur, act, sgn))
            rows = torch.arange(len(idx), device=dev)
    return W, reached


def _active_solve(H: Tensor, g: Tensor, sgn: Tensor, act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``u = H_AA^{-1} g_A`` and ``v = H_AA^{-1} s_A`` (zero off A) for every problem, batched.

    The active coordinates are gathered to the front and the systems solved at the largest active
    size ``k`` in the batch (identity-padded below it), not at ``d``: on the lasso path most active
    sets are small, and the batched solve is the homotopy's main cost.
    """
    k = max(int(act.sum(-1).max()), 1)
    order = torch.argsort((~act).to(torch.int8), dim=-1, stable=True)[:, :k]  # active indices first
    sel = torch.gather(act, 1, order)
    d = H.shape[-1]
    Hk = H.gather(1, order[:, :, None].expand(-1, -1, d)).gather(2, order[:, None, :].expand(-1, k, -1))
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    M = torch.where(sel[:, :, None] & sel[:, None, :], Hk, eye)
    rhs = torch.stack([g.gather(1, order), sgn.gather(1, order)], -1) * sel[..., None]
    sol, info = torch.linalg.solve_ex(M, rhs)
    sol = sol * sel[..., None]
    zeros = torch.zeros_like(g)
    return zeros.scatter(1, order, sol[..., 0]), zeros.scatter(1, order, sol[..., 1]), info


def _lasso_solve(H: Tensor, g: Tensor, alphas: Tensor, tol: float, max_sweeps: int) -> Tensor:
    """Lasso solutions (P, A, d): homotopy, then coordinate descent for any (problem, alpha) failing KKT."""
    d = g.shape[-1]
    W, reached = _lasso_homotopy(H, g, alphas, max_steps=8 * d + 40)
    bad = ~(reached & _lasso_kkt(H, g, alphas, W))
    if bool(bad.any()):
        pi, ai = torch.nonzero(bad, as_tuple=True)
        w0 = torch.where(torch.isfinite(W[pi, ai]), W[pi, ai], 0.0)
        w, failed = _lasso_cd(H[pi], g[pi], alphas[pi, ai], tol, max_sweeps, w0=w0)
        W[pi, ai] = w
        if failed:
            warnings.warn(f"lasso: {failed} of {alphas.numel()} problems did not converge in {max_sweeps} sweeps",
                          RuntimeWarning)
    return W


def _lasso_block(x: Tensor, y: Tensor, alphas: Tensor, tol: float, max_sweeps: int) -> Tensor:
    """``alphas`` (A, N): one penalty per (grid entry, column) -> predictions (A, B, N)."""
    st = PrefixStats.of(x, y)
    H, g = st.mean_hessian()
    B, N, d = st.b.shape
    al = alphas.T[None].expand(B, N, -1).reshape(B * N, -1).to(g)
    W = _lasso_solve(H.reshape(B * N, d, d), g.reshape(B * N, d), al, tol, max_sweeps)
    return torch.einsum("pad,pd->ap", W, st.q.reshape(B * N, d)).reshape(-1, B, N)


def lasso(x: Any, y: Any, alpha: float | Any, *, tol: float = 1e-10, max_sweeps: int = 20000) -> Tensor:
    """Lasso ``argmin (1/2k)||y_k - X_k w||^2 + alpha ||w||_1`` per prefix (scikit-learn ``Lasso`` scaling).

    ``alpha`` is a float or a length-N sequence (one penalty per context length).
    """
    x, y = _check_xy(x, y)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    a = a.expand(x.shape[1]) if a.numel() == 1 else a
    if a.numel() != x.shape[1] or not bool((a > 0).all()):
        raise ConfigError(f"alpha: must be > 0, a float or one per column (got {alpha})")
    return _by_chunks(lambda u, v: _lasso_block(u, v, a[None], tol, max_sweeps), x, y)[0]


def _gd_block(x: Tensor, y: Tensor, rule: str, etas: Sequence[float], steps: Sequence[int],
              cols: Sequence[int] | None = None) -> Tensor:
    st = PrefixStats.of(x, y, cols)
    H, g = st.mean_hessian()
    sp = Spectrum.of(H, g, st.q)
    return torch.stack([sp.gd(sp.step_size(rule, e), steps) for e in etas])  # (E, S, B, N)


def gd(x: Any, y: Any, T: int | Sequence[int] = 100, eta: float = 0.1, *, step: str = "fixed",
       steps: Sequence[int] | None = None) -> Tensor:
    """Gradient descent from w = 0 on ``(1/2k) sum_i (<w, x_i> - y_i)^2``; predicts ``<w_T, x_k>``.

    ``step="fixed"``: step ``eta``; ``"scale_free"``: step ``eta / lambda_max(X_k^T X_k / k)``.
    """
    x, y = _check_xy(x, y)
    _check_rule(step, ("fixed", "scale_free"))
    ts, stacked = _steps_arg(T, steps)
    out = _by_chunks(lambda a, b: _gd_block(a, b, step, [eta], ts)[0], x, y)
    return out if stacked else out[0]


def _pto_problem(st: PrefixStats, gamma: float, normalized: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Hessian, gradient and query of the preprocessed problem ``xt = diag(|r|^gamma) x``, ``r = b/k``."""
    H, g = st.mean_hessian()
    r = g.abs()  # |r| = |(1/k) sum y_i x_i|
    if normalized:
        m = r.amax(-1, keepdim=True)
        r = torch.where(m > 0, r / m.clamp(min=1e-300), torch.zeros_like(r))
    D = r**gamma if gamma != 1 else r
    D = torch.where(r > 0, D, torch.zeros_like(D))  # 0 ** gamma -> 0 also for gamma <= 0
    return D[..., :, None] * H * D[..., None, :], D * g, D * st.q


def _pto_block(x: Tensor, y: Tensor, rule: str, etas: Sequence[float], steps: Sequence[int], gamma: float,
               cols: Sequence[int] | None = None) -> Tensor:
    st = PrefixStats.of(x, y, cols)
    sp = Spectrum.of(*_pto_problem(st, gamma, rule == "normalized"))
    return torch.stack([sp.gd(sp.step_size(rule, e), steps) for e in etas])


def pto(x: Any, y: Any, T: int | Sequence[int] = 100, eta: float = 1.0, *, gamma: float = 1.0,
        step: str = "scale_free", steps: Sequence[int] | None = None) -> Tensor:
    """Preprocess-then-optimise (SPEC section 4).

    ``r = (1/k) sum_i y_i x_i``; ``xt_i = diag(|r|^gamma) x_i`` (also the query); T GD steps from 0 on
    ``(1/2k) sum_i (<v, xt_i> - y_i)^2``; predict ``<v_T, xt_k>``. ``eta`` is ``c`` for
    ``step="scale_free"`` (step ``c / lambda_max`` of ``(1/k) sum xt xt^T``), the step size otherwise;
    ``"normalized"`` divides ``|r|`` by ``max_j |r_j|`` first. Equals GD preconditioned by ``diag(|r|^{2 gamma})``.
    """
    x, y = _check_xy(x, y)
    _check_rule(step, STEP_RULES)
    ts, stacked = _steps_arg(T, steps)
    out = _by_chunks(lambda a, b: _pto_block(a, b, step, [eta], ts, gamma)[0], x, y)
    return out if stacked else out[0]


def group_slices(d: int, h: int) -> list[np.ndarray]:
    """The h contiguous coordinate groups (sizes differ by at most one), as in ``numpy.array_split``."""
    if not 1 <= h <= d:
        raise ConfigError(f"h: number of groups must be in 1..d={d} (got {h})")
    return np.array_split(np.arange(d), h)


def _groups_problem(st: PrefixStats, h: int, a: float) -> tuple[Tensor, Tensor, Tensor]:
    """Features ``phi(x) = [a x, f(x)]``, ``f_k(x) = sum_{j in G_k} r_j x_j``: ``phi = M^T x`` with M (d, d+h)."""
    H, g = st.mean_hessian()
    d = g.shape[-1]
    member = torch.zeros(d, h, dtype=g.dtype, device=g.device)
    for k, idx in enumerate(group_slices(d, h)):
        member[torch.as_tensor(idx), k] = 1.0
    M = g[..., :, None] * member  # (B, K, d, h): R[j, group(j)] = r_j
    if a > 0:
        eye = a * torch.eye(d, dtype=g.dtype, device=g.device).expand(*g.shape[:-1], d, d)
        M = torch.cat([eye, M], -1)
    Mt = M.transpose(-1, -2)
    return Mt @ H @ M, (Mt @ g[..., None])[..., 0], (Mt @ st.q[..., None])[..., 0]


def _groups_block(x: Tensor, y: Tensor, h: int, a: float, rule: str, etas: Sequence[float], steps: Sequence[int],
                  cols: Sequence[int] | None = None) -> Tensor:
    st = PrefixStats.of(x, y, cols)
    sp = Spectrum.of(*_groups_problem(st, h, a))
    return torch.stack([sp.gd(sp.step_size(rule, e), steps) for e in etas])


def pto_groups(x: Any, y: Any, h: int, a: float = 0.0, T: int | Sequence[int] = 100, eta: float = 1.0, *,
               step: str = "scale_free", steps: Sequence[int] | None = None) -> Tensor:
    """PtO with ``h`` groups: GD from 0 on the features ``[a x, f(x)]`` (SPEC section 4, our extension).

    ``h = d, a = 0`` is PtO with gamma = 1; ``h = 1, a = 0`` predicts ``c <r, x_q>`` (one GD step,
    its step size set by the GD on the scalar feature).
    """
    x, y = _check_xy(x, y)
    _check_rule(step, ("fixed", "scale_free"))
    if a < 0:
        raise ConfigError(f"a: weight of the raw features must be >= 0 (got {a})")
    group_slices(x.shape[2], h)
    ts, stacked = _steps_arg(T, steps)
    m = x.shape[2] + h
    out = _by_chunks(lambda u, v: _groups_block(u, v, h, a, step, [eta], ts)[0], x, y, m=m)
    return out if stacked else out[0]


# ----------------------------------------------------------------------------------------------
# Bayes: exact posterior mean by enumerating the supports
# ----------------------------------------------------------------------------------------------

BAYES_MIN_SIGMA = 1e-3  # relative to tau: the sigma used inside the formula when the task is noiseless


def _bayes_block(x: Tensor, y: Tensor, s: int, sigma: float, tau: float, supports: Tensor, chunk: int) -> Tensor:
    st = PrefixStats.of(x, y)
    B, K, d = st.b.shape
    P = B * K
    rho = sigma**2 / tau**2
    # (feature, problem) layout: gathering the entries of a support is then a contiguous row copy
    Gt = st.G.reshape(P, d * d).T.contiguous()
    bt = st.b.reshape(P, d).T.contiguous()
    qt = st.q.reshape(P, d).T.contiguous()
    pairs = [(i, j) for i in range(s) for j in range(i + 1)]  # lower triangle, i >= j
    pos = {p: n for n, p in enumerate(pairs)}
    m = torch.full((P,), -math.inf, dtype=x.dtype, device=x.device)
    ssum = torch.zeros(P, dtype=x.dtype, device=x.device)
    psum = torch.zeros(P, dtype=x.dtype, device=x.device)
    for c0 in range(0, len(supports), chunk):
        S = supports[c0:c0 + chunk]  # (C, s)
        C = len(S)
        flat = torch.stack([S[:, i] * d + S[:, j] for i, j in pairs], 0)  # (npairs, C)
        A = Gt[flat.reshape(-1)].reshape(len(pairs), C, P)
        bS = bt[S.T.reshape(-1)].reshape(s, C, P)
        qS = qt[S.T.reshape(-1)].reshape(s, C, P)
        # A_S = X_S^T X_S + rho I = L D L^T (unit lower L), unrolled over the s x s entries (s is small)
        L: dict[tuple[int, int], Tensor] = {}
        Dg: list[Tensor] = []
        for j in range(s):
            v = A[pos[(j, j)]] + rho
            for p in range(j):
                v = v - L[(j, p)] ** 2 * Dg[p]
            Dg.append(v)
            for i in range(j + 1, s):
                u = A[pos[(i, j)]]
                for p in range(j):
                    u = u - L[(i, p)] * L[(j, p)] * Dg[p]
                L[(i, j)] = u / v
        zb, zq = [], []  # L^{-1} b_S and L^{-1} q_S
        for i in range(s):
            ub, uq = bS[i], qS[i]
            for p in range(i):
                ub = ub - L[(i, p)] * zb[p]
                uq = uq - L[(i, p)] * zq[p]
            zb.append(ub)
            zq.append(uq)
        quad = sum(zb[i] * zb[i] / Dg[i] for i in range(s))  # b_S^T A_S^{-1} b_S
        pred = sum(zb[i] * zq[i] / Dg[i] for i in range(s))  # q_S^T A_S^{-1} b_S
        logdet = math.prod(Dg).log() if s <= 4 else sum(t.log() for t in Dg)
        # log N(y; 0, tau^2 X_S X_S^T + sigma^2 I) up to terms equal for every support of size s
        logw = quad / (2 * sigma**2) - 0.5 * logdet
        m_new = torch.maximum(m, logw.amax(0))
        e = torch.exp(logw - m_new)
        scale = torch.exp(m - m_new)
        ssum = ssum * scale + e.sum(0)
        psum = psum * scale + (e * pred).sum(0)
        m = m_new
    return (psum / ssum).reshape(B, K)


def bayes(x: Any, y: Any, s: int, sigma: float, tau: float = 1.0, *, chunk_elems: int = 2**16,
          prefixes: int = 2048) -> Tensor:
    """Posterior mean of ``<w*, x_k>`` under the task prior (uniform size-s support, N(0, tau^2) values).

    ``p(S | data) ∝ N(y; 0, tau^2 X_S X_S^T + sigma^2 I)``; the per-support mean is
    ``(X_S^T X_S + (sigma/tau)^2 I)^{-1} X_S^T y``. Only s x s quantities are formed per support
    (matrix determinant lemma and Woodbury); prompts are processed in blocks of about ``prefixes``
    prefixes and supports in chunks of about ``chunk_elems`` (prefix, support) pairs, with a running
    log-sum-exp over the chunks. ``sigma = 0`` uses
    ``BAYES_MIN_SIGMA * tau`` inside the formula.
    """
    x, y = _check_xy(x, y)
    d = x.shape[2]
    if not 1 <= s <= d:
        raise ConfigError(f"s: support size must be in 1..d={d} (got {s})")
    if sigma < 0 or tau <= 0:
        raise ConfigError(f"sigma, tau: need sigma >= 0 and tau > 0 (got sigma={sigma}, tau={tau})")
    sig = max(float(sigma), BAYES_MIN_SIGMA * tau)
    supports = torch.tensor(list(itertools.combinations(range(d), s)), dtype=torch.long, device=x.device)

    B, N, _ = x.shape
    # small (prefix x support) tiles stay in cache: measured ~2x faster than large ones on a 2-core CPU
    per = max(1, min(B, prefixes // N))
    outs = []
    for i in range(0, B, per):
        chunk = max(1, chunk_elems // (min(per, B - i) * N))
        outs.append(_bayes_block(x[i:i + per], y[i:i + per], s, sig, tau, supports, chunk))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# Hyper-parameter grids and tuning
# ----------------------------------------------------------------------------------------------

RIDGE_LAMBDAS = [float(10.0**e) for e in np.arange(-4, 3.01, 0.5)]
LASSO_ALPHAS = [float(10.0**e) for e in np.arange(-4, 0.51, 0.25)]
GD_ETAS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
SCALE_FREE_CS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 1.9]
PTO_FIXED_ETAS = [float(10.0**e) for e in np.arange(-3, 1.01, 0.25)]
GROUP_AS = [0.0, 0.03, 0.1, 0.3, 1.0]

Combo = dict[str, Any]


class Family:
    """An estimator with a hyper-parameter grid. ``predict(x, y, w, combos)`` -> (len(combos), B, N)."""

    name: str = ""
    description: str = ""

    def __init__(self, task: TaskConfig, T_grid: Sequence[int]) -> None:
        self.task = task
        self.T_grid = [int(t) for t in T_grid]

    def grid(self) -> list[Combo]:
        return [{}]

    def predict(self, x: Tensor, y: Tensor, w: Tensor, combos: Sequence[Combo]) -> Tensor:
        raise NotImplementedError

    def predict_columns(self, x: Tensor, y: Tensor, w: Tensor, per_col: Sequence[Combo]) -> Tensor:
        """Predictions (B, N) where column k uses hyper-parameters ``per_col[k]``."""
        keys = [json.dumps(c, sort_keys=True) for c in per_col]
        uniq = list(dict.fromkeys(keys))
        preds = self.predict(x, y, w, [json.loads(u) for u in uniq])
        idx = torch.tensor([uniq.index(k) for k in keys])
        return preds[idx, :, torch.arange(len(keys))].T


class _Zero(Family):
    name, description = "zero", "predicts 0"

    def predict(self, x, y, w, combos):
        return torch.zeros(len(combos), *y.shape, dtype=y.dtype)


class _OLS(Family):
    name, description = "ols", "minimum-norm least squares"

    def predict(self, x, y, w, combos):
        return _pinv_predict(x, y)[None].expand(len(combos), -1, -1)


class _Oracle(Family):
    name, description = "oracle_ls", "least squares on the true support (oracle)"

    def predict(self, x, y, w, combos):
        return oracle_ls(x, y, w)[None].expand(len(combos), -1, -1)


class _Bayes(Family):
    name, description = "bayes", "exact posterior mean (Bayes-optimal floor)"

    def predict(self, x, y, w, combos):
        t = self.task
        return bayes(x, y, t.s, t.sigma, t.tau)[None].expand(len(combos), -1, -1)


class _Ridge(Family):
    name, description = "ridge", "ridge, lambda tuned per n"

    def grid(self):
        return [{"lambda": l} for l in RIDGE_LAMBDAS]

    def predict(self, x, y, w, combos):
        return _by_chunks(lambda a, b: _ridge_block(a, b, [c["lambda"] for c in combos]), x, y)


class _Lasso(Family):
    name, description = "lasso", "lasso (sklearn scaling), alpha tuned per n"

    def grid(self):
        return [{"alpha": a} for a in LASSO_ALPHAS]

    def predict(self, x, y, w, combos):
        al = torch.tensor([c["alpha"] for c in combos], dtype=torch.float64)[:, None].expand(-1, y.shape[1])
        return _by_chunks(lambda a, b: _lasso_block(a, b, al, 1e-10, 20000), x, y)

    def predict_columns(self, x, y, w, per_col):
        al = torch.tensor([c["alpha"] for c in per_col], dtype=torch.float64)[None]
        return _by_chunks(lambda a, b: _lasso_block(a, b, al, 1e-10, 20000), x, y)[0]


class _GDLike(Family):
    """Shared grid logic: combos are (step rule, eta or c, T); one eigh serves the whole grid."""

    rules: dict[str, Sequence[float]] = {}

    def grid(self):
        out = []
        for rule, etas in self.rules.items():
            key = "c" if rule == "scale_free" else "eta"
            out += [{"step": rule, key: e, "T": t} for e in etas for t in self.T_grid]
        return out

    def block(self, x: Tensor, y: Tensor, rule: str, etas: list[float], steps: list[int],
              cols: Sequence[int] | None) -> Tensor:
        raise NotImplementedError

    def predict(self, x, y, w, combos, cols: Sequence[int] | None = None):
        """(len(combos), B, K) predictions; ``cols`` restricts to those context lengths (K of them)."""
        K = y.shape[1] if cols is None else len(cols)
        out = torch.empty(len(combos), y.shape[0], K, dtype=y.dtype)
        for rule in dict.fromkeys(c["step"] for c in combos):
            sel = [i for i, c in enumerate(combos) if c["step"] == rule]
            etas = list(dict.fromkeys(combos[i].get("c", combos[i].get("eta")) for i in sel))
            steps = list(dict.fromkeys(combos[i]["T"] for i in sel))
            p = _by_chunks(lambda a, b: self.block(a, b, rule, etas, steps, cols), x, y, m=self.width(x.shape[2]))
            for i in sel:
                c = combos[i]
                out[i] = p[etas.index(c.get("c", c.get("eta"))), steps.index(c["T"])]
        return out

    def width(self, d: int) -> int:
        return d


class _GD(_GDLike):
    name, description = "gd", "GD from 0, best of fixed/scale-free step and T per n"
    rules = {"fixed": GD_ETAS, "scale_free": SCALE_FREE_CS}

    def block(self, x, y, rule, etas, steps, cols):
        return _gd_block(x, y, rule, etas, steps, cols)


class _PtO(_GDLike):
    name, description = "pto", "PtO, scale-free step, c and T tuned per n"
    rules = {"scale_free": SCALE_FREE_CS}
    gamma = 1.0

    def block(self, x, y, rule, etas, steps, cols):
        return _pto_block(x, y, rule, etas, steps, self.gamma, cols)


class _PtONormalized(_PtO):
    name, description = "pto_normalized", "PtO, r/max|r| preprocessing, fixed eta"
    rules = {"normalized": GD_ETAS}


class _PtOFixed(_PtO):
    name, description = "pto_fixed", "PtO, raw |r| preprocessing, fixed eta (linear-attention form)"
    rules = {"fixed": PTO_FIXED_ETAS}


class PtOGroups(_GDLike):
    """PtO with ``h`` groups (a, c, T tuned); not in the default table, used by E5's groups sweep."""

    rules = {"scale_free": SCALE_FREE_CS}

    def __init__(self, task: TaskConfig, T_grid: Sequence[int], h: int) -> None:
        super().__init__(task, T_grid)
        self.h = h
        self.name = f"pto_groups_h{h}"
        self.description = f"PtO with {h} groups"

    def grid(self):
        base = super().grid()
        return [dict(c, a=a) for a in GROUP_AS for c in base]

    def predict(self, x, y, w, combos, cols=None):
        K = y.shape[1] if cols is None else len(cols)
        out = torch.empty(len(combos), y.shape[0], K, dtype=y.dtype)
        for a in dict.fromkeys(c["a"] for c in combos):
            sel = [i for i, c in enumerate(combos) if c["a"] == a]
            self._a = a
            out[sel] = super().predict(x, y, w, [{k: v for k, v in combos[i].items() if k != "a"} for i in sel], cols)
        return out

    def block(self, x, y, rule, etas, steps, cols):
        return _groups_block(x, y, self.h, self._a, rule, etas, steps, cols)

    def width(self, d):
        return d + self.h


FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (_Zero, _OLS, _Ridge, _Lasso, _GD, _PtO, _PtONormalized, _PtOFixed, _Oracle, _Bayes)
}
ESTIMATOR_NAMES = tuple(FAMILIES)


def resolve_names(names: Sequence[str] | None) -> list[str]:
    """Validate estimator names (default: all), keeping the canonical order."""
    if names is None:
        return list(ESTIMATOR_NAMES)
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in FAMILIES:
            raise ConfigError(f"estimator: unknown {n!r} (choose from {', '.join(ESTIMATOR_NAMES)})")
    if not names:
        raise ConfigError("estimator: empty list of estimators")
    return [n for n in ESTIMATOR_NAMES if n in names]


def make_family(name: str, preset: Preset) -> Family:
    resolve_names([name])
    return FAMILIES[name](preset.task, preset.eval.pto_steps)


def val_risk(family: Family, val: Prompts, combos: Sequence[Combo], cols: Sequence[int] | None = None) -> Tensor:
    """Validation excess risk (len(combos), K); non-finite (diverged) entries become +inf.

    ``cols`` (GD-like families only) restricts the work to those context lengths.
    """
    if cols is None:
        pred, f = family.predict(val.x, val.y, val.w, combos), val.f
    else:
        pred, f = family.predict(val.x, val.y, val.w, combos, cols), val.f[:, list(cols)]
    risk = ((pred - f[None]) ** 2).mean(1)
    return torch.where(torch.isfinite(risk), risk, torch.full_like(risk, math.inf))


def choose(combos: Sequence[Combo], risk: Tensor, allowed: Sequence[bool] | None = None) -> list[Combo]:
    """Per column of ``risk`` (len(combos), K), the allowed combo with the lowest risk (first one on ties)."""
    if allowed is not None:
        mask = torch.as_tensor(list(allowed), dtype=torch.bool)
        risk = torch.where(mask[:, None], risk, torch.full_like(risk, math.inf))
    return [combos[int(i)] for i in risk.argmin(0)]


def tune_grid(family: Family, val: Prompts, combos: Sequence[Combo] | None = None) -> list[Combo]:
    """Per context length, the combo with the lowest validation risk (first one on ties)."""
    combos = family.grid() if combos is None else list(combos)
    return choose(combos, val_risk(family, val, combos))


@dataclass
class Tuned:
    """Test predictions (B, N) of one tuned estimator and the hyper-parameters chosen per column."""

    name: str
    pred: Tensor
    hparams: list[Combo]


def eval_prompts(preset: Preset) -> tuple[Prompts, Prompts]:
    """Validation and test prompts: ``fixed_prompts(task, n_val, seed, "val")`` and ``(…, n_test, seed, "test")``."""
    t, e = preset.task, preset.eval
    return fixed_prompts(t, e.n_val, preset.seed, "val"), fixed_prompts(t, e.n_test, preset.seed, "test")


def tuned_predictions(preset: Preset, names: Sequence[str] | None = None,
                      prompts: tuple[Prompts, Prompts] | None = None) -> dict[str, Tuned]:
    """Tune every named estimator per n on the validation prompts; predict the test prompts."""
    names = resolve_names(names)
    val, test = eval_prompts(preset) if prompts is None else prompts
    out = {}
    for n in names:
        fam = make_family(n, preset)
        hp = tune_grid(fam, val) if len(fam.grid()) > 1 else [{}] * test.y.shape[1]
        out[n] = Tuned(n, fam.predict_columns(test.x, test.y, test.w, hp), hp)
    return out


def risk_rows(tuned: Tuned, f: Tensor, task: TaskConfig, n_min: int = 1, **labels: Any) -> list[dict[str, Any]]:
    """Tidy rows ``estimator, n, risk, risk_norm, ci_low, ci_high, hparams`` for n >= n_min."""
    err = ((tuned.pred - f) ** 2).numpy()
    rows = curve_from_errors(err, task).rows(estimator=tuned.name, **labels)
    for r in rows:
        r["hparams"] = json.dumps(tuned.hparams[r["n"]], sort_keys=True)
    return [r for r in rows if r["n"] >= n_min]


def estimator_table(preset: Preset, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every tuned estimator on the preset's test prompts (the prompts E1 evaluates models on)."""
    prompts = eval_prompts(preset)
    rows: list[dict[str, Any]] = []
    for t in tuned_predictions(preset, names, prompts).values():
        rows += risk_rows(t, prompts[1].f, preset.task)
    return rows
