"""Typed, validated configuration and the named presets of SPEC section 2.

Every experiment takes a :class:`Preset`. Configs are pydantic models so that a
bad value fails at load time with the field named (see :func:`describe_error`),
and so that the resolved config can be written beside every result as JSON.
Values the paper does not pin down are ours; ``docs/presets.md`` says which.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Upper bounds of every count and size (issue 26): far above any real run (paper: 50k steps, 4 layers,
# d = 20), low enough that a typo (``--set train.steps=1e30``) is refused at once instead of running until
# killed. The command line takes its own counts' bounds from here too.
MAX_STEPS = 10_000_000  # training and fine-tuning steps (the zoo's longest run: 32k)
MAX_PROMPTS = 1_000_000  # prompts per set (--prompts, eval.*, train.n_eval_prompts)
MAX_BATCH = 65_536
MAX_SEEDS = 1_000  # training seeds per run (--seeds, preset.seeds)
MAX_SEED = 2**32 - 1  # a seed value
MAX_DIM = 4_096  # task.d, task.n_max, model.d_model
MAX_LAYERS = 256
MAX_HEADS = 4_096
MAX_THREADS = 1_024  # train.threads; the command line also caps --threads/--jobs at the CPU cores
MAX_SNAPSHOTS = 1_000
MAX_BOOT = 1_000_000  # bootstrap resamples (--boot)


def _is_number_type(tp: Any) -> bool:
    """Whether a field annotation is (a list of / an optional) int or float."""
    if tp in (int, float):
        return True
    return any(_is_number_type(a) for a in typing.get_args(tp))


class _Strict(BaseModel):
    """Unknown fields, NaN and inf are errors: no field of ours can mean a non-finite number, and
    one accepted NaN surfaces minutes later as a scikit-learn or LinAlg traceback (issue 18).
    Booleans are not numbers either: pydantic would read ``--set train.steps=true`` as 1 (issue 26)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for name, f in cls.model_fields.items():
                value = raw.get(name)
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, bool) for v in values) and _is_number_type(f.annotation):
                    raise ValueError(f"{name}: must be a number, not a boolean (got {value!r})")
                if f.annotation is bool and name in raw and not isinstance(value, bool):
                    raise ValueError(f"{name}: must be true or false (got {value!r})")
        return raw


class TaskConfig(_Strict):
    """In-context sparse linear regression: x ~ N(0, I_d), s-sparse w*, noise sigma."""

    d: int = Field(ge=1, le=MAX_DIM, description="covariate dimension")
    s: int = Field(ge=1, le=MAX_DIM, description="support size of w*")
    tau: float = Field(default=1.0, gt=0, description="std of the non-zero weights")
    sigma: float = Field(ge=0, description="label-noise std")
    n_max: int = Field(ge=1, le=MAX_DIM, description="largest context length")

    @model_validator(mode="after")
    def _s_le_d(self) -> "TaskConfig":
        if self.s > self.d:
            raise ValueError(f"s: must be <= d (got s={self.s}, d={self.d})")
        return self


class ArchConfig(_Strict):
    """A preset's architecture: every :class:`ModelConfig` field except the task's sizes and the head count.

    ``n_dims`` and ``n_max`` always come from the task and the head count from the
    preset's ``heads`` list, so one preset describes the models of every head count
    (``--set model.token_format=interleaved``, ``model.mlp=true``, ``model.n_layers=6``).
    """

    d_model: int = Field(ge=1, le=MAX_DIM)
    n_layers: int = Field(ge=1, le=MAX_LAYERS)
    attention: Literal["softmax", "linear"] = "softmax"
    mlp: bool = True
    pos_emb: bool = True
    layer_norm: bool = True
    token_format: Literal["pair", "interleaved"] = "pair"
    mask: Literal["prefix", "full"] = "prefix"

    @model_validator(mode="after")
    def _format_mask(self) -> "ArchConfig":
        if self.token_format == "interleaved" and self.mask != "prefix":
            raise ValueError("mask: 'full' needs token_format='pair'")
        return self


class ModelConfig(ArchConfig):
    """GPT-2-style pre-LN decoder (SPEC section 3): the architecture plus the task's sizes
    (``n_dims``, ``n_max``) and the head count."""

    n_dims: int = Field(ge=1, le=MAX_DIM)
    n_max: int = Field(ge=1, le=MAX_DIM)
    n_heads: int = Field(ge=1, le=MAX_HEADS)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model (got d_model={self.d_model}, n_heads={self.n_heads})")
        return self


class TrainConfig(_Strict):
    """AdamW on fresh prompts every step; warm-up, then cosine (fixed length) or constant (wsd, extendable)."""

    steps: int = Field(ge=1, le=MAX_STEPS)
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    lr: float = Field(gt=0)
    min_lr_frac: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=200, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    curriculum: bool = False
    curriculum_start_frac: float = Field(default=0.25, gt=0, le=1, description="first n_max as a fraction")
    curriculum_steps_frac: float = Field(default=0.5, gt=0, le=1, description="share of steps spent ramping")
    curriculum_d: bool = Field(default=False, description="also ramp the number of active coordinates (rest zero)")
    curriculum_ramp_steps: int = Field(default=0, ge=0, le=MAX_STEPS, description="ramp length in steps; 0 = curriculum_steps_frac * steps "
                                       "(a wsd run sets it, so extending the run leaves its past unchanged)")
    schedule: Literal["cosine", "wsd"] = Field(default="cosine", description="cosine: warm-up, cosine to min_lr_frac * lr "
                                               "at `steps`; wsd: warm-up, then constant (extendable; cool-downs are branches)")
    cooldown_from: int = Field(default=0, ge=0, le=MAX_STEPS, description="wsd cool-down branch: the stable step it starts from; the lr "
                               "decays linearly from lr to 0 between it and `steps` (0 = no cool-down)")
    eval_every: int = Field(default=500, ge=1, le=MAX_STEPS)
    n_eval_prompts: int = Field(default=512, ge=1, le=MAX_PROMPTS)
    checkpoint_every: int = Field(default=500, ge=1, le=MAX_STEPS)
    threads: int = Field(default=0, ge=0, le=MAX_THREADS, description="torch threads on CPU; 0 = torch default")
    snapshots: int = Field(default=0, ge=0, le=MAX_SNAPSHOTS, description="weights-only snapshots per run at log-spaced steps; 0 = none")
    bf16: bool = Field(default=False, description="CUDA only: bf16 autocast of the forward pass (loss in fp32)")
    compile: bool = Field(default=False, description="CUDA only: torch.compile the model for training")

    @model_validator(mode="after")
    def _cooldown(self) -> "TrainConfig":
        if self.cooldown_from and self.schedule != "wsd":
            raise ValueError("cooldown_from: a cool-down branch needs schedule='wsd'")
        if self.cooldown_from >= self.steps:
            raise ValueError(f"cooldown_from: must be below steps (got {self.cooldown_from} >= {self.steps})")
        return self


class EvalConfig(_Strict):
    """Sizes of the validation (hyper-parameter tuning) and test prompt sets."""

    n_val: int = Field(default=1000, ge=2, le=MAX_PROMPTS)
    n_test: int = Field(default=2000, ge=2, le=MAX_PROMPTS)
    pto_steps: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] = Field(default=[1, 2, 3, 5, 10, 20, 50, 100, 200, 400])
    n_emergence: int = Field(default=1000, ge=2, le=MAX_PROMPTS, description="val and test prompts per E7 training snapshot")


class Preset(_Strict):
    """A complete, named experimental setting."""

    name: str
    task: TaskConfig
    sigmas: list[Annotated[float, Field(ge=0)]] = Field(default_factory=list, max_length=64, description="extra noise levels swept by E5 on this preset")
    model: ArchConfig
    heads: list[Annotated[int, Field(ge=1, le=MAX_HEADS)]] = Field(min_length=1, max_length=64)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    seeds: int = Field(default=3, ge=1, le=MAX_SEEDS, description="training seeds reproduce runs by default (seed, seed+1, ...)")

    @model_validator(mode="after")
    def _heads_ok(self) -> "Preset":
        for h in self.heads:
            if h < 1 or self.model.d_model % h:
                raise ValueError(f"heads: every head count must divide model.d_model={self.model.d_model} (got {h})")
        return self

    def model_config_for(self, n_heads: int) -> ModelConfig:
        """The full model config of this preset's model with ``n_heads`` heads."""
        return ModelConfig(n_dims=self.task.d, n_max=self.task.n_max, n_heads=n_heads, **self.model.model_dump())


class ExecutorConfig(_Strict):
    """Where the many trainings (and zoo analyses) of a command run (``--executor``, ``--set executor.*``,
    ``docs/cluster.md``): ``local`` (processes on this machine, the default), ``debug`` (in this process,
    one after another) or ``slurm`` (one submitit job per model or stack, as one job array).

    The resources are per job; ``folder`` (default ``<out or work>/jobs``) holds submitit's pickles,
    sbatch scripts and logs and must be on a file system the compute nodes share."""

    kind: Literal["local", "debug", "slurm"] = "local"
    folder: str | None = Field(default=None, min_length=1, description="job folder (default: <out>/jobs)")
    partition: str | None = Field(default=None, min_length=1, description="Slurm partition (default: the cluster's)")
    time_min: int = Field(default=240, ge=1, description="wall-time limit per job in minutes (sbatch --time)")
    gpus: int = Field(default=0, ge=0, description="GPUs per job; >= 1 trains on cuda (stacked by default)")
    cpus: int = Field(default=1, ge=1, description="CPU cores per job (and torch threads of a separate model)")
    mem_gb: float | None = Field(default=None, gt=0, description="memory per job (default: the partition's)")
    array_parallelism: int = Field(default=64, ge=1, description="jobs of one array running at once")
    max_requeues: int = Field(default=3, ge=0, description="requeues after a timeout before a job gives up")
    poll_s: float = Field(default=30.0, gt=0, description="seconds between progress checks while waiting")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job "
                                                               "(module load, source .venv/bin/activate)")
    slurm: dict[str, str | int | bool] = Field(default_factory=dict, description="more #SBATCH options, e.g. "
                                                                           "{\"account\": \"lab\", \"qos\": \"high\"}")
    wait: bool = Field(default=True, description="wait for the jobs with progress (--no-wait: submit and return)")


_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        task=dict(d=5, s=2, sigma=0.1, n_max=10),
        model=dict(d_model=32, n_layers=2), heads=[1, 2],
        train=dict(steps=300, batch_size=64, lr=3e-3, warmup_steps=30, eval_every=100,
                   n_eval_prompts=128, checkpoint_every=100, snapshots=4),
        eval=dict(n_val=200, n_test=400, pto_steps=[1, 5, 20, 100], n_emergence=200), seeds=2,
    ),
    "quick": dict(
        task=dict(d=10, s=2, sigma=0.1, n_max=20),
        model=dict(d_model=64, n_layers=3, mlp=False), heads=[1, 2, 4],  # attention-only: 2x the steps/s (docs/training.md)
        train=dict(steps=8000, batch_size=64, lr=4e-3, warmup_steps=200, eval_every=1000,
                   n_eval_prompts=512, checkpoint_every=1000, snapshots=8),
        eval=dict(n_val=1000, n_test=2000), seeds=5,  # SPEC: claims decided over 5 seeds (docs/report.md, power)
    ),
    "paper": dict(
        task=dict(d=20, s=3, sigma=0.1, n_max=40), sigmas=[0.0, 0.5],
        model=dict(d_model=256, n_layers=4), heads=[1, 2, 4, 8],
        train=dict(steps=50000, batch_size=128, lr=5e-4, warmup_steps=2000, eval_every=2000,
                   n_eval_prompts=1024, checkpoint_every=2000, curriculum=True, snapshots=8),
        eval=dict(n_val=1000, n_test=2000),  # as quick: CIs are ample at 2000, and E6's algorithm paths scale with it
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> Preset:
    """Return a validated preset; ``overrides`` are dotted paths, e.g. ``{"task.d": 8}``."""
    if name not in _PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (choose from {', '.join(PRESET_NAMES)})")
    raw = _deep_copy(_PRESETS[name])
    raw["name"] = name
    return validate(Preset, _set_dotted(raw, overrides))


def with_overrides(preset: Preset, **overrides: Any) -> Preset:
    """``preset`` with dotted-path ``overrides`` (as :func:`get_preset` takes them), validated again."""
    return validate(Preset, _set_dotted(preset.model_dump(), overrides))


def _set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for path, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = path.split(".")
        if not all(path.split(".")):
            raise ConfigError(f"set: {path!r} has an empty part (expected a dotted path such as train.steps)")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # task.d.x=1: task.d is a number, not a group of fields
                raise ConfigError(f"{'.'.join(parents[:i + 1])}: is a value, not a group of fields "
                                  f"(cannot set {path})")
        node[leaf] = value
    return raw


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line naming the field."""


def validate(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_error(e)) from None


def describe_error(e: ValidationError) -> str:
    """One line naming the first offending field, e.g. ``task.s: s must be <= d (got s=12, d=10)``."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and ": " in msg:  # our validators say "<field>: <why>"
        name, msg = msg.split(": ", 1)
        loc.append(name)
    field = ".".join(loc) or e.title
    if "input" in err and not isinstance(err["input"], dict) and err["type"] != "value_error":
        msg = f"{msg} (got {err['input']!r})"
    return f"{field}: {msg}"


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}
