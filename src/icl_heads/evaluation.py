"""Evaluating a model on fixed prompts: predictions for every context length, risk with CIs."""

from __future__ import annotations

import torch

from .config import TaskConfig
from .metrics import RiskCurve, risk_curve
from .model import Transformer
from .tasks import Prompts


@torch.no_grad()
def predict(model: Transformer, prompts: Prompts, batch_size: int = 1024,
            head_gates: torch.Tensor | None = None) -> torch.Tensor:
    """Model predictions ``(B, Q)`` in float32 on the model's device, returned on CPU as float64.

    ``head_gates`` may be ``(L, h)`` or ``(B, L, h)`` (one gate set per prompt).
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, prompts.batch, batch_size):
        p = prompts.slice(i, i + batch_size).to(dev, torch.float32)
        g = None if head_gates is None else head_gates[i:i + batch_size] if head_gates.dim() == 3 else head_gates
        outs.append(model(p.x, p.y, None if g is None else g.to(dev)).double().cpu())
    model.train(was_training)
    return torch.cat(outs)


def evaluate(model: Transformer, prompts: Prompts, task: TaskConfig,
             head_gates: torch.Tensor | None = None) -> RiskCurve:
    """Excess-risk curve of ``model`` on ``prompts`` (all prefixes from one pass)."""
    return risk_curve(predict(model, prompts, head_gates=head_gates), prompts.f, task)
