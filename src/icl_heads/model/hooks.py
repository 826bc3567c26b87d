"""Named activation points and the explicit attention pattern (TransformerLens style).

Every cache key of :meth:`icl_heads.model.Transformer.run_with_cache` comes from :func:`act_name`;
no other module spells them out.
"""

from __future__ import annotations

import math

import torch

PATTERNS_KEY = "__patterns__"  # a cache holding this key (any non-None value) asks for attention patterns


def explicit_softmax_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights ``(B, h, T, T)`` as SDPA computes them (scale ``1/sqrt(d_head)``, masked
    keys get weight 0); used only when a pattern is asked for, SDPA otherwise."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def act_name(point: str, layer: int | None = None) -> str:
    """Name of an activation point in :meth:`Transformer.run_with_cache` (TransformerLens style).

    ``embed`` ``(B, T, D)`` and ``ln_final`` ``(B, Q, D)`` take no layer; per layer ``l``:
    ``head_out`` ``(B, T, h, d_head)`` (after gates and head values, what the output projection
    sees), ``pattern`` ``(B, h, T, T)`` (softmax attention only, on request), ``resid_mid`` and
    ``resid_post`` ``(B, T, D)``.
    """
    if point in ("embed", "ln_final"):
        if layer is not None:
            raise ValueError(f"act_name: {point} has no layer")
        return point
    if layer is None:
        raise ValueError(f"act_name: {point} needs a layer")
    if point in ("head_out", "pattern"):
        return f"blocks.{layer}.attn.{point}"
    if point in ("resid_mid", "resid_post"):
        return f"blocks.{layer}.{point}"
    raise ValueError(f"act_name: unknown activation point {point!r}")
