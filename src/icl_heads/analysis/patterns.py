"""Where the important heads look: attention patterns of the query with the longest context (E2's figure).

Importance (:mod:`.importance`) says *which* head matters; its attention pattern hints at *what* it
computes. For the query that predicts example ``n = n_max`` (it sees every context example), we
read each selected head's softmax weight on every context example ``k < n``, averaged over prompts
(the per-position pattern), and the same weights binned by ``|y_k|`` (does the head weigh examples
by their label's size, as ``r = mean_k y_k x_k`` would?). The weight on example ``k`` sums every
token of that example the query sees (the interleaved format's x token too); the query's weight on
itself is the rest. Patterns come from caching ``blocks.{l}.attn.hook_pattern`` (which switches that
layer to the explicit softmax), so only this analysis pays for them; every other forward pass stays on SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..evaluation import batches_with_cache
from ..model import Transformer, act_name
from ..tasks import Prompts
from .importance import HeadImportance

PATTERN_PROMPTS = 300  # prompts averaged over: the figure is descriptive, a few hundred are plenty
Y_BINS = 8  # quantile bins of |y_k|
PATTERN_ELEMENTS = 2 ** 24  # attention-pattern entries cached per chunk (bounds memory on long prompts)


@dataclass
class QueryAttention:
    """Attention of the longest-context query: ``weight (P, H, n)`` on each context example ``k < n``
    for each of the ``heads`` (0-based ``(layer, head)``), and ``abs_y (P, n)`` = ``|y_k|``."""

    heads: list[tuple[int, int]]
    weight: np.ndarray
    abs_y: np.ndarray
    uniform: float  # weight on one example under uniform attention over the tokens the query sees

    @property
    def n(self) -> int:
        return self.weight.shape[-1]


def example_weights(model: Transformer, n_examples: int) -> tuple[int, torch.Tensor, float]:
    """The longest-context query's token index, a ``(T, n)`` 0/1 matrix summing each key token into
    its example ``k < n`` (the query token itself excluded: that weight is the query's own), and the
    weight per example under uniform attention over the tokens the query sees (1/(n+1) for paired
    tokens, 2/(2n+1) for interleaved ones)."""
    lay, mask = model.token_layout(n_examples, "cpu")
    q, n = int(lay.query_index[-1]), int(lay.query_n[-1])
    one_hot = (lay.position[:, None] == torch.arange(n)[None, :]).double()
    one_hot[q] = 0.0
    seen = mask[q]  # boolean: the key tokens the query attends to
    uniform = float(one_hot[seen].sum(0).mean() / seen.sum())
    return q, one_hot, uniform


@torch.no_grad()
def query_attention(model: Transformer, prompts: Prompts, heads: Sequence[tuple[int, int]]) -> QueryAttention:
    """Weights of ``heads`` at the longest-context query on every context example (see the module docstring)."""
    if model.cfg.attention != "softmax":
        raise ConfigError(f"attention patterns: model has {model.cfg.attention} attention (patterns need softmax)")
    L, h = model.cfg.n_layers, model.cfg.n_heads
    bad = [lk for lk in heads if not (0 <= lk[0] < L and 0 <= lk[1] < h)]
    if bad or not heads:
        raise ConfigError(f"heads: need 0-based (layer, head) pairs within ({L}, {h}) (got {list(heads)})")
    q, to_example, uniform = example_weights(model, prompts.x.shape[1])
    T = to_example.shape[0]
    chunk = max(1, PATTERN_ELEMENTS // (L * h * T * T))
    out = []
    names = sorted({act_name("pattern", l) for l, _ in heads})
    for _, cache in batches_with_cache(model, prompts, chunk, names=names):
        rows = torch.stack([cache[act_name("pattern", l)][:, k, q] for l, k in heads], 1)  # (B, H, T)
        out.append(rows.double().cpu() @ to_example)
    weight = torch.cat(out).numpy()
    abs_y = prompts.y[:, : weight.shape[-1]].abs().double().numpy()
    return QueryAttention(list(heads), weight, abs_y, uniform)


def top_heads(importance: HeadImportance) -> list[tuple[int, int]]:
    """``(layer, head)`` (0-based) of each layer's most important head (:meth:`HeadImportance.ranking`)."""
    return [(l, importance.ranking(l)[0]) for l in range(importance.shape[0])]


def pattern_rows(att: QueryAttention, bins: int = Y_BINS, **labels: Any) -> list[dict[str, Any]]:
    """CSV rows per head: ``quantity="position"`` (mean weight on example ``k``, x = k) and
    ``quantity="abs_y"`` (mean weight in each quantile bin of ``|y_k|``, x = the bin's mean ``|y_k|``).
    Layers and heads are 1-based, as in E2's other tables."""
    edges = np.quantile(att.abs_y, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, att.abs_y.ravel(), side="right") - 1, 0, bins - 1)
    P = att.weight.shape[0]
    rows: list[dict[str, Any]] = []
    for i, (l, k) in enumerate(att.heads):
        head = dict(labels, layer=l + 1, head=k + 1, n_context=att.n, uniform=att.uniform)
        w = att.weight[:, i]
        rows += [dict(head, quantity="position", x=float(j), x_low=float(j), x_high=float(j),
                      weight=float(w[:, j].mean()), count=P) for j in range(att.n)]
        flat = w.ravel()
        for b in range(bins):
            sel = which == b
            if not sel.any():  # tied quantiles (labels with repeated values): no examples in this bin
                continue
            rows.append(dict(head, quantity="abs_y", x=float(att.abs_y.ravel()[sel].mean()), x_low=float(edges[b]),
                             x_high=float(edges[b + 1]), weight=float(flat[sel].mean()), count=int(sel.sum())))
    return rows
