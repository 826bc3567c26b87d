"""Checkpoints as safetensors + JSON, never pickle.

A checkpoint is a folder ``ckpt/`` with ``model.safetensors`` (weights and head
gates), ``meta.json`` (model config, step, anything else JSON-able) and,
optionally, ``state.safetensors`` (optimizer and RNG tensors for resuming). Files
are written atomically, ``meta.json`` last, so a folder with a readable
``meta.json`` is complete.

A checkpoint is trusted only if it checks out (issue 26): ``meta.json`` must be a JSON object with the
files' SHA-256 (:class:`CheckpointMeta`; a model checkpoint also its ``model_config``), every tensor
file is checked against its checksum before it is read (a file without one is refused, never
loaded unverified), and weights must be finite both when written and when read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import PRESET_NAMES, ConfigError, ModelConfig, Preset, TaskConfig, describe_error, validate
from .io import sha256s, write_files_then_meta
from .model import Transformer

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.safetensors", "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupted; the message says which file."""


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FilesMeta(BaseModel):
    """What every checkpoint folder's ``meta.json`` must hold (a stack's state folder too): the
    SHA-256 of each tensor file, by file name. Anything else is the writer's business."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    sha256: dict[str, Sha256] = Field(min_length=1)


class CheckpointMeta(FilesMeta):
    """A model checkpoint's ``meta.json``: the checksums (the weights' among them) and the model's config;
    the training fields are typed where present (snapshots and exports have no optimizer state)."""

    model_cfg: ModelConfig = Field(alias="model_config")
    step: Optional[Annotated[int, Field(ge=0)]] = None
    finished: Optional[bool] = None
    seed: Optional[Annotated[int, Field(ge=0)]] = None


def save_checkpoint(path: str | Path, model: Transformer, meta: dict[str, Any] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the weights (and optimizer ``state``), then ``meta.json`` with their checksums.

    Non-finite weights are refused here (:class:`CheckpointError`): a diverged model is never written
    as a checkpoint, so a folder's last checkpoint is its last finite one."""
    path = Path(path)
    check_finite(model.state_dict(), f"{path}: not saved:")
    files = {MODEL_FILE: _tensor_bytes(model.state_dict())}
    if state is not None:
        check_finite(state, f"{path}: not saved: optimizer state:")
        files[STATE_FILE] = _tensor_bytes(state)
    return write_files_then_meta(path, files, META_FILE,
                                 {"model_config": model.cfg.model_dump(), "sha256": sha256s(files), **(meta or {})})


def load_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` as a dict, checked against :class:`FilesMeta` (a JSON object recording checksums)."""
    path = Path(path)
    try:
        raw = json.loads((path / META_FILE).read_text(encoding="utf-8-sig"))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"checkpoint: {path}: not a checkpoint (no {META_FILE})") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint: {path / META_FILE}: is a folder, not a file") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint: {path / META_FILE}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE}: corrupted JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except RecursionError:
        raise CheckpointError(f"{path / META_FILE}: corrupted JSON (nested too deeply)") from None
    parse_meta(raw, path / META_FILE, FilesMeta)
    return raw


def parse_meta(raw: Any, where: Path, schema: type[FilesMeta] = FilesMeta) -> FilesMeta:
    """``raw`` validated as ``schema``, or one line naming ``where`` and the missing or bad field."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a checkpoint's meta (a JSON object is expected, got {_json_kind(raw)})")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "missing":
            field = ".".join(str(p) for p in err["loc"])
            why = " (the files' checksums: a checkpoint is never loaded unverified)" if field == "sha256" else ""
            raise CheckpointError(f"{field}: {where} is missing it{why}") from None
        raise CheckpointError(f"{where}: {describe_error(e)}") from None


def _json_kind(raw: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null", int: "a number",
            float: "a number"}.get(type(raw), type(raw).__name__)


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or inf in any floating tensor, naming the first such tensor and how many values are hit."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where} tensor {name} holds {bad} non-finite (NaN or inf) values "
                                  "(a diverged or damaged model)")


def load_tensors(path: str | Path, name: str, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read one tensor file of a checkpoint, checking its SHA-256 against ``meta.json`` (which must have it)."""
    path = Path(path)
    meta = load_meta(path) if meta is None else meta
    want = parse_meta(meta, path / META_FILE).sha256.get(name)
    if want is None:
        raise CheckpointError(f"sha256: {path / META_FILE} records no checksum for {name}; it is not loaded unverified")
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {name}") from None
    except OSError as e:
        raise CheckpointError(f"{path / name}: cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path / name}: checksum mismatch (truncated or corrupted)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / name}: unreadable safetensors ({e})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """Rebuild the model from ``meta.json`` and load its weights (head gates included)."""
    meta = load_meta(path)
    if not isinstance(meta.get("model_config"), dict):
        parse_meta(meta, Path(path) / META_FILE, CheckpointMeta)  # names the missing or malformed field
    try:
        cfg = validate(ModelConfig, meta["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / META_FILE}: bad model_config ({e})") from None
    parse_meta(meta, Path(path) / META_FILE, CheckpointMeta)
    check_task(Path(path), meta, cfg)
    model = Transformer(cfg)
    tensors = load_tensors(path, MODEL_FILE, meta)
    misfit = weight_misfit(model.state_dict(), tensors)
    if misfit:
        raise CheckpointError(f"{Path(path) / MODEL_FILE}: weights do not fit the config ({misfit})")
    check_finite(tensors, f"{Path(path) / MODEL_FILE}:")
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
