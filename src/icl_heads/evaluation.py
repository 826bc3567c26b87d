"""Evaluating a model on fixed prompts: predictions for every context length, risk with CIs."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .config import TaskConfig
from .metrics import RiskCurve, risk_curve
from .model import Transformer, head_hooks
from .model.hooks import Values
from .tasks import Prompts


@torch.no_grad()
def batches_with_cache(model: Transformer, prompts: Prompts, batch_size: int = 1024,
                       head_gates: torch.Tensor | None = None, head_values: Values = None,
                       names: Sequence[str] = ()) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Run ``model`` over ``prompts`` in chunks (eval mode, no autograd, in the model's dtype and device).

    Yields ``(predictions, cache)`` per chunk, the cache holding the hook points ``names``
    (:func:`~icl_heads.model.act_name`); the model's train/eval mode is restored afterwards.
    ``head_gates`` ``(L, h)`` or ``(P, L, h)`` (one gate set per prompt) and ``head_values`` (what
    gated-off heads output: ``(L, T, h, d_head)`` or ``(P, L, T, h, d_head)``) act through
    :func:`~icl_heads.model.head_hooks`, per-prompt rows by absolute prompt number, so the chunking
    never changes a prompt's gates or donor.
    """
    was_training = model.training
    model.eval()
    p0 = next(model.parameters())
    try:
        for i in range(0, prompts.batch, batch_size):
            p = prompts.slice(i, i + batch_size).to(p0.device, p0.dtype)
            gates = model.head_gates if head_gates is None and head_values is not None else head_gates
            with model.hooks([] if gates is None else head_hooks(gates, head_values, start=i)):
                out = model.run_with_cache(p.x, p.y, names_filter=list(names), return_cache_object=False)
            yield out  # outside the hooks: the caller may run the model in between
    finally:
        model.train(was_training)


def predict(model: Transformer, prompts: Prompts, batch_size: int = 1024,
            head_gates: torch.Tensor | None = None, head_values: Values = None) -> torch.Tensor:
    """Model predictions ``(B, Q)`` for every prefix, returned on CPU as float64."""
    return torch.cat([pred.double().cpu() for pred, _ in
                      batches_with_cache(model, prompts, batch_size, head_gates, head_values)])


def evaluate(model: Transformer, prompts: Prompts, task: TaskConfig,
             head_gates: torch.Tensor | None = None, head_values: Values = None) -> RiskCurve:
    """Excess-risk curve of ``model`` on ``prompts`` (all prefixes from one pass)."""
    return risk_curve(predict(model, prompts, head_gates=head_gates, head_values=head_values), prompts.f, task)
