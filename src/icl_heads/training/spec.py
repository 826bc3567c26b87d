"""What to train: :class:`TrainSpec` (one model), :class:`Member` (one model of a stack and its
folder), and how members group into stacks of one architecture."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import ConfigError, ModelConfig, Preset, TaskConfig, TrainConfig
from ..model import Transformer


@dataclass(frozen=True)
class TrainSpec:
    """Everything that defines one training run (a preset reduces to this per head count)."""

    task: TaskConfig
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    preset: str | None = None
    # the whole preset (overrides included), recorded so that loading can check the name and
    # architecture against it: a name edited in meta.json used to pass silently
    preset_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @classmethod
    def from_preset(cls, preset: Preset, n_heads: int) -> "TrainSpec":
        if n_heads < 1 or preset.model.d_model % n_heads:
            raise ConfigError(f"heads: must divide model.d_model={preset.model.d_model} (got {n_heads})")
        return cls(preset.task, preset.model_config_for(n_heads), preset.train, preset.seed, preset.name,
                   preset.model_dump())


@dataclass
class TrainResult:
    model: Transformer
    path: Path
    meta: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_spec(preset_or_spec: Preset | TrainSpec, n_heads: int | None) -> TrainSpec:
    """A :class:`TrainSpec` from a preset and a head count, or a spec with its head count replaced."""
    if isinstance(preset_or_spec, Preset):
        if n_heads is None:
            raise ConfigError("heads: a head count is needed to train from a preset")
        return TrainSpec.from_preset(preset_or_spec, n_heads)
    if n_heads is not None and n_heads != preset_or_spec.model.n_heads:
        model = ModelConfig.model_validate({**preset_or_spec.model.model_dump(), "n_heads": n_heads})
        return TrainSpec(preset_or_spec.task, model, preset_or_spec.train, preset_or_spec.seed, preset_or_spec.preset,
                         preset_or_spec.preset_config)
    return preset_or_spec


def run_meta(spec: TrainSpec) -> dict[str, Any]:
    """The part of a checkpoint's ``meta.json`` that says which run it is (snapshots carry it too)."""
    meta = {"task": spec.task.model_dump(), "train": spec.train.model_dump(), "seed": spec.seed,
            "preset": spec.preset}
    if spec.preset_config is not None:
        meta["preset_config"] = spec.preset_config
    return meta


@dataclass(frozen=True)
class Member:
    """One model of a stack: what to train and where its checkpoint goes."""

    spec: TrainSpec
    out: Path


def members_for(preset: Preset, heads: Sequence[int], seeds: Sequence[int],
                out: Callable[[int, int], str | Path]) -> list[Member]:
    """One member per (seed, head count) of ``preset``; ``out(seed, h)`` is its checkpoint folder."""
    members = []
    for seed in seeds:
        p = preset.model_copy(update={"seed": seed})
        members += [Member(TrainSpec.from_preset(p, h), Path(out(seed, h))) for h in heads]
    return members


def arch_key(spec: TrainSpec) -> dict[str, Any]:
    """What the members of one stack share: task, train config, model config but the head count."""
    model = spec.model.model_dump()
    model.pop("n_heads")
    return {"task": spec.task.model_dump(), "train": spec.train.model_dump(), "model": model}


def group_stacks(members: Sequence[Member]) -> list[list[Member]]:
    """Split ``members`` into stacks of one architecture each (first-appearance order kept)."""
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(json.dumps(arch_key(m.spec), sort_keys=True), []).append(m)
    return list(groups.values())


def stack_dir_for(members: Sequence[Member], root: str | Path) -> Path:
    """A stable folder name for the stack of exactly these members under ``root``."""
    key = json.dumps([[str(m.out), m.spec.seed, m.spec.model.n_heads, arch_key(m.spec)] for m in members],
                     sort_keys=True)
    return Path(root) / f"stack-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def members_meta(members: Sequence[Member]) -> list[dict[str, Any]]:
    return [{"out": str(m.out), "seed": m.spec.seed, "n_heads": m.spec.model.n_heads, "preset": m.spec.preset}
            for m in members]
