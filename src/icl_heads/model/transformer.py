"""The transformer: a GPT-2-style pre-LN decoder for in-context regression (SPEC section 3).

Read it top to bottom (tokens and masks are in :mod:`icl_heads.model.tokens`, activation names
in :mod:`icl_heads.model.hooks`):

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .hooks import PATTERNS_KEY, act_name, explicit_softmax_pattern
from .tokens import TokenLayout, attention_mask, token_layout, tokens


def gate_heads(out: torch.Tensor, gates: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """Head outputs ``out (B, T, H, d_head)`` with gates ``(H,)`` or ``(B, H)`` applied:
    ``g * out + (1 - g) * values`` (``values`` broadcastable to ``out``; None = zeros)."""
    g = gates.view(-1, 1, out.shape[2], 1)
    gated = out * g
    return gated if values is None else gated + (1 - g) * values.to(out.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, linear: bool) -> torch.Tensor:
    """The attention core on ``(..., h, T, d_head)`` queries, keys and values with a ``(T, T)`` mask:
    linear attention averaged over the visible keys, or softmax through SDPA. The stacked model
    (:mod:`icl_heads.model.stacked`) calls this same function."""
    if linear:
        scores = (q @ k.transpose(-1, -2)) * mask
        return scores @ v / mask.sum(-1, keepdim=True).clamp(min=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
        if not self.linear and cache is not None and cache.get(PATTERNS_KEY) is not None:  # the pattern is asked for
            pattern = explicit_softmax_pattern(q, k, mask)
            cache[f"{name}.pattern"] = pattern  # (B, h, T, T): query row, key column
            out = pattern @ v
        else:
            out = attend(q, k, v, mask, self.linear)
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


class MLP(nn.Sequential):
    """``D -> 4D``, GELU, ``4D -> D``; addressed by name (:attr:`fc_in`, :attr:`act`, :attr:`fc_out`).

    A ``Sequential`` underneath so that checkpoints keep their parameter names
    (``mlp.0.*``, ``mlp.2.*``): the committed zoo and every earlier run load unchanged.
    """

    def __init__(self, d_model: int):
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    @property
    def fc_in(self) -> nn.Linear:
        return self[0]  # type: ignore[return-value]

    @property
    def act(self) -> nn.Module:
        return self[1]

    @property
    def fc_out(self) -> nn.Linear:
        return self[2]  # type: ignore[return-value]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln_1, self.attn = norm(), Attention(cfg)
        self.ln_2 = norm()
        self.mlp = MLP(cfg.d_model) if cfg.mlp else None

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
        self._layouts: dict[tuple[int, str], tuple[TokenLayout, torch.Tensor]] = {}
        self._intervention: _Intervention | None = None  # set inside ablated()
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth (named_parameters order)
            for out_proj in (block.attn.proj, None if block.mlp is None else block.mlp.fc_out):
                if out_proj is not None:
                    nn.init.normal_(out_proj.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def token_layout(self, n_examples: int, device: torch.device | str = "cpu") -> tuple[TokenLayout, torch.Tensor]:
        """Token layout and attention mask for ``n_examples``, cached per device."""
        key = (n_examples, str(device))
        if key not in self._layouts:
            lay = token_layout(self.cfg, n_examples)
            mask = attention_mask(self.cfg, lay).to(device)  # built on CPU (torch.eye there), then moved
            lay = TokenLayout(n_examples, *(t.to(device) for t in (lay.token_type, lay.position, lay.query_index,
                                                                lay.query_n, lay.context_index)))
            self._layouts[key] = (lay, mask)
        return self._layouts[key]

    def n_examples_of(self, n_tokens: int) -> int:
        """Examples per prompt in a sequence of ``n_tokens`` tokens (the inverse of the token layout)."""
        return n_tokens if self.cfg.mask == "full" and self.cfg.token_format != "interleaved" else (n_tokens + 1) // 2

    def forward(self, x: torch.Tensor, y: torch.Tensor, head_gates: torch.Tensor | None = None,
                head_values: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions ``(B, Q)``; with the prefix mask ``Q = N`` and column ``k`` is context length ``k``.

        Inside :meth:`ablated` the intervention applies (gates multiply, values come from it)."""
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
        return pred, _select(cache, names)

    def forward_from(self, resid: torch.Tensor, start_at_layer: int, head_gates: torch.Tensor | None = None,
                     head_values: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions from blocks ``start_at_layer .. L-1`` and the read-out, run on the residual stream
        ``resid`` ``(B, T, D)`` entering block ``start_at_layer`` (TransformerLens' ``start_at_layer``).

        ``resid`` is ``embed`` for 0, else ``blocks.{start_at_layer - 1}.resid_post``, so
        ``forward_from(cache[act_name("resid_post", l - 1)], l)`` equals the full pass. ``head_gates`` is
        ``(L, h)`` or ``(B, L, h)`` over *all* layers, as in :meth:`forward`; ``head_values`` may cover all
        ``L`` layers or only the ``L - start_at_layer`` layers run (``(..., L - start_at_layer, T, h, d_head)``).
        """
        return self._run_blocks(resid, start_at_layer, head_gates, None, head_values)

    def run_from_with_cache(self, resid: torch.Tensor, start_at_layer: int, head_gates: torch.Tensor | None = None,
                            head_values: torch.Tensor | None = None, names: list[str] | None = None,
                            patterns: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward_from` with the cache of the blocks run (as :meth:`run_with_cache`)."""
        cache: dict[str, Any] = {PATTERNS_KEY: True} if patterns else {}
        pred = self._run_blocks(resid, start_at_layer, head_gates, cache, head_values)
        return pred, _select(cache, names)

    @contextmanager
    def ablated(self, heads: Iterable[tuple[int, int]] | torch.Tensor, kind: str = "zero",
                reference: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> Iterator["Transformer"]:
        """Within the block, every pass of this model ablates ``heads``; the model itself is unchanged.

        ``heads``: ``(layer, head)`` pairs (0-based) or a boolean ``(L, h)`` mask of the heads to
        ablate. ``kind``: ``zero`` (gate 0, the paper's masking), ``mean`` (the head outputs its clean
        mean over ``reference`` prompts ``(x, y)``, per position) or ``resample`` (scored prompt ``i``
        gets the clean output of reference prompt ``perm[i mod R]``, ``perm`` a permutation drawn from
        ``seed``), as :mod:`icl_heads.analysis.ablation` defines them. Gates passed to a pass inside
        the block multiply the ablation's; passing ``head_values`` there is refused. One ablation at a time::

            with model.ablated([(0, 1)], kind="mean", reference=(x_ref, y_ref)):
                pred = model(x, y)
        """
        if self._intervention is not None:
            raise ValueError("ablated: one ablation at a time (merge the heads into one call)")
        L, h = self.cfg.n_layers, self.cfg.n_heads
        dev = self.head_gates.device
        if torch.is_tensor(heads):
            off = heads.to(dev, torch.bool)
            if off.shape != (L, h):
                raise ValueError(f"ablated: a head mask must have shape ({L}, {h}) (got {tuple(off.shape)})")
        else:
            off = torch.zeros(L, h, dtype=torch.bool, device=dev)
            for layer, head in heads:
                if not (0 <= layer < L and 0 <= head < h):
                    raise ValueError(f"ablated: no head ({layer}, {head}) in a model with {L} layers of {h} heads")
                off[layer, head] = True
        values: torch.Tensor | None = None
        if kind not in ("zero", "mean", "resample"):
            raise ValueError(f"ablated: kind must be zero, mean or resample (got {kind!r})")
        if kind != "zero":
            if reference is None:
                raise ValueError(f"ablated: {kind} ablation needs reference prompts (x, y)")
            with torch.no_grad():
                _, cache = self.run_with_cache(*reference, head_gates=torch.ones(L, h, device=dev))
            outs = torch.stack([cache[act_name("head_out", l)] for l in range(L)], dim=1)  # (R, L, T, h, dh)
            values = outs.mean(0) if kind == "mean" else outs
        perm = None if kind != "resample" else np.random.default_rng(seed).permutation(values.shape[0])
        self._intervention = _Intervention((~off).to(self.head_gates.dtype), values, perm)
        try:
            yield self
        finally:
            self._intervention = None

    def _with_intervention(self, gates: torch.Tensor, values: torch.Tensor | None, batch: int
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        iv = self._intervention
        if iv is None:
            return gates, values
        if values is not None:
            raise ValueError("ablated: a pass inside an ablation takes no head_values of its own")
        gates = gates * iv.keep.to(gates.device, gates.dtype)
        if iv.values is None or iv.perm is None:
            return gates, iv.values
        donors = iv.perm[np.arange(batch) % iv.perm.size]  # prompt i gets reference perm[i mod R]
        return gates, iv.values[torch.as_tensor(donors, device=iv.values.device)]

    def _run(self, x: torch.Tensor, y: torch.Tensor, head_gates: torch.Tensor | None,
             cache: dict[str, torch.Tensor] | None, head_values: torch.Tensor | None = None) -> torch.Tensor:
        lay, _ = self.token_layout(x.shape[1], x.device)
        dtype = self.read_in.weight.dtype  # prompts may come as float64 (fixed_prompts); the model decides
        h = self.read_in(tokens(self.cfg, x.to(dtype), y.to(dtype)))
        if self.pos_emb is not None:
            h = h + self.pos_emb(lay.position) + self.type_emb(lay.token_type)
        if cache is not None:
            cache[act_name("embed")] = h
        return self._run_blocks(h, 0, head_gates, cache, head_values)

    def _run_blocks(self, h: torch.Tensor, start: int, head_gates: torch.Tensor | None,
                    cache: dict[str, torch.Tensor] | None, head_values: torch.Tensor | None) -> torch.Tensor:
        L = self.cfg.n_layers
        if not 0 <= start <= L:
            raise ValueError(f"start_at_layer: must be in 0..{L} (got {start})")
        lay, mask = self.token_layout(self.n_examples_of(h.shape[1]), h.device)
        gates = self.head_gates if head_gates is None else head_gates.to(h.dtype)
        gates, head_values = self._with_intervention(gates, head_values, h.shape[0])
        first = 0 if head_values is None or head_values.shape[-4] == L else start  # values of all layers, or the run ones
        for l in range(start, L):
            values = None if head_values is None else head_values[..., l - first, :, :, :]  # (T, h, dh) or (B, T, h, dh)
            h = self.blocks[l](h, mask, gates[..., l, :], cache, f"blocks.{l}", values)
        h = self.ln_f(h[:, lay.query_index])
        if cache is not None:
            cache[act_name("ln_final")] = h
        return self.read_out(h).squeeze(-1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class _Intervention:
    """An active :meth:`Transformer.ablated`: gate multipliers ``(L, h)``, values and the donor pairing."""

    keep: torch.Tensor  # (L, h): 0 for an ablated head, 1 otherwise
    values: torch.Tensor | None  # None (zero), (L, T, h, dh) (mean) or (R, L, T, h, dh) (resample)
    perm: np.ndarray | None  # resample: the donor permutation of the reference prompts, from the seed


def _select(cache: dict[str, Any], names: list[str] | None) -> dict[str, torch.Tensor]:
    cache.pop(PATTERNS_KEY, None)
    if names is None:
        return cache
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"run_with_cache: no activation {missing[0]!r} (have {', '.join(cache)})")
    return {n: cache[n] for n in names}
