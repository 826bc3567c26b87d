"""The transformer: a GPT-2-style pre-LN decoder for in-context regression (SPEC section 3).

Read it top to bottom:

* **Tokens** (:func:`tokens_and_layout`). ``pair`` format: context token
  ``(x_k, y_k)`` for ``k < N-1`` and query token ``(x_k, 0)`` for every ``k``,
  all in ``R^{d+1}``; ``interleaved``: ``x_0, y_0, x_1, y_1, ...`` as in Garg et
  al. (2022).
* **Mask** (:func:`attention_mask`). ``prefix``: context tokens are causal among
  themselves, query ``k`` sees context ``< k`` (and itself under softmax, so no
  row is empty), so one pass predicts every context length ``0..N-1``.
  ``full``: every context token sees the whole context and one query (the last
  example) sees it too; the setting of the theory (E6c).
* **Head gates** (:attr:`Transformer.head_gates`, shape ``(L, h)``): a
  multiplicative gate on each head's output before the output projection. They
  default to 1 and are the only mechanism for masking and pruning. A forward
  pass may take its own gates of shape ``(L, h)`` or ``(B, L, h)``, so many
  ablations run as one batch.
* **Head values** (``head_values``, shape ``(L, T, h, d_head)`` or
  ``(B, L, T, h, d_head)``): what a gated-off head outputs instead, i.e. the
  head output becomes ``g * out + (1 - g) * value`` (:func:`gate_heads`). None
  means zero ablation (``g * out``); a mean or a donor prompt's output gives
  mean or resample ablation (``analysis.ablation``) with the same gates.
* **Cache** (:meth:`Transformer.run_with_cache`): named internals, e.g.
  ``blocks.0.attn.head_out`` ``(B, T, h, d_head)`` and ``blocks.0.resid_post``
  ``(B, T, D)``, in the spirit of TransformerLens, without editing the model; names come from
  :func:`act_name`, and ``patterns=True`` adds each layer's attention pattern
  ``blocks.{l}.attn.pattern`` ``(B, h, T, T)`` (explicit softmax path, only when asked).

Linear attention is ``(q . k) v`` summed over the visible keys and divided by
their number (an average, as in the GD-as-attention literature); a query never
attends to itself under linear attention, since there is no empty row to avoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

CONTEXT, QUERY = 0, 1  # token types


@dataclass(frozen=True)
class Layout:
    """Where things are in the token sequence for prompts of ``N`` examples."""

    n_examples: int
    token_type: torch.Tensor  # (T,) CONTEXT or QUERY
    position: torch.Tensor  # (T,) example index of each token
    query_index: torch.Tensor  # (Q,) token index of each prediction
    query_n: torch.Tensor  # (Q,) context length each prediction has
    context_index: torch.Tensor  # (C,) token index of context tokens (example k at position k)


def layout(cfg: ModelConfig, n_examples: int) -> Layout:
    N = n_examples
    ar = torch.arange(N)
    if cfg.token_format == "interleaved":
        ttype = torch.tensor([QUERY, CONTEXT] * N)[: 2 * N - 1]
        pos = ar.repeat_interleave(2)[: 2 * N - 1]
        return Layout(N, ttype, pos, 2 * ar, ar, 2 * ar[:-1] + 1)
    if cfg.mask == "full":
        ttype = torch.cat([torch.full((N - 1,), CONTEXT), torch.tensor([QUERY])])
        return Layout(N, ttype, ar, torch.tensor([N - 1]), torch.tensor([N - 1]), ar[:-1])
    ttype = torch.cat([torch.full((N - 1,), CONTEXT), torch.full((N,), QUERY)])
    pos = torch.cat([ar[:-1], ar])
    return Layout(N, ttype, pos, (N - 1) + ar, ar, ar[:-1])


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


def attention_mask(cfg: ModelConfig, lay: Layout) -> torch.Tensor:
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


def gate_heads(out: torch.Tensor, gates: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """Head outputs ``out (B, T, H, d_head)`` with gates ``(H,)`` or ``(B, H)`` applied:
    ``g * out + (1 - g) * values`` (``values`` broadcastable to ``out``; None = zeros)."""
    g = gates.view(-1, 1, out.shape[2], 1)
    gated = out * g
    return gated if values is None else gated + (1 - g) * values.to(out.dtype)


class Attention(nn.Module):
    """Multi-head attention with a per-head gate applied before the output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.linear = cfg.attention == "linear"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor | None,
                cache: dict[str, torch.Tensor] | None = None, name: str = "attn",
                values: torch.Tensor | None = None) -> torch.Tensor:
        return self.combine(self.heads(h, mask, cache, name), gates, cache, name, values)

    def heads(self, h: torch.Tensor, mask: torch.Tensor, cache: dict[str, torch.Tensor] | None = None,
              name: str = "attn") -> torch.Tensor:
        """Every head's output ``(B, T, H, d_head)`` before gates: the part of the layer that gate
        settings do not change, so E2 computes it once for all its settings of a layer."""
        B, T, D = h.shape
        q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in self.qkv(h).split(D, dim=-1))
        if self.linear:
            scores = (q @ k.transpose(-1, -2)) * mask
            out = scores @ v / mask.sum(-1, keepdim=True).clamp(min=1)
        elif cache is not None and cache.get(PATTERNS_KEY) is not None:  # explicit path: the pattern is asked for
            pattern = explicit_softmax_pattern(q, k, mask)
            cache[f"{name}.pattern"] = pattern  # (B, h, T, T): query row, key column
            out = pattern @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)  # (B, T, H, d_head)

    def combine(self, out: torch.Tensor, gates: torch.Tensor | None, cache: dict[str, torch.Tensor] | None = None,
                name: str = "attn", values: torch.Tensor | None = None) -> torch.Tensor:
        """Gates (and head values) on the head outputs ``(B, T, H, d_head)``, then the output projection."""
        B, T = out.shape[:2]
        if gates is not None:  # (H,) or (B, H)
            out = gate_heads(out, gates, values)
        if cache is not None:
            cache[f"{name}.head_out"] = out
        return self.proj(out.reshape(B, T, -1))

    def head_results(self, head_out: torch.Tensor) -> torch.Tensor:
        """Each head's additive contribution to the residual stream, ``(B, T, H, D)`` (bias excluded)."""
        W = self.proj.weight.view(-1, self.n_heads, self.d_head)  # (D, H, d_head)
        return torch.einsum("bthe,dhe->bthd", head_out, W)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln_1, self.attn = norm(), Attention(cfg)
        self.ln_2 = norm()
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model)) if cfg.mlp else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor | None,
                cache: dict[str, torch.Tensor] | None, name: str, values: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(h + self.attn(self.ln_1(h), mask, gates, cache, f"{name}.attn", values), cache, name)

    def finish(self, h: torch.Tensor, cache: dict[str, torch.Tensor] | None = None, name: str = "") -> torch.Tensor:
        """The rest of the block from the residual stream after attention (``resid_mid``)."""
        if cache is not None:
            cache[f"{name}.resid_mid"] = h
        if self.mlp is not None:
            h = h + self.mlp(self.ln_2(h))
        if cache is not None:
            cache[f"{name}.resid_post"] = h
        return h


class Transformer(nn.Module):
    """Read-in, ``L`` pre-LN blocks, final LN, scalar read-out at query tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.read_in = nn.Linear(cfg.n_dims + 1, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_max + 1, cfg.d_model) if cfg.pos_emb else None
        self.type_emb = nn.Embedding(2, cfg.d_model) if cfg.pos_emb else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.read_out = nn.Linear(cfg.d_model, 1)
        self.register_buffer("head_gates", torch.ones(cfg.n_layers, cfg.n_heads))
        self._layouts: dict[tuple[int, str], tuple[Layout, torch.Tensor]] = {}
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def layout(self, n_examples: int, device: torch.device | str = "cpu") -> tuple[Layout, torch.Tensor]:
        """Token layout and attention mask for ``n_examples``, cached per device."""
        key = (n_examples, str(device))
        if key not in self._layouts:
            lay = layout(self.cfg, n_examples)
            mask = attention_mask(self.cfg, lay).to(device)  # built on CPU (torch.eye there), then moved
            lay = Layout(n_examples, *(t.to(device) for t in (lay.token_type, lay.position, lay.query_index,
                                                                lay.query_n, lay.context_index)))
            self._layouts[key] = (lay, mask)
        return self._layouts[key]

    def forward(self, x: torch.Tensor, y: torch.Tensor, head_gates: torch.Tensor | None = None,
                head_values: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions ``(B, Q)``; with the prefix mask ``Q = N`` and column ``k`` is context length ``k``."""
        return self._run(x, y, head_gates, None, head_values)

    def run_with_cache(self, x: torch.Tensor, y: torch.Tensor, head_gates: torch.Tensor | None = None,
                       head_values: torch.Tensor | None = None, names: list[str] | None = None,
                       patterns: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Predictions and a dict of named activations (:func:`act_name`: ``embed``,
        ``blocks.{l}.attn.head_out``, ``blocks.{l}.resid_post``, ...).

        ``head_out`` is what the output projection sees, i.e. after gates and head values.
        ``patterns=True`` adds ``blocks.{l}.attn.pattern`` ``(B, h, T, T)`` (softmax attention; computed
        by the explicit path, equal to SDPA's to float rounding). ``names`` keeps only those entries.
        """
        cache: dict[str, Any] = {PATTERNS_KEY: True} if patterns else {}
        pred = self._run(x, y, head_gates, cache, head_values)
        cache.pop(PATTERNS_KEY, None)
        if names is not None:
            missing = [n for n in names if n not in cache]
            if missing:
                raise KeyError(f"run_with_cache: no activation {missing[0]!r} (have {', '.join(cache)})")
            cache = {n: cache[n] for n in names}
        return pred, cache

    def _run(self, x: torch.Tensor, y: torch.Tensor, head_gates: torch.Tensor | None,
             cache: dict[str, torch.Tensor] | None, head_values: torch.Tensor | None = None) -> torch.Tensor:
        lay, mask = self.layout(x.shape[1], x.device)
        dtype = self.read_in.weight.dtype  # prompts may come as float64 (fixed_prompts); the model decides
        h = self.read_in(tokens(self.cfg, x.to(dtype), y.to(dtype)))
        if self.pos_emb is not None:
            h = h + self.pos_emb(lay.position) + self.type_emb(lay.token_type)
        if cache is not None:
            cache["embed"] = h
        gates = self.head_gates if head_gates is None else head_gates.to(h.dtype)
        for l, block in enumerate(self.blocks):
            values = None if head_values is None else head_values[..., l, :, :, :]  # (T, h, dh) or (B, T, h, dh)
            h = block(h, mask, gates[..., l, :], cache, f"blocks.{l}", values)
        h = self.ln_f(h[:, lay.query_index])
        if cache is not None:
            cache["ln_final"] = h
        return self.read_out(h).squeeze(-1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
