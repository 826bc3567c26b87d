"""Gradient-descent estimators: GD, preprocess-then-optimise (PtO) and PtO with h coordinate groups,
with their step rules (fixed, scale-free ``c / lambda_max``, normalised), via :class:`.prefix.Spectrum`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError
from .prefix import STEP_RULES, PrefixStats, Spectrum, Tensor, _by_chunks, _check_rule, _check_xy, _steps_arg


def filters(sp: Spectrum, rule: str, etas: Sequence[float], steps: Sequence[int], guard: str = "off") -> Tensor:
    """``(E, S, B, N)`` GD predictions on one spectrum for every step size and step count."""
    return torch.stack([sp.gd(sp.step_size(rule, e, guard), steps) for e in etas])


def gd_spectrum(x: Tensor, y: Tensor, cols: Sequence[int] | None = None) -> Spectrum:
    st = PrefixStats.of(x, y, cols)
    H, g = st.mean_hessian()
    return Spectrum.of(H, g, st.q)


def _gd_block(x: Tensor, y: Tensor, rule: str, etas: Sequence[float], steps: Sequence[int],
              cols: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    return filters(gd_spectrum(x, y, cols), rule, etas, steps, guard)


def gd(x: Any, y: Any, T: int | Sequence[int] = 100, eta: float = 0.1, *, step: str = "fixed",
       steps: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    """Gradient descent from w = 0 on ``(1/2k) sum_i (<w, x_i> - y_i)^2``; predicts ``<w_T, x_k>``.

    ``step="fixed"``: step ``eta``; ``"scale_free"``: step ``eta / lambda_max(X_k^T X_k / k)``.
    ``guard`` (see :meth:`.prefix.Spectrum.step_size`): ``"off"`` lets an unstable fixed step diverge,
    ``"clip"`` caps it at ``GUARD_C / lambda_max`` per prefix, ``"reject"`` returns NaN there.
    """
    x, y = _check_xy(x, y)
    _check_rule(step, ("fixed", "scale_free"), guard)
    ts, stacked = _steps_arg(T, steps)
    out = _by_chunks(lambda a, b: _gd_block(a, b, step, [eta], ts, guard=guard)[0], x, y)
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


def pto_spectrum(x: Tensor, y: Tensor, gamma: float, normalized: bool, cols: Sequence[int] | None = None) -> Spectrum:
    return Spectrum.of(*_pto_problem(PrefixStats.of(x, y, cols), gamma, normalized))


def _pto_block(x: Tensor, y: Tensor, rule: str, etas: Sequence[float], steps: Sequence[int], gamma: float,
               cols: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    return filters(pto_spectrum(x, y, gamma, rule == "normalized", cols), rule, etas, steps, guard)


def pto(x: Any, y: Any, T: int | Sequence[int] = 100, eta: float = 1.0, *, gamma: float = 1.0,
        step: str = "scale_free", steps: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    """Preprocess-then-optimise (SPEC section 4).

    ``r = (1/k) sum_i y_i x_i``; ``xt_i = diag(|r|^gamma) x_i`` (also the query); T GD steps from 0 on
    ``(1/2k) sum_i (<v, xt_i> - y_i)^2``; predict ``<v_T, xt_k>``. ``eta`` is ``c`` for
    ``step="scale_free"`` (step ``c / lambda_max`` of ``(1/k) sum xt xt^T``), the step size otherwise;
    ``"normalized"`` divides ``|r|`` by ``max_j |r_j|`` first. Equals GD preconditioned by ``diag(|r|^{2 gamma})``.
    ``guard`` as in :func:`gd`.
    """
    x, y = _check_xy(x, y)
    _check_rule(step, STEP_RULES, guard)
    ts, stacked = _steps_arg(T, steps)
    out = _by_chunks(lambda a, b: _pto_block(a, b, step, [eta], ts, gamma, guard=guard)[0], x, y)
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


def groups_spectrum(x: Tensor, y: Tensor, h: int, a: float, cols: Sequence[int] | None = None) -> Spectrum:
    return Spectrum.of(*_groups_problem(PrefixStats.of(x, y, cols), h, a))


def _groups_block(x: Tensor, y: Tensor, h: int, a: float, rule: str, etas: Sequence[float], steps: Sequence[int],
                  cols: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    return filters(groups_spectrum(x, y, h, a, cols), rule, etas, steps, guard)


def pto_groups(x: Any, y: Any, h: int, a: float = 0.0, T: int | Sequence[int] = 100, eta: float = 1.0, *,
               step: str = "scale_free", steps: Sequence[int] | None = None, guard: str = "off") -> Tensor:
    """PtO with ``h`` groups: GD from 0 on the features ``[a x, f(x)]`` (SPEC section 4, our extension).

    ``h = d, a = 0`` is PtO with gamma = 1; ``h = 1, a = 0`` predicts ``c <r, x_q>`` (one GD step,
    its step size set by the GD on the scalar feature). ``guard`` as in :func:`gd`.
    """
    x, y = _check_xy(x, y)
    _check_rule(step, ("fixed", "scale_free"), guard)
    if a < 0:
        raise ConfigError(f"a: weight of the raw features must be >= 0 (got {a})")
    group_slices(x.shape[2], h)
    ts, stacked = _steps_arg(T, steps)
    m = x.shape[2] + h
    out = _by_chunks(lambda u, v: _groups_block(u, v, h, a, step, [eta], ts, guard=guard)[0], x, y, m=m)
    return out if stacked else out[0]
