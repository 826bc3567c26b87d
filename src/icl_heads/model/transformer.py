"""The transformer: a GPT-2-style pre-LN decoder for in-context regression (SPEC section 3).

Read it top to bottom (tokens and masks are in :mod:`icl_heads.model.tokens`, hook names and the
head intervention in :mod:`icl_heads.model.hooks`). Shapes: ``B`` prompts, ``T`` tokens, ``D =
d_model``, ``h`` heads of ``d_head``, ``Q`` queries (predictions) per prompt.

* **Hook points** at TransformerLens's names (:func:`~icl_heads.model.hooks.act_name`), each a
  :class:`~icl_heads.model.hooks.HookPoint`; the model is a
  :class:`~icl_heads.model.hooks.HookedRootModule` (``run_with_hooks``, ``run_with_cache``,
  ``hooks()``, ``hook_dict``). docs/architecture.md has the table. Patterns and scores
  (``hook_attn_scores``/``hook_pattern``), per-head results (``hook_result``) and an LN's
  ``hook_scale`` are computed only when something hooks them (an explicit path, equal to the fused
  one to float rounding); otherwise attention is SDPA and the LN is ``F.layer_norm``.
* **Interventions** are hooks; on heads, :func:`~icl_heads.model.hooks.gate_heads` at
  ``blocks.{l}.attn.hook_z`` (zero / mean / resample ablation, pruning, E2's per-prompt gates). A
  hook at ``hook_z`` may return ``k`` copies of the batch (``k * B`` rows, copy-major): the rest of
  the pass then runs on all of them, the residual stream repeated to match -- E2 gates one layer's
  heads ``2h`` ways while computing that layer's attention once.
* **Head mask** (:attr:`Transformer.head_gates`, ``(L, h)``, a buffer saved with the weights): the
  model's own gates, 1 except in a pruned (:meth:`Transformer.pruned`) or hand-built model, applied
  (by ``gate_heads``) before ``hook_z``.
* **Start at a layer**: ``model(resid, start_at_layer=l)`` runs blocks ``l..L-1`` and the read-out on
  the residual stream entering block ``l`` (``blocks.{l}.hook_resid_pre``), as in TransformerLens.
* **Read-out rows only**: an evaluation pass computes the last block at the query tokens only (keys and
  values from every token) unless something watches its other rows (:meth:`Transformer._read_out_rows_only`);
  its ``hook_z`` then holds ``(B, Q, h, d_head)`` and says which tokens in ``hook.rows``, which the head-gate
  hooks (:func:`~icl_heads.model.hooks.rowwise`) use to align per-token values. Any other hook there, or
  after it in the last block, sees every token as before.

Linear attention is ``(q . k) v`` summed over the visible keys and divided by their number (an
average, as in the GD-as-attention literature); a query never attends to itself under linear
attention, since there is no empty row to avoid. Module attributes keep their checkpoint names
(``ln_1``, ``ln_2``, ``ln_f``, ``mlp.0``), so every saved model loads unchanged; their hook points
answer to TransformerLens's (``ln1``, ``ln2``, ``ln_final``).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .hooks import HookedRootModule, HookPoint, explicit_softmax_pattern, gate_heads, scaled_scores
from .tokens import TokenLayout, attention_mask, token_layout, tokens


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, linear: bool) -> torch.Tensor:
    """The attention core on ``(..., h, T, d_head)`` queries, keys and values with a ``(T, T)`` mask:
    linear attention averaged over the visible keys, or softmax through SDPA. The stacked model
    (:mod:`icl_heads.model.stacked`) calls this same function."""
    if linear:
        scores = (q @ k.transpose(-1, -2)) * mask
        return scores @ v / mask.sum(-1, keepdim=True).clamp(min=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with TransformerLens's ``hook_scale`` ``(B, T, 1)`` and ``hook_normalized`` ``(B, T, D)``
    (the output, after weight and bias). The scale is computed only when hooked; ``F.layer_norm`` otherwise."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hook_scale.has_hooks():
            return self.hook_normalized(super().forward(x))
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.weight + self.bias)


class NoNorm(nn.Identity):
    """No normalisation (``layer_norm=False``), still with ``hook_normalized`` so the names exist in every model."""

    def __init__(self, *_: Any):
        super().__init__()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(x)


class Attention(nn.Module):
    """Multi-head attention; hook points at TransformerLens's shapes (``hook_q/k/v/z`` ``(B, T, h, d_head)``,
    ``hook_attn_scores``/``hook_pattern`` ``(B, h, T_query, T_key)``, ``hook_result`` ``(B, T, h, D)``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.linear = cfg.attention == "linear"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z, self.hook_result = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output ``(B', T', D)`` from the normalised residual stream ``x (B, T, D)``;
        ``gates (h,)`` is the model's head mask for this layer (None: all ones). ``B' = B`` unless a
        ``hook_z`` hook fans out; ``rows`` (token indices, ``T'`` of them; None: all ``T``) are the query
        rows computed: keys and values still come from every token."""
        B, T, D = x.shape
        q, k, v = (hook(t.view(B, T, self.n_heads, self.d_head)).transpose(1, 2)  # (B, h, T, d_head)
                   for hook, t in zip((self.hook_q, self.hook_k, self.hook_v), self.qkv(x).split(D, dim=-1)))
        if rows is not None:
            q, mask = q[:, :, rows], mask[rows]  # (B, h, T', d_head), (T', T)
        if self.hook_pattern.has_hooks() or self.hook_attn_scores.has_hooks():
            z = self._explicit(q, k, v, mask)
        else:
            z = attend(q, k, v, mask, self.linear)
        z = z.transpose(1, 2)  # (B, T', h, d_head)
        self.hook_z.rows = rows
        try:
            z = self.hook_z(z if gates is None else gate_heads(z, gates))  # (B', T', h, d_head)
        finally:
            self.hook_z.rows = None
        if self.hook_result.has_hooks():  # per-head contributions (B', T', h, D), summed as TransformerLens does
            return self.hook_result(torch.einsum("bthd,hdm->bthm", z, self.W_O)).sum(2) + self.proj.bias
        return self.proj(z.reshape(z.shape[0], z.shape[1], D))

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention with its scores and pattern materialised (and hooked); SDPA's result to rounding."""
        if self.linear:
            scores = self.hook_attn_scores((q @ k.transpose(-1, -2)) * mask)
            pattern = self.hook_pattern(scores / mask.sum(-1, keepdim=True).clamp(min=1))
        else:
            scores = self.hook_attn_scores(scaled_scores(q, k).masked_fill(~mask, float("-inf")))
            pattern = self.hook_pattern(explicit_softmax_pattern(scores, mask))
        return pattern @ v

    # TransformerLens's weight views (read-only): W_Q/W_K/W_V (h, D, d_head), W_O (h, d_head, D)
    def _in(self, i: int) -> torch.Tensor:
        D = self.n_heads * self.d_head
        return self.qkv.weight[i * D:(i + 1) * D].T.reshape(D, self.n_heads, self.d_head).transpose(0, 1)

    @property
    def W_Q(self) -> torch.Tensor:
        return self._in(0)

    @property
    def W_K(self) -> torch.Tensor:
        return self._in(1)

    @property
    def W_V(self) -> torch.Tensor:
        return self._in(2)

    @property
    def W_O(self) -> torch.Tensor:
        return self.proj.weight.T.reshape(self.n_heads, self.d_head, -1)

    @property
    def b_O(self) -> torch.Tensor:
        return self.proj.bias


class MLP(nn.Sequential):
    """``D -> 4D``, GELU, ``4D -> D`` with ``hook_pre`` and ``hook_post`` ``(B, T, 4D)``; addressed by name
    (:attr:`fc_in`, :attr:`act`, :attr:`fc_out`).

    A ``Sequential`` underneath so that checkpoints keep their parameter names
    (``mlp.0.*``, ``mlp.2.*``): the committed zoo and every earlier run load unchanged.
    """

    def __init__(self, d_model: int):
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hook_post(self.act(self.hook_pre(self.fc_in(x)))))

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
    """Pre-LN block; ``hook_resid_pre/mid/post``, ``hook_attn_out`` and (with an MLP) ``hook_mlp_out``, all ``(B, T, D)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: LayerNorm(cfg.d_model)) if cfg.layer_norm else NoNorm
        self.ln_1, self.attn = norm(), Attention(cfg)
        self.ln_2 = norm()
        self.mlp = MLP(cfg.d_model) if cfg.mlp else None
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out = HookPoint() if cfg.mlp else None
        self.hook_resid_post = HookPoint()

    def forward(self, resid: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``resid (B, T, D)`` -> ``(B', T', D)``: the block's output at token ``rows`` (None: all ``T``)."""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln_1(resid), mask, gates, rows))
        if rows is not None:
            resid = resid[:, rows]
        resid = self.hook_resid_mid(_fan_in(resid, attn_out) + attn_out)
        if self.mlp is not None:
            resid = resid + self.hook_mlp_out(self.mlp(self.ln_2(resid)))
        return self.hook_resid_post(resid)


def _fan_in(resid: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``resid`` repeated to the rows of ``out``: a ``hook_z`` hook may return ``k * B`` rows (``k`` copies
    of the batch, copy-major), and the rest of the pass runs on all of them."""
    if out.shape[0] == resid.shape[0]:
        return resid
    k = out.shape[0] // resid.shape[0]
    if k * resid.shape[0] != out.shape[0]:
        raise ValueError(f"hook_z: a hook returned {out.shape[0]} rows for a batch of {resid.shape[0]} "
                         "(a fan-out must be a whole number of copies)")
    return resid.repeat(k, 1, 1)


class Transformer(HookedRootModule):
    """Read-in, ``L`` pre-LN blocks, final LN, scalar read-out at query tokens.

    ``hook_embed`` (read-in), ``hook_pos_embed`` and ``hook_type_embed`` ``(B, T, D)`` (with position
    embeddings; their sum is ``blocks.0.hook_resid_pre``), ``ln_final.hook_normalized`` ``(B, Q, D)``
    (at the query tokens only) and ``hook_readout`` ``(B, Q)``, the predictions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.read_in = nn.Linear(cfg.n_dims + 1, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_max + 1, cfg.d_model) if cfg.pos_emb else None
        self.type_emb = nn.Embedding(2, cfg.d_model) if cfg.pos_emb else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model) if cfg.layer_norm else NoNorm()
        self.read_out = nn.Linear(cfg.d_model, 1)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint() if cfg.pos_emb else None
        self.hook_type_embed = HookPoint() if cfg.pos_emb else None
        self.hook_readout = HookPoint()
        self.register_buffer("head_gates", torch.ones(cfg.n_layers, cfg.n_heads))
        self._layouts: dict[tuple[int, str], tuple[TokenLayout, torch.Tensor]] = {}
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth (named_parameters order)
            for out_proj in (block.attn.proj, None if block.mlp is None else block.mlp.fc_out):
                if out_proj is not None:
                    nn.init.normal_(out_proj.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))
        self.setup()

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

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                start_at_layer: int | None = None) -> torch.Tensor:
        """Predictions ``(B, Q)`` for prompts ``x (B, N, d)``, ``y (B, N)``; with the prefix mask ``Q = N``
        and column ``k`` is context length ``k``.

        ``start_at_layer=l`` (TransformerLens's): ``x`` is the residual stream ``(B, T, D)`` entering
        block ``l`` (``blocks.{l}.hook_resid_pre`` of a cached pass) and only blocks ``l..L-1`` and the
        read-out run, so ``model(cache[act_name("resid_pre", l)], start_at_layer=l)`` equals the full pass.
        """
        if start_at_layer is None:
            if y is None:
                raise ValueError("forward: prompts need both x and y")
            return self._blocks_from(self.embed(x, y), 0)
        if y is not None:
            raise ValueError("forward: with start_at_layer, pass the residual stream alone")
        return self._blocks_from(x, start_at_layer)

    def embed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 ``(B, T, D)``: read-in plus position and type embeddings."""
        lay, _ = self.token_layout(x.shape[1], x.device)
        dtype = self.read_in.weight.dtype  # prompts may come as float64 (fixed_prompts); the model decides
        h = self.hook_embed(self.read_in(tokens(self.cfg, x.to(dtype), y.to(dtype))))
        if self.pos_emb is not None and self.type_emb is not None:
            shape = h.shape
            h = (h + self.hook_pos_embed(self.pos_emb(lay.position).expand(shape))
                 + self.hook_type_embed(self.type_emb(lay.token_type).expand(shape)))
        return h

    def _blocks_from(self, resid: torch.Tensor, start: int) -> torch.Tensor:
        L = self.cfg.n_layers
        if not 0 <= start <= L:
            raise ValueError(f"start_at_layer: must be in 0..{L} (got {start})")
        lay, mask = self.token_layout(self.n_examples_of(resid.shape[1]), resid.device)
        gates = self._head_mask()
        rows = None
        for l in range(start, L):
            rows = lay.query_index if l == L - 1 and self._read_out_rows_only(self.blocks[l]) else None
            resid = self.blocks[l](resid, mask, None if gates is None else gates[l], rows)
        at_queries = resid if rows is not None else resid[:, lay.query_index]
        return self.hook_readout(self.read_out(self.ln_f(at_queries)).squeeze(-1))

    def _read_out_rows_only(self, block: Block) -> bool:
        """Whether the last block may compute only the read-out's rows (the query tokens; keys and values
        still from every token): in an evaluation pass where nothing observes its other rows -- no hook
        (hook point or plain torch hook) on anything after its attention core except
        :func:`~icl_heads.model.hooks.rowwise` hooks at ``hook_z`` (the head gates). The context rows of
        the last block feed nothing, so the predictions are the same -- to float32 rounding, as the kernels
        see smaller matrices (bitwise on the zoo's models; 4e-9 on a tiny test model) -- for about half the
        last block's attention and everything after it (issue 25: docs/performance.md). Training passes
        compute every row, so training is unchanged."""
        if self.training:
            return False
        attn = block.attn
        before = {id(m) for m in (block.hook_resid_pre, attn.qkv, attn.hook_q, attn.hook_k, attn.hook_v,
                                   *block.ln_1.modules())}
        for module in block.modules():  # the block and its attention module included: a hook there sees rows too
            if id(module) in before:
                continue
            if module is attn.hook_z:
                watched = bool(module._forward_pre_hooks) or not module.has_only_rowwise_hooks()
            else:
                watched = bool(module._forward_hooks or module._forward_pre_hooks)
            if watched:
                return False
        return True

    def _head_mask(self) -> torch.Tensor | None:
        """The head mask, or None when it is all ones: an evaluation pass then skips the multiply by 1 (the
        same numbers, less work per head output). Training and compiled passes always apply it (no host sync)."""
        if self.training or torch.compiler.is_compiling() or not bool((self.head_gates == 1).all()):
            return self.head_gates
        return None

    def pruned(self, gates: torch.Tensor) -> "Transformer":
        """A copy whose own head mask is ``gates`` ``(L, h)`` (0 = head pruned, zero-ablated in every pass
        and saved with the weights); this model is unchanged."""
        L, h = self.cfg.n_layers, self.cfg.n_heads
        if tuple(gates.shape) != (L, h):
            raise ValueError(f"pruned: gates must have shape ({L}, {h}) (got {tuple(gates.shape)})")
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.head_gates.copy_(gates)
        return out

    def lens_view(self) -> Any:
        """The model as TransformerLens's ``ActivationCache`` reads it (``cfg`` in its names)."""
        return _LensView(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _LensView:
    """The model with a TransformerLens-style ``cfg`` (``n_layers``, ``attn_only``, ...) and ``ln_final``."""

    def __init__(self, model: Transformer):
        c = model.cfg
        self._model, self.ln_final = model, model.ln_f
        self.cfg = SimpleNamespace(n_layers=c.n_layers, n_heads=c.n_heads, d_model=c.d_model,
                                   d_head=c.d_model // c.n_heads, d_mlp=4 * c.d_model if c.mlp else None,
                                   attn_only=not c.mlp, normalization_type="LN" if c.layer_norm else None,
                                   final_rms=False, act_fn="gelu", n_ctx=2 * c.n_max + 1, device=None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
