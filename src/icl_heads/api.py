"""The notebook entry point: ``icl_heads.load(path)`` gives a model with its task and prompts.

    import icl_heads
    run = icl_heads.load("zoo/A/seed0/h4")
    x, y, f = run.prompts(500)                      # test prompts of the model's task and seed, float32
    pred, cache = run.model.run_with_cache(x, y)  # TransformerLens's ActivationCache: cache["pattern", 0]
    run.risk(pred, f)                               # normalised excess risk per context length
    test = run.prompt_set(500)                      # the same prompts as a Prompts object, for icl_heads.analysis
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_model
from .config import TaskConfig
from .model import Transformer
from .tasks import Prompts, fixed_prompts


@dataclass
class Loaded:
    """A checkpoint's model (eval mode), its task and training seed, and its ``meta.json``."""

    model: Transformer
    task: TaskConfig
    seed: int
    meta: dict[str, Any]

    def prompts(self, n: int, stream: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, f)`` of ``n`` fixed prompts of the model's task (the stream E1-E7 use), in the
        model's dtype; ``f`` is the noiseless target ``<w*, x>``."""
        p = self.prompt_set(n, stream)
        dtype = self.model.read_in.weight.dtype
        return p.x.to(dtype), p.y.to(dtype), p.f.to(dtype)

    def prompt_set(self, n: int, stream: str = "test") -> Prompts:
        """The same ``n`` prompts as one :class:`~icl_heads.tasks.Prompts` (``x, y, w, f``), as the
        :mod:`icl_heads.analysis` functions take them (streams: test, val, probe, ablation, ...)."""
        return fixed_prompts(self.task, n, self.seed, stream)

    def risk(self, pred: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Normalised excess risk per context length: ``mean_b (pred - f)^2 / (s tau^2)`` (no gradient)."""
        return ((pred.detach() - f) ** 2).mean(0) / (self.task.s * self.task.tau ** 2)


def load(path: str | Path, device: str = "cpu") -> Loaded:
    """Load a checkpoint (a zoo model, a run's ``e1/models/h4``, a snapshot) for analysis."""
    model, meta = load_model(path, device)
    if "task" not in meta:
        raise CheckpointError(f"{Path(path) / 'meta.json'}: no task config (not made by icl-heads train)")
    return Loaded(model.eval(), TaskConfig.model_validate(meta["task"]), int(meta.get("seed", 0)), meta)
