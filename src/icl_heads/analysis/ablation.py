"""What an ablated (gated-off) head outputs instead: zero, its mean, or a donor prompt's output.

The gate stays the only masking mechanism (:func:`icl_heads.model.gate_heads` at
``blocks.{l}.attn.hook_z``): a head with gate ``g`` outputs ``g * z + (1 - g) * value``. An
:class:`Ablation` supplies ``value`` per scored prompt, and :meth:`Ablation.hooks` installs it:

    abl = make_ablation(model, "mean", reference_prompts)
    pred = model.run_with_hooks(x, y, fwd_hooks=abl.hooks(head_mask(model, [(1, 0)])))

* ``zero``: no value (``g * z``), the paper's masking.
* ``mean``: the head's output (``blocks.{l}.attn.hook_z``, before the output projection)
  averaged over reference prompts, per token position: ``(L, T, h, d_head)``.
* ``resample``: the head's output at the same position of a reference prompt (other w*, other
  x), scored prompt ``i`` paired with reference prompt ``perm[i mod R]`` for a permutation
  ``perm`` drawn from ``seed``: ``(P, L, T, h, d_head)``. Prompt ``i`` is its index in the scored
  set, so a set scored in chunks pairs every prompt with the same donor as in one pass.

Reference outputs come from a clean run (all gates 1) of the model on the ``"ablation"``
prompt stream, which no experiment scores, ranks heads on or fits probes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..config import ConfigError, TaskConfig
from ..evaluation import batches_with_cache
from ..model import Transformer, act_name, head_hooks
from ..model.hooks import Hooks
from ..tasks import Prompts, fixed_prompts

KINDS = ("zero", "mean", "resample")
REFERENCE_STREAM = "ablation"


def parse_ablations(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"zero"``, ``"all"``, ``"zero,mean"`` or a sequence of kinds -> a tuple of distinct kinds."""
    items = [value] if isinstance(value, str) else list(value)
    kinds: list[str] = []
    for item in items:
        for k in str(item).split(","):
            k = k.strip()
            for kk in (KINDS if k == "all" else [k]):
                if kk not in KINDS:
                    raise ConfigError(f"ablation: must be one of {', '.join(KINDS)} or all (got {k!r})")
                if kk not in kinds:
                    kinds.append(kk)
    if not kinds:
        raise ConfigError("ablation: no kind given")
    return tuple(kinds)


@torch.no_grad()
def head_outputs(model: Transformer, prompts: Prompts, batch_size: int = 1024) -> torch.Tensor:
    """Clean head outputs (``hook_z``, no intervention) of every layer, ``(P, L, T, h, d_head)`` on the model's device."""
    names = [act_name("z", l) for l in range(model.cfg.n_layers)]
    out = [torch.stack([cache[name] for name in names], dim=1)
           for _, cache in batches_with_cache(model, prompts, batch_size, names=names)]
    return torch.cat(out)


def head_mask(model: Transformer, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Gates ``(L, h)``: 1, and 0 at each ``(layer, head)`` pair (0-based) of ``heads``."""
    L, h = model.cfg.n_layers, model.cfg.n_heads
    gates = torch.ones(L, h)
    for layer, head in heads:
        if not (0 <= layer < L and 0 <= head < h):
            raise ConfigError(f"heads: no head ({layer}, {head}) in a model with {L} layers of {h} heads")
        gates[layer, head] = 0.0
    return gates


@dataclass(frozen=True)
class Ablation:
    """Replacement values for gated-off heads (see the module docstring)."""

    kind: str
    mean: torch.Tensor | None = None  # (L, T, h, d_head)
    reference: torch.Tensor | None = None  # (R, L, T, h, d_head)
    seed: int = 0

    def values(self, n_prompts: int, start: int = 0) -> torch.Tensor | None:
        """``head_values`` for scored prompts ``start .. start + n_prompts - 1``."""
        if self.kind == "zero":
            return None
        if self.kind == "mean":
            return self.mean
        return self.reference[self.donors(n_prompts, start)]

    def donors(self, n_prompts: int, start: int = 0) -> np.ndarray:
        """Reference-prompt index paired with each scored prompt (resample)."""
        R = self.reference.shape[0]
        perm = np.random.default_rng(self.seed).permutation(R)
        return perm[np.arange(start, start + n_prompts) % R]

    def hooks(self, gates: torch.Tensor, start: int = 0) -> Hooks:
        """Hooks (``run_with_hooks(..., fwd_hooks=...)``) gating heads by ``gates`` ``(L, h)`` or per prompt
        ``(P, L, h)``, gated-off heads outputting this ablation's values, for a pass over scored prompts
        ``start, start + 1, ...`` (the batch the hooks see)."""
        values = None if self.kind == "zero" else (self.mean if self.kind == "mean"
                                                   else lambda first, n: self.values(n, first))
        return head_hooks(gates, values, start)

    def sample(self, n_prompts: int, gen: torch.Generator) -> torch.Tensor | None:
        """Values for ``n_prompts`` fresh prompts (fine-tuning): random donors drawn from ``gen``."""
        if self.kind != "resample":
            return self.values(n_prompts)
        idx = torch.randint(self.reference.shape[0], (n_prompts,), generator=gen, device=gen.device)
        return self.reference[idx.to(self.reference.device)]

    def repaired(self, seed: int) -> "Ablation":
        """The same ablation with another donor pairing (e.g. for a second scored prompt set)."""
        return dataclasses.replace(self, seed=seed)


def make_ablation(model: Transformer, kind: str, reference: Prompts | None = None, seed: int = 0,
                  outputs: torch.Tensor | None = None) -> Ablation:
    """An :class:`Ablation` of ``kind`` whose values come from ``reference`` prompts (not needed for zero).

    ``outputs`` (from :func:`head_outputs`) lets several kinds share one reference run.
    """
    (kind,) = parse_ablations(kind)
    if kind == "zero":
        return Ablation("zero", seed=seed)
    if outputs is None:
        if reference is None:
            raise ConfigError(f"ablation: {kind} ablation needs reference prompts")
        outputs = head_outputs(model, reference)
    if kind == "mean":
        return Ablation("mean", mean=outputs.mean(0), seed=seed)
    return Ablation("resample", reference=outputs, seed=seed)


def make_ablations(model: Transformer, kinds: Sequence[str], task: TaskConfig, n_reference: int,
                   seed: int) -> dict[str, Ablation]:
    """One :class:`Ablation` per kind, sharing one clean run on ``n_reference`` prompts of the reference stream."""
    kinds = parse_ablations(kinds)
    outputs = None
    if any(k != "zero" for k in kinds):
        outputs = head_outputs(model, fixed_prompts(task, n_reference, seed, REFERENCE_STREAM))
    return {k: make_ablation(model, k, seed=seed, outputs=outputs) for k in kinds}
