"""Evaluating a model on fixed prompts: predictions for every context length, risk with CIs."""

from __future__ import annotations

from typing import Iterator

import torch

from .config import TaskConfig
from .metrics import RiskCurve, risk_curve
from .model import Transformer
from .tasks import Prompts


@torch.no_grad()
def batches_with_cache(model: Transformer, prompts: Prompts, batch_size: int = 1024,
                       head_gates: torch.Tensor | None = None, head_values: torch.Tensor | None = None,
                       patterns: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Run ``model`` over ``prompts`` in chunks (eval mode, no autograd, in the model's dtype and device).

    Yields ``(predictions, cache)`` per chunk; the model's train/eval mode is restored afterwards.
    ``head_gates`` may be ``(L, h)`` or ``(B, L, h)`` (one gate set per prompt); ``head_values``
    (what gated-off heads output, see ``model``) ``(L, T, h, d_head)`` or ``(B, L, T, h, d_head)``.
    ``patterns=True`` adds the attention patterns (``run_with_cache``; the explicit softmax path).
    """
    was_training = model.training
    model.eval()
    p0 = next(model.parameters())
    try:
        for i in range(0, prompts.batch, batch_size):
            p = prompts.slice(i, i + batch_size).to(p0.device, p0.dtype)
            g = _rows(head_gates, i, batch_size, 3, p0.device)
            v = _rows(head_values, i, batch_size, 5, p0.device)
            yield model.run_with_cache(p.x, p.y, g, v, patterns=patterns)
    finally:
        model.train(was_training)


def _rows(t: torch.Tensor | None, start: int, size: int, per_prompt_dim: int,
          device: torch.device) -> torch.Tensor | None:
    """This chunk's rows of a per-prompt tensor (``dim == per_prompt_dim``); a shared one whole."""
    if t is None:
        return None
    return (t[start:start + size] if t.dim() == per_prompt_dim else t).to(device)


def predict(model: Transformer, prompts: Prompts, batch_size: int = 1024,
            head_gates: torch.Tensor | None = None, head_values: torch.Tensor | None = None) -> torch.Tensor:
    """Model predictions ``(B, Q)`` for every prefix, returned on CPU as float64."""
    return torch.cat([pred.double().cpu() for pred, _ in
                      batches_with_cache(model, prompts, batch_size, head_gates, head_values)])


def evaluate(model: Transformer, prompts: Prompts, task: TaskConfig,
             head_gates: torch.Tensor | None = None, head_values: torch.Tensor | None = None) -> RiskCurve:
    """Excess-risk curve of ``model`` on ``prompts`` (all prefixes from one pass)."""
    return risk_curve(predict(model, prompts, head_gates=head_gates, head_values=head_values), prompts.f, task)
