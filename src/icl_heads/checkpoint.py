"""Checkpoints as safetensors + JSON, never pickle.

A checkpoint is a folder ``ckpt/`` with ``model.safetensors`` (weights and head
gates), ``meta.json`` (model config, step, anything else JSON-able) and,
optionally, ``state.safetensors`` (optimizer and RNG tensors for resuming). Files
are written atomically, ``meta.json`` last, so a folder with a readable
``meta.json`` is complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import PRESET_NAMES, ConfigError, ModelConfig, Preset, TaskConfig, validate
from .io import sha256s, write_files_then_meta
from .model import Transformer

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.safetensors", "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupted; the message says which file."""


def save_checkpoint(path: str | Path, model: Transformer, meta: dict[str, Any] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    path = Path(path)
    files = {MODEL_FILE: _tensor_bytes(model.state_dict())}
    if state is not None:
        files[STATE_FILE] = _tensor_bytes(state)
    return write_files_then_meta(path, files, META_FILE,
                                 {"model_config": model.cfg.model_dump(), "sha256": sha256s(files), **(meta or {})})


def load_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {path}: not a checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE}: corrupted JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def load_tensors(path: str | Path, name: str, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read one tensor file of a checkpoint, checking its SHA-256 against ``meta.json``."""
    path = Path(path)
    meta = load_meta(path) if meta is None else meta
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {name}") from None
    want = meta.get("sha256", {}).get(name)
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path / name}: checksum mismatch (truncated or corrupted)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / name}: unreadable safetensors ({e})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """Rebuild the model from ``meta.json`` and load its weights (head gates included)."""
    meta = load_meta(path)
    try:
        cfg = validate(ModelConfig, meta["model_config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{Path(path) / META_FILE}: bad model_config ({e})") from None
    check_task(Path(path), meta, cfg)
    model = Transformer(cfg)
    tensors = load_tensors(path, MODEL_FILE, meta)
    misfit = weight_misfit(model.state_dict(), tensors)
    if misfit:
        raise CheckpointError(f"{Path(path) / MODEL_FILE}: weights do not fit the config ({misfit})")
    check_preset(Path(path) / META_FILE, meta, cfg)
    model.load_state_dict(tensors)
    return model.to(device), meta


def check_task(path: Path, meta: dict[str, Any], cfg: ModelConfig) -> None:
    """The task recorded in ``meta.json`` must fit its ``model_config`` (checked before the weights).

    A checkpoint whose meta says ``task.d = 7`` for a 5-dimensional model used to fail deep
    inside a matmul, and an edited preset name ran silently; now either is one line naming the field.
    """
    where = path / META_FILE
    task = meta.get("task")
    if task is not None:
        try:
            t = validate(TaskConfig, task)
        except ConfigError as e:
            raise CheckpointError(f"task: {where}: {e}") from None
        for field, have, want in (("d", t.d, cfg.n_dims), ("n_max", t.n_max, cfg.n_max)):
            if have != want:
                name = "n_dims" if field == "d" else field
                raise CheckpointError(f"task.{field}: {where} says {have} but model_config.{name} is {want}")


def check_preset(where: Path, meta: dict[str, Any], cfg: ModelConfig) -> None:
    """A recorded preset name must be known and agree with the recorded preset config and model."""
    name = meta.get("preset")
    if name is None or isinstance(name, dict):
        return
    if name not in PRESET_NAMES:
        raise CheckpointError(f"preset: {where} names an unknown preset {name!r} (known: {', '.join(PRESET_NAMES)})")
    rec = meta.get("preset_config")
    if rec is None:  # checkpoints from before the preset was recorded: the name is all there is
        return
    try:
        pre = validate(Preset, rec)
    except ConfigError as e:
        raise CheckpointError(f"preset_config: {where}: {e}") from None
    if pre.name != name:
        raise CheckpointError(f"preset: {where} names preset {name!r} but the model was trained with {pre.name!r}")
    if pre.model_config_for(cfg.n_heads) != cfg:
        raise CheckpointError(f"preset: {where}: model_config does not match the architecture of preset {name!r} "
                              "it was trained with")


def weight_misfit(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], limit: int = 3) -> str:
    """Which tensors do not fit and why (missing, unexpected, shape), ``""`` when all fit.

    torch's own message for this arrives with an empty first line; this names the tensors.
    """
    problems = [f"missing tensor {k}" for k in want if k not in got]
    problems += [f"unexpected tensor {k}" for k in got if k not in want]
    problems += [f"tensor {k}: shape {tuple(got[k].shape)} in the file vs {tuple(v.shape)} in the model"
                 for k, v in want.items() if k in got and got[k].shape != v.shape]
    if len(problems) > limit:
        problems = problems[:limit] + [f"{len(problems) - limit} more"]
    return "; ".join(problems)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
