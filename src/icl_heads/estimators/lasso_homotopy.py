"""Batched lasso per prompt and prefix: the homotopy (LARS-lasso) path, with a KKT check and a
coordinate-descent fallback. ``lasso(x, y, alpha)`` equals scikit-learn ``Lasso(alpha, fit_intercept=False)``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..config import ConfigError
from .prefix import PrefixStats, Tensor, _by_chunks, _check_xy


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
