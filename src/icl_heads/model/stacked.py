"""The stacked forward: several models of one architecture as one, with a leading model axis.

Our models are far too small to fill a GPU, so a sweep (seeds x head counts)
trains as one *stack*: every parameter gets a leading member axis ``M``, every
matmul is one batched matmul over it (``torch.baddbmm``), and attention runs
once per head-count group on ``(M_g * B, h, T, d_head)``. The linear maps do
not depend on the head count (``qkv`` is ``D -> 3D`` whatever ``h`` is), so
members with different ``h`` share one stack and only the attention core is
split. A hand-written batched forward rather than ``torch.func.vmap``: vmap
needs one module structure, and the head count changes the structure.

The forward walks the first member's modules (``blocks[l].attn.qkv``,
``blocks[l].mlp.fc_in``, its LayerNorms, GELU and the attention core
:func:`icl_heads.model.transformer.attend`), taking each module's stacked
weights by the module's own parameter name, so it follows the model's
structure rather than restating it; ``tests/test_stacked.py`` checks it against
every member's own forward for every model option. Training it is
:mod:`icl_heads.training`'s job.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .tokens import tokens
from .transformer import Transformer, attend


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-member ``x @ w.T + b``: x ``(M, B, T, i)``, w ``(M, o, i)``, b ``(M, o)`` -> ``(M, B, T, o)``."""
    M, B, T, i = x.shape
    return torch.baddbmm(b[:, None, :], x.reshape(M, B * T, i), w.transpose(1, 2)).view(M, B, T, -1)


class StackedTransformer(nn.Module):
    """``M`` transformers of one architecture (head counts may differ) as one module; training only.

    Parameters are the members' parameters stacked on a new leading axis, under
    the member's parameter name with ``.`` replaced by ``__`` (e.g. ``blocks__0__mlp__0__weight``: the
    checkpoint name of ``blocks[0].mlp.fc_in.weight``). Head gates are not applied
    (they are 1 in training, and multiplying by 1 is exact).
    """

    def __init__(self, models: Sequence[Transformer]):
        super().__init__()
        base = models[0].cfg
        for m in models:
            if m.cfg.model_copy(update={"n_heads": base.n_heads}) != base:
                raise ConfigError("stack: members must share every model field but n_heads")
        self.cfg, self.heads = base, [m.cfg.n_heads for m in models]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.p = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.stack(
            [dict(m.named_parameters())[n].detach() for m in models])) for n in self.names})
        self._members = list(models)  # templates for member(i); a plain list, so not submodules
        self._name_of = {id(p): n for n, p in models[0].named_parameters()}
        self.groups: list[tuple[int, int, int]] = []  # (h, first, last + 1): contiguous runs of one head count
        for i, h in enumerate(self.heads):
            if self.groups and self.groups[-1][0] == h:
                self.groups[-1] = (h, self.groups[-1][1], i + 1)
            else:
                self.groups.append((h, i, i + 1))

    def w(self, name: str) -> torch.Tensor:
        """The stacked ``(M, ...)`` tensor of the member parameter called ``name``."""
        return self.p[name.replace(".", "__")]

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """The stacked tensor of one of the template's (first member's) parameters."""
        return self.w(self._name_of[id(param)])

    def member(self, i: int) -> Transformer:
        """Member ``i`` as a plain ``Transformer`` holding a copy of its current weights."""
        model = self._members[i]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.w(name)[i])
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predictions ``(M, B, Q)`` for prompts ``x (M, B, N, d)``, ``y (M, B, N)``."""
        M, B, N, d = x.shape
        t = self._members[0]  # the template: its modules say what to compute, the stack holds the weights
        lay, mask = t.token_layout(N, x.device)  # the head count does not enter the layout
        tok = tokens(self.cfg, x.reshape(M * B, N, d), y.reshape(M * B, N))
        h = self._lin(tok.view(M, B, -1, d + 1), t.read_in)  # (M, B, T, D)
        if t.pos_emb is not None and t.type_emb is not None:
            emb = self.of(t.pos_emb.weight)[:, lay.position] + self.of(t.type_emb.weight)[:, lay.token_type]
            h = h + emb[:, None]  # (M, 1, T, D)
        for block in t.blocks:
            h = h + self._attention(self._norm(h, block.ln_1), mask, block.attn)
            if block.mlp is not None:
                h = h + self._lin(block.mlp.act(self._lin(self._norm(h, block.ln_2), block.mlp.fc_in)), block.mlp.fc_out)
        h = self._norm(h[:, :, lay.query_index], t.ln_f)  # (M, B, Q, D)
        return self._lin(h, t.read_out).squeeze(-1)

    def _lin(self, x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
        return _linear(x, self.of(mod.weight), self.of(mod.bias))

    def _norm(self, h: torch.Tensor, mod: nn.Module) -> torch.Tensor:
        if isinstance(mod, nn.Identity):
            return h
        assert isinstance(mod, nn.LayerNorm)
        w, b = self.of(mod.weight), self.of(mod.bias)
        return F.layer_norm(h, mod.normalized_shape, eps=mod.eps) * w[:, None, None] + b[:, None, None]

    def _attention(self, a: torch.Tensor, mask: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        M, B, T, D = a.shape
        qkv = self._lin(a, attn.qkv)  # (M, B, T, 3D)
        outs = []  # split, not slice: slicing's backward zero-fills the whole tensor per slice (3x slower on CPU)
        for (n_heads, lo, hi), part in zip(self.groups, qkv.split([hi - lo for _, lo, hi in self.groups])):
            q, k, v = (t.reshape((hi - lo) * B, T, n_heads, D // n_heads).transpose(1, 2)  # (Mg*B, h, T, d_head)
                       for t in part.split(D, dim=-1))
            o = attend(q, k, v, mask, attn.linear)
            outs.append(o.transpose(1, 2).reshape(hi - lo, B, T, D))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self._lin(out, attn.proj)
