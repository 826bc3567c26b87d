"""Tokens, token layout and attention masks (SPEC section 3): what the model sees, before any weight.

* **Tokens** (:func:`tokens`). ``pair`` format: context token ``(x_k, y_k)`` for ``k < N-1`` and
  query token ``(x_k, 0)`` for every ``k``, all in ``R^{d+1}``; ``interleaved``:
  ``x_0, y_0, x_1, y_1, ...`` as in Garg et al. (2022).
* **Mask** (:func:`attention_mask`). ``prefix``: context tokens are causal among themselves, query
  ``k`` sees context ``< k`` (and itself under softmax, so no row is empty), so one pass predicts
  every context length ``0..N-1``. ``full``: every context token sees the whole context and one
  query (the last example) sees it too; the setting of the theory (E6c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig

CONTEXT, QUERY = 0, 1  # token types


@dataclass(frozen=True)
class TokenLayout:
    """Where things are in the token sequence for prompts of ``N`` examples."""

    n_examples: int
    token_type: torch.Tensor  # (T,) CONTEXT or QUERY
    position: torch.Tensor  # (T,) example index of each token
    query_index: torch.Tensor  # (Q,) token index of each prediction
    query_n: torch.Tensor  # (Q,) context length each prediction has
    context_index: torch.Tensor  # (C,) token index of context tokens (example k at position k)


def token_layout(cfg: ModelConfig, n_examples: int) -> TokenLayout:
    N = n_examples
    ar = torch.arange(N)
    if cfg.token_format == "interleaved":
        ttype = torch.tensor([QUERY, CONTEXT] * N)[: 2 * N - 1]
        pos = ar.repeat_interleave(2)[: 2 * N - 1]
        return TokenLayout(N, ttype, pos, 2 * ar, ar, 2 * ar[:-1] + 1)
    if cfg.mask == "full":
        ttype = torch.cat([torch.full((N - 1,), CONTEXT), torch.tensor([QUERY])])
        return TokenLayout(N, ttype, ar, torch.tensor([N - 1]), torch.tensor([N - 1]), ar[:-1])
    ttype = torch.cat([torch.full((N - 1,), CONTEXT), torch.full((N,), QUERY)])
    pos = torch.cat([ar[:-1], ar])
    return TokenLayout(N, ttype, pos, (N - 1) + ar, ar, ar[:-1])


def tokens(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token features ``(B, T, d+1)`` for prompts ``x (B, N, d)``, ``y (B, N)``."""
    B, N, d = x.shape
    zeros = torch.zeros_like(y)[..., None]
    with_y = torch.cat([x, y[..., None]], dim=-1)
    query = torch.cat([x, zeros], dim=-1)
    if cfg.token_format == "interleaved":
        y_tok = torch.cat([torch.zeros_like(x), y[..., None]], dim=-1)
        return torch.stack([query, y_tok], dim=2).reshape(B, 2 * N, d + 1)[:, : 2 * N - 1]
    if cfg.mask == "full":
        return torch.cat([with_y[:, :-1], query[:, -1:]], dim=1)
    return torch.cat([with_y[:, :-1], query], dim=1)


def attention_mask(cfg: ModelConfig, lay: TokenLayout) -> torch.Tensor:
    """Boolean ``(T, T)`` mask, ``True`` where a token may attend (row: query token, column: key)."""
    ttype, pos = lay.token_type, lay.position
    T = ttype.numel()
    if cfg.token_format == "interleaved":
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if cfg.attention == "linear":
            mask.fill_diagonal_(False)
        return mask
    is_ctx_key = (ttype == CONTEXT)[None, :]
    row_is_ctx = (ttype == CONTEXT)[:, None]
    if cfg.mask == "full":
        sees_ctx = is_ctx_key.expand(T, T)
    else:
        sees_ctx = is_ctx_key & torch.where(row_is_ctx, pos[None, :] <= pos[:, None], pos[None, :] < pos[:, None])
    mask = sees_ctx.clone()
    if cfg.attention == "softmax":
        mask |= torch.eye(T, dtype=torch.bool) & ~row_is_ctx
    return mask
