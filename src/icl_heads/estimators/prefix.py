"""Shared machinery of the estimators: input checks, prefix statistics, memory-bounded prompt
blocks, and closed-form GD in the eigenbasis (:class:`Spectrum`, used by GD, PtO and ridge).

All prefixes share cumulative Gram matrices ``G_k = X_k^T X_k`` and ``b_k = X_k^T y_k``.
GD on a quadratic from 0 has a closed form in the eigenbasis of its Hessian ``H = V diag(l) V^T``:
``<w_T, q> = sum_j (V^T g)_j (V^T q)_j (1 - (1 - eta l_j)^T) / l_j``, so one batched ``eigh`` per
prefix gives GD/PtO for every step size and every T at O(d) cost each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import ConfigError

Tensor = torch.Tensor

STEP_RULES = ("fixed", "scale_free", "normalized")
GUARDS = ("off", "reject", "clip")
STABLE_LIMIT = 2.0  # GD from 0 on a quadratic converges iff step * lambda_max < 2 (else |1 - step * lambda| > 1)
GUARD_C = 1.9  # "clip": an unstable step becomes GUARD_C / lambda_max (the largest scale-free c of the grid)
RECURSE_STEPS = 8  # Spectrum.gd: up to this many steps by the recurrence, beyond by the closed form
_ELEMS_BUDGET = 2**23  # float64 elements per (B, N, d, d)-sized block (64 MB): bounds memory for large presets


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

    def step_size(self, rule: str, eta: float, guard: str = "off") -> Tensor:
        """Per-problem step: ``eta`` (fixed/normalized) or ``eta / lambda_max`` (scale_free; 0 where H = 0).

        ``guard`` handles problems where the step is unstable (``step * lambda_max >= 2``, so GD
        diverges as T grows): ``"off"`` keeps it, ``"reject"`` makes it NaN (so the prediction and any
        risk averaged over it are NaN: tuning then rejects the setting), ``"clip"`` lowers it to
        ``GUARD_C / lambda_max`` (a safe prediction).
        """
        lm = self.lam_max
        if rule == "scale_free":
            step = torch.where(lm > 0, eta / lm.clamp(min=1e-300), torch.zeros_like(lm))
        else:
            step = torch.full_like(lm, float(eta))
        if guard == "off":
            return step
        unstable = step * lm >= STABLE_LIMIT
        safe = torch.full_like(step, math.nan) if guard == "reject" else GUARD_C / lm.clamp(min=1e-300)
        return torch.where(unstable, safe, step)

    def gd(self, eta: Tensor, steps: Sequence[int]) -> Tensor:
        """``(len(steps), ...)`` predictions ``<v_t, z>`` after t GD steps of size ``eta`` from v = 0."""
        x = eta[..., None] * self.lam  # eta * lambda_j
        if max(steps, default=0) <= RECURSE_STEPS:
            return self._gd_few(x, eta, steps)
        return self._gd_closed(x, eta, steps)

    def _gd_closed(self, x: Tensor, eta: Tensor, steps: Sequence[int]) -> Tensor:
        """:meth:`gd` by the closed form ``psi_t(x) = (1 - (1 - x)^t) / x`` (any number of steps)."""
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

    def _gd_few(self, x: Tensor, eta: Tensor, steps: Sequence[int]) -> Tensor:
        """:meth:`gd` for few steps by ``psi_{t+1} = 1 + (1 - x) psi_t``, ``psi_0 = 0`` (``psi_t = sum_{k<t} (1-x)^k``).

        Why: E6 asks for t <= L - 1 steps at ~70 step sizes; the closed form's log1p/expm1 and its
        guards cost ten element-wise passes per t, the recurrence two, and it needs no case for x = 0
        (psi_t = t) or x >= 1. Equal to the closed form up to rounding (tests/test_estimators.py).
        """
        one_minus, ones = 1 - x, torch.ones_like(x)
        psi, at = torch.zeros_like(x), {}
        for t in range(max(steps, default=0) + 1):
            if t:
                psi = torch.addcmul(ones, one_minus, psi)
            if t in steps:
                at[t] = (self.coef * psi).sum(-1) * eta
        return torch.stack([at[t] for t in steps])

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


def _check_rule(step: str, allowed: Sequence[str], guard: str = "off") -> None:
    if step not in allowed:
        raise ConfigError(f"step: must be one of {', '.join(allowed)} (got {step!r})")
    if guard not in GUARDS:
        raise ConfigError(f"guard: must be one of {', '.join(GUARDS)} (got {guard!r})")
