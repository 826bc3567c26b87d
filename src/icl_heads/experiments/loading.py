"""Loading a checkpoint for an experiment: the model, its metadata and the preset whose task it trained on.

Every experiment runner starts here, so "which prompts does this checkpoint get?" has one answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import load_meta, load_model
from ..config import ConfigError, Preset, TaskConfig, get_preset, validate
from ..model import Transformer


def resolve_preset(ckpt: str | Path, preset: Preset | str | None) -> Preset:
    """The preset to sample prompts from: the one given, else the one named in ``meta.json``.

    Training records the preset's name and the exact task it trained on; the recorded task
    wins over the named preset's, so a model trained with task overrides is analysed on its task.
    """
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        return get_preset(preset)
    meta = load_meta(ckpt)
    rec = meta.get("preset")
    if isinstance(rec, dict):
        return validate(Preset, rec)
    if not isinstance(rec, str):
        raise ConfigError(f"preset: {ckpt} records no preset in meta.json; pass --preset")
    pre = get_preset(rec)
    if isinstance(meta.get("task"), dict):
        pre = pre.model_copy(update={"task": validate(TaskConfig, meta["task"])})
    return pre


def load_for_analysis(ckpt: str | Path, preset: Preset | str | None = None,
                      device: str = "cpu") -> tuple[Transformer, dict[str, Any], Preset]:
    """Load a checkpoint and the preset whose task it was trained on; check they fit together."""
    pre = resolve_preset(ckpt, preset)
    model, meta = load_model(ckpt, device)
    if pre.task.d != model.cfg.n_dims or pre.task.n_max > model.cfg.n_max:
        raise ConfigError(f"preset: task d={pre.task.d}, n_max={pre.task.n_max} does not fit checkpoint {ckpt} "
                          f"(n_dims={model.cfg.n_dims}, n_max={model.cfg.n_max})")
    model.eval()
    return model, meta, pre


def model_label(model: Transformer) -> str:
    return f"h={model.cfg.n_heads}"


