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

from .config import ConfigError, ModelConfig, validate
from .io import atomic_write_bytes, write_json
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
    for name, data in files.items():
        atomic_write_bytes(path / name, data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    write_json(path / META_FILE, {"model_config": model.cfg.model_dump(), "sha256": digests, **(meta or {})})
    return path


def load_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no {META_FILE})") from None
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
    model = Transformer(cfg)
    try:
        model.load_state_dict(load_tensors(path, MODEL_FILE, meta))
    except RuntimeError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(path) / MODEL_FILE}: weights do not fit the config ({str(e).splitlines()[0]})") from None
    return model.to(device), meta


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
