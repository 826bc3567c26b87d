"""E6c: a linear-attention transformer whose weights are set by hand to run PtO (SPEC section 5).

The construction is an ordinary :class:`icl_heads.model.Transformer` with
``ModelConfig(attention="linear", mlp=False, layer_norm=False, pos_emb=False,
mask="full")``: every context token and the single query token see the whole
context (``n = N - 1`` examples), and linear attention averages ``(q . k) v`` over
them. Nothing in ``icl_heads.model`` is special-cased; only the weights are chosen.

Residual stream (width ``D = h * d_head``), one slot per quantity:

* ``x`` (``d`` dims) and ``y`` (1 dim), copied in by the read-in;
* ``f`` (``h`` dims): the preprocessed features, written by layer 1;
* ``p`` (1 dim): the current GD prediction ``<v_t, z_i>`` of every token.

**Layer 1** has ``h`` heads; head ``k`` owns the coordinate group ``G_k`` and has
``q_i = k_i = x_{i, G_k}`` and ``v_m = y_m``, so it writes
``(1/n) sum_m (x_{i,G_k} . x_{m,G_k}) y_m = sum_{j in G_k} r_j x_ij = f_k(x_i)`` with
``r = (1/n) sum_m y_m x_m``. With ``h = d`` the groups are single coordinates,
each head is rank one and ``f(x_i) = diag(r) x_i``: PtO's preprocessing.

**Layer l >= 2** uses one head (the others have zero weights and gate 0) with
``q_i = k_i = z_i = [a x_i, f(x_i)]`` and ``v_m = eta_l (y_m - p_m)``, writing into
``p``. By induction ``p_i = <v_t, z_i>`` for the GD iterate
``v_{t+1} = v_t + (eta/n) sum_m (y_m - <v_t, z_m>) z_m`` from ``v_0 = 0``, for
context and query tokens alike (the query is never a key, so its zero label is
never read). The read-out returns ``p`` at the query: PtO with ``T = L - 1`` steps
of the fixed step size ``eta`` (``a = 0``, ``h = d``), or its ``h``-group variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
from ..estimators import group_slices as coordinate_groups  # the grouping contract of pto_groups
from ..model import Transformer


@dataclass(frozen=True)
class Slots:
    """Where each quantity lives in the constructed model's residual stream."""

    d: int
    h: int

    @property
    def x(self) -> list[int]:
        return list(range(self.d))

    @property
    def y(self) -> int:
        return self.d

    @property
    def f(self) -> list[int]:
        return list(range(self.d + 1, self.d + 1 + self.h))

    @property
    def p(self) -> int:
        return self.d + 1 + self.h


def pto_transformer(d: int, n_steps: int, eta: float | Sequence[float], groups: int | None = None,
                    a: float = 0.0, n_max: int = 64, mask: str = "full", gd_heads: int = 1) -> Transformer:
    """A float64 :class:`Transformer` with ``n_steps + 1`` layers computing (grouped) PtO.

    ``eta`` is one fixed step size or one per step; ``groups`` is the number of
    layer-1 heads ``h`` (default ``d``: plain PtO); ``a`` weights the raw ``x`` in
    the GD features ``[a x, f(x)]`` (SPEC's grouped PtO; ``a = 0`` for PtO).
    ``n_max`` only fills the config field (there is no positional embedding, so
    any prompt length works). ``mask="prefix"`` puts the same weights under the all-prefixes
    mask of trained models (each token then averages over the examples it sees, so it is
    PtO-like rather than exact PtO), which lets E2/E3 analyse it as they analyse trained models.
    ``gd_heads`` splits every GD step's kernel ``z_i . z_m`` over that many heads (contiguous groups of
    the GD features, :func:`_gd_layer`): the same function, but no single later head suffices -- the
    competent negative control of claim 2a (pruning the later layers to their top head must lose).
    """
    h = d if groups is None else groups
    if d < 1:
        raise ConfigError(f"d: must be >= 1 (got {d})")
    if not 1 <= h <= d:
        raise ConfigError(f"groups: must be in 1..d={d} (got {h})")
    if n_steps < 0:
        raise ConfigError(f"n_steps: must be >= 0 (got {n_steps})")
    m = h + (d if a != 0 else 0)  # GD feature width
    if not 1 <= gd_heads <= min(h, m):
        raise ConfigError(f"gd_heads: must be in 1..{min(h, m)} (got {gd_heads})")
    if a < 0 or not math.isfinite(a):
        raise ConfigError(f"a: must be a finite number >= 0 (got {a})")
    etas = [float(eta)] * n_steps if np.isscalar(eta) else [float(e) for e in eta]
    if len(etas) != n_steps:
        raise ConfigError(f"eta: need one step size per step, {n_steps} (got {len(etas)})")
    if not all(math.isfinite(e) for e in etas):
        raise ConfigError(f"eta: step sizes must be finite (got {etas})")

    slots = Slots(d, h)
    d_head = max(m, max(len(g) for g in coordinate_groups(d, h)), math.ceil((slots.p + 1) / h))
    cfg = ModelConfig(n_dims=d, n_max=n_max, d_model=h * d_head, n_layers=n_steps + 1, n_heads=h,
                      attention="linear", mlp=False, pos_emb=False, layer_norm=False, mask=mask)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        W_in = model.read_in.weight  # (D, d+1)
        for j in slots.x:
            W_in[j, j] = 1.0
        W_in[slots.y, d] = 1.0
        model.read_out.weight[0, slots.p] = 1.0
        _preprocess_layer(model.blocks[0].attn, slots, d_head)
        for l, e in enumerate(etas, start=1):
            _gd_layer(model.blocks[l].attn, slots, e, a, gd_heads, d_head)
    gates = torch.zeros(cfg.n_layers, h)
    gates[0] = 1.0
    gates[1:, :gd_heads] = 1.0
    return model.pruned(gates)  # its own head mask: the preprocessing heads of layer 0, gd_heads per later layer


def _qkv(attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = attn.proj.weight.shape[0]
    W = attn.qkv.weight
    return W[:D], W[D:2 * D], W[2 * D:]


def _preprocess_layer(attn: torch.nn.Module, slots: Slots, d_head: int) -> None:
    """Head ``k``: ``q = k = x_{G_k}``, ``v = y``, output into ``f_k``."""
    Wq, Wk, Wv = _qkv(attn)
    for k, group in enumerate(coordinate_groups(slots.d, slots.h)):
        base = k * d_head
        for c, j in enumerate(group):
            Wq[base + c, slots.x[j]] = 1.0
            Wk[base + c, slots.x[j]] = 1.0
        Wv[base, slots.y] = 1.0
        attn.proj.weight[slots.f[k], base] = 1.0


def _gd_layer(attn: torch.nn.Module, slots: Slots, eta: float, a: float, heads: int = 1, d_head: int = 0) -> None:
    """One GD step on ``z = [a x, f]``: ``q = k = z``, ``v = eta (y - p)``, output added to ``p``.

    With ``heads = 1`` head 0 carries the whole kernel; otherwise head ``k`` (at ``k * d_head``) carries
    the kernel of the ``k``-th contiguous group of ``z``'s coordinates, and the heads' outputs sum to
    the same step (the kernel is a sum over coordinates).
    """
    Wq, Wk, Wv = _qkv(attn)
    z = [(j, a) for j in slots.x] if a != 0 else []
    z += [(fk, 1.0) for fk in slots.f]
    for k, group in enumerate(coordinate_groups(len(z), heads)):
        base = k * d_head
        for c, i in enumerate(group):
            j, weight = z[int(i)]
            Wq[base + c, j] = weight
            Wk[base + c, j] = weight
        Wv[base, slots.y] = eta
        Wv[base, slots.p] = -eta
        attn.proj.weight[slots.p, base] = 1.0



def spread_gd_transformer(d: int, n_steps: int, eta: float, heads: int, n_max: int = 64,
                          mask: str = "full", b: float = 1.0) -> Transformer:
    """The negative control of claims 1b and 2a: one effective head in layer 1, ``heads`` in each later layer.

    Layer 1 has one working head (``q = k = x``, ``v = y``), which writes the single feature
    ``f(x_i) = <r, x_i>``; its other heads have zero weights and gate 0. Every later layer runs one
    GD step on ``z = [x, f]`` with the kernel ``z_i . z_m`` split over ``heads`` heads by contiguous
    coordinate groups of ``z``, so each head carries part of the step and no single head suffices.
    ``b`` weights ``f`` in the kernel (``z = [x, b f]``). With ``b = 1`` the whole model is grouped
    PtO with one group and ``a = 1`` (``estimators.pto_groups``).
    """
    if not 1 <= heads <= d + 1:
        raise ConfigError(f"heads: must be in 1..d+1={d + 1} (got {heads})")
    if n_steps < 1:
        raise ConfigError(f"n_steps: must be >= 1 (got {n_steps})")
    slots = Slots(d, 1)
    z = slots.x + slots.f
    groups = [[z[int(j)] for j in g] for g in coordinate_groups(len(z), heads)]
    d_head = max(d, max(len(g) for g in groups), math.ceil((slots.p + 1) / heads))
    cfg = ModelConfig(n_dims=d, n_max=n_max, d_model=heads * d_head, n_layers=n_steps + 1, n_heads=heads,
                      attention="linear", mlp=False, pos_emb=False, layer_norm=False, mask=mask)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for j in slots.x:
            model.read_in.weight[j, j] = 1.0
        model.read_in.weight[slots.y, d] = 1.0
        model.read_out.weight[0, slots.p] = 1.0
        _preprocess_layer(model.blocks[0].attn, slots, d_head)  # one group: head 0 computes <r, x>
        for l in range(1, n_steps + 1):
            Wq, Wk, Wv = _qkv(model.blocks[l].attn)
            for k, g in enumerate(groups):
                base = k * d_head
                for c, j in enumerate(g):
                    Wq[base + c, j] = Wk[base + c, j] = b if j in slots.f else 1.0
                Wv[base, slots.y], Wv[base, slots.p] = eta, -eta
                model.blocks[l].attn.proj.weight[slots.p, base] = 1.0
    gates = torch.ones_like(model.head_gates)
    gates[0, 1:] = 0.0
    return model.pruned(gates)  # layer 0 computes <r, x> with head 0 alone

