"""Training the transformer on fresh prompts every step (SPEC section 3; ``docs/training.md``).

One call of :func:`train` trains one model and keeps a resumable checkpoint in
``out_dir`` (``checkpoint.save_checkpoint``: weights, ``meta.json`` and a
``state.safetensors`` with the AdamW moments and both RNG states). Because
every random draw comes from two generators whose states are checkpointed (the
``train`` prompt stream and torch's global RNG), ``resume=True`` continues
bit-identically on CPU: an interrupted run ends with the same weights as an
uninterrupted one (tested).

Choices where the SPEC is silent:

* loss: MSE against the noisy label ``y_k`` over *all* query positions
  (context lengths ``0..n``), the all-prefixes pass of the SPEC;
* schedule: linear warm-up to ``lr``, then cosine down to ``min_lr_frac * lr``;
* curriculum over ``n`` (Garg et al. 2022): the prompts of step ``t`` have
  ``n_cur(t)`` examples, rising linearly from ``curriculum_start_frac * n_max``
  to ``n_max`` over ``curriculum_steps_frac`` of the run;
* curriculum over ``d`` (``curriculum_d``): the same ramp over the number of
  active coordinates; prompts are drawn in ``d_cur`` dimensions (support size
  ``min(s, d_cur)``) and the trailing ``d - d_cur`` coordinates are zero, so
  the model's input width never changes;
* snapshots (``train.snapshots = k``): weights-only checkpoints at the
  log-spaced steps of :func:`snapshot_steps` in ``out/snapshots/step{step:06d}/``,
  loadable by ``checkpoint.load_model`` like the main checkpoint, for
  learning-dynamics analyses. They are a pure function of the run, so a resumed
  run writes the missing ones with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_meta, load_model, load_tensors, save_checkpoint, STATE_FILE
from .claims.keys import ModelKey
from .config import ConfigError, ModelConfig, Preset, TaskConfig, TrainConfig
from .evaluation import evaluate
from .io import write_csv, write_provenance
from .model import Transformer
from .tasks import Prompts, fixed_prompts, generator, sample_prompts, stream_seed

EVAL_STREAM = "eval"  # validation prompts used *during* training (never the E5 "val"/"test" streams)


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


# --------------------------------------------------------------------------- schedules

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine to ``min_lr_frac * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _ramp(step: int, cfg: TrainConfig, full: int) -> int:
    start = max(1, math.ceil(cfg.curriculum_start_frac * full))
    t = min(step / max(cfg.curriculum_steps_frac * cfg.steps, 1), 1.0)
    return min(full, start + round(t * (full - start)))


def curriculum(step: int, cfg: TrainConfig, task: TaskConfig) -> tuple[int, int]:
    """``(n, d)`` used at ``step``: the curriculum values, or ``(n_max, d)`` without curriculum."""
    n = _ramp(step, cfg, task.n_max) if cfg.curriculum else task.n_max
    d = _ramp(step, cfg, task.d) if cfg.curriculum_d else task.d
    return n, d


def train_prompts(task: TaskConfig, batch: int, gen: torch.Generator, n: int, d: int) -> Prompts:
    """Fresh training prompts with ``n + 1`` examples and only the first ``d`` coordinates active."""
    if d == task.d:
        return sample_prompts(task, batch, gen, n=n)
    sub = task.model_copy(update={"d": d, "s": min(task.s, d)})
    p = sample_prompts(sub, batch, gen, n=n)
    pad = task.d - d
    return Prompts(F.pad(p.x, (0, pad)), p.y, F.pad(p.w, (0, pad)), p.f)


def snapshot_steps(cfg: TrainConfig) -> list[int]:
    """The ``cfg.snapshots`` steps at which a snapshot is kept: halvings back from the last step.

    ``step_i = steps // 2**(k-1-i)`` for ``i = 0..k-1`` (``k = cfg.snapshots``), so
    consecutive snapshots are a factor ~2 apart and the last one is ``cfg.steps``
    (e.g. 8000 steps, k=8: 62, 125, 250, ..., 4000, 8000). Where short runs make
    these collide or hit 0, each is pushed to one step after its predecessor and
    the list is then capped from the end so that it still ends at ``cfg.steps``;
    with ``k >= steps`` every step is a snapshot.
    """
    k, steps = cfg.snapshots, cfg.steps
    if k == 0:
        return []
    if k >= steps:
        return list(range(1, steps + 1))
    out: list[int] = []
    for i in range(k):
        out.append(max(steps // 2 ** (k - 1 - i), out[-1] + 1 if out else 1))
    for i in range(k - 1, -1, -1):  # cap from the end: step_i <= steps - (k-1-i)
        out[i] = min(out[i], steps - (k - 1 - i))
    return out


def snapshot_dir(out: str | Path, step: int) -> Path:
    """Folder of the snapshot at ``step`` of the run in ``out``."""
    return Path(out) / "snapshots" / f"step{step:06d}"


def save_snapshot(out: str | Path, model: Transformer, meta: dict[str, Any], step: int) -> Path | None:
    """Write the weights-only snapshot of ``step`` unless it exists (a resumed run keeps earlier ones).

    ``meta`` is the run's meta (task, train, seed, preset); nothing wall-clock
    dependent goes in, so the files depend on the weights alone.
    """
    path = snapshot_dir(out, step)
    if (path / "meta.json").exists():
        return None
    return save_checkpoint(path, model, {**meta, "step": step, "snapshot": True})


# --------------------------------------------------------------------------- state (de)serialisation

def _state_tensors(opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """AdamW moments and both RNG states as a flat dict of tensors (safetensors has no pickle)."""
    out: dict[str, torch.Tensor] = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            out[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    out["rng.train"] = gen.get_state()
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_state(tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
                   path: Path) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    if len(state) != sum(len(g["params"]) for g in sd["param_groups"]) or "rng.train" not in tensors:
        raise CheckpointError(f"{path / STATE_FILE}: optimizer/RNG state does not fit this model")
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    gen.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _make_optimizer(model: Transformer, cfg: TrainConfig, device: str = "cpu") -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not biases, LayerNorm or embeddings), as in GPT-2.

    On CUDA the fused kernel (one launch for all parameters); on CPU torch's default.
    """
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), **fused)


@contextmanager
def cuda_fast_math(device: str) -> Iterator[None]:
    """TF32 matmuls while training on CUDA; restored afterwards, so evaluation stays full fp32.

    Through ``torch.set_float32_matmul_precision`` (one setting for every backend): mixing it with
    the per-backend ``fp32_precision`` flags makes later precision queries raise in torch >= 2.9.
    cuDNN (convolutions only, none here) already defaults to TF32.
    """
    if not device.startswith("cuda"):
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------- training

def _spec(preset_or_spec: Preset | TrainSpec, n_heads: int | None) -> TrainSpec:
    if isinstance(preset_or_spec, Preset):
        if n_heads is None:
            raise ConfigError("heads: a head count is needed to train from a preset")
        return TrainSpec.from_preset(preset_or_spec, n_heads)
    if n_heads is not None and n_heads != preset_or_spec.model.n_heads:
        model = ModelConfig.model_validate({**preset_or_spec.model.model_dump(), "n_heads": n_heads})
        return TrainSpec(preset_or_spec.task, model, preset_or_spec.train, preset_or_spec.seed, preset_or_spec.preset,
                         preset_or_spec.preset_config)
    return preset_or_spec


def _run_meta(spec: TrainSpec) -> dict[str, Any]:
    meta = {"task": spec.task.model_dump(), "train": spec.train.model_dump(), "seed": spec.seed,
            "preset": spec.preset}
    if spec.preset_config is not None:
        meta["preset_config"] = spec.preset_config
    return meta


def is_finished(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint whose training ran to the end."""
    try:
        return bool(load_meta(path).get("finished"))
    except CheckpointError:
        return False


def train(preset_or_cfgs: Preset | TrainSpec, n_heads: int | None, out_dir: str | Path,
          device: str = "cpu", resume: bool = False, *, progress: bool = True,
          stop_at: int | None = None, on_eval: Callable[[dict[str, float]], None] | None = None,
          position: int = 0) -> TrainResult:
    """Train one model; checkpoint (resumable) in ``out_dir``; return the model and its meta.

    ``resume=True`` continues from the checkpoint in ``out_dir`` (it must come from
    the same task/train config and seed) or starts afresh if there is none;
    ``resume=False`` refuses to overwrite an existing checkpoint. ``stop_at``
    stops after that many steps, as an interrupt would, leaving a resumable
    checkpoint (used by tests and time-boxed runs).
    """
    from .folders import folder_lock

    with folder_lock(out_dir):  # one writer per checkpoint folder (two trainings used to interleave files)
        return _train(_spec(preset_or_cfgs, n_heads), Path(out_dir), device, resume, progress, stop_at, on_eval,
                      position)


def _train(spec: TrainSpec, out: Path, device: str, resume: bool, progress: bool, stop_at: int | None,
           on_eval: Callable[[dict[str, float]], None] | None, position: int) -> TrainResult:
    """:func:`train`'s body, run while the checkpoint folder's lock is held."""
    cfg, task = spec.train, spec.task
    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    have_ckpt = (out / "meta.json").exists()
    if have_ckpt and not resume:
        raise ConfigError(f"out: {out} already holds a checkpoint (pass --resume to continue it)")

    torch.manual_seed(stream_seed(spec.seed, "init"))
    model = Transformer(spec.model).to(device)
    gen = generator(spec.seed, "train", device)
    opt = _make_optimizer(model, cfg, device)
    step, history, wall = 0, [], 0.0
    if have_ckpt:
        model, meta = load_model(out, device)
        want = {**_run_meta(spec), "model_config": spec.model.model_dump()}
        want.pop("preset_config", None)  # provenance: task, train, model and seed decide whether it resumes
        got = {k: meta.get(k) for k in want}
        try:  # train fields added since the checkpoint was written take their defaults
            got["train"] = TrainConfig.model_validate(got["train"]).model_dump()
        except ValueError:
            pass
        if got != want:
            bad = next(k for k in want if got[k] != want[k])
            raise ConfigError(f"resume: checkpoint in {out} was made with a different {bad}")
        opt = _make_optimizer(model, cfg, device)
        _restore_state(load_tensors(out, STATE_FILE, meta), opt, gen, out)
        step, history, wall = int(meta["step"]), list(meta.get("history", [])), float(meta.get("wall_s", 0.0))
        if meta.get("finished"):
            return TrainResult(model, out, meta, history)
    else:
        write_provenance(out, {"task": task, "model": spec.model, "train": cfg}, spec.seed, preset=spec.preset)

    val = fixed_prompts(task, cfg.n_eval_prompts, spec.seed, EVAL_STREAM)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    model.train()

    def checkpoint(finished: bool) -> dict[str, Any]:
        meta = {**_run_meta(spec), "step": step, "finished": finished, "wall_s": wall, "history": history}
        save_checkpoint(out, model, meta, _state_tensors(opt, gen))
        write_csv(out / "train_log.csv", history or [{"step": 0}])
        return meta

    bar = _progress(progress, start=step, total=cfg.steps, desc=f"h={spec.model.n_heads}", position=position)
    snaps = set(snapshot_steps(cfg))
    cuda = device.startswith("cuda")
    fwd = torch.compile(model) if cfg.compile and cuda else model
    ema: Any = None  # a float on CPU; a device tensor on CUDA, read only at evaluation steps (no per-step sync)
    t0 = time.perf_counter()
    with cuda_fast_math(device):
        while step < end:
            n, d = curriculum(step, cfg, task)
            p = train_prompts(task, cfg.batch_size, gen, n, d)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            if cfg.bf16 and cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    pred = fwd(p.x, p.y)
                loss = F.mse_loss(pred.float(), p.y)
            else:
                loss = F.mse_loss(fwd(p.x, p.y), p.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if step in snaps:
                save_snapshot(out, model, _run_meta(spec), step)
            if cuda:
                ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()
            else:
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if bar is not None:
                bar.update(1)
                if not cuda:
                    bar.set_postfix(loss=f"{ema:.4f}", n=n, refresh=False)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                row = {"step": step, "wall_s": round(wall, 2), "lr": lr_at(step - 1, cfg), "loss_ema": float(ema),
                       **_val_summary(model, val, task)}
                history.append(row)
                if on_eval is not None:
                    on_eval(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(ema):.4f}",
                                    **{k: f"{v:.4f}" for k, v in row.items() if k.startswith("r@")})
            if step % cfg.checkpoint_every == 0 or step == end:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(step == cfg.steps)
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(model, out, load_meta(out), history)


def _val_summary(model: Transformer, val: Prompts, task: TaskConfig) -> dict[str, float]:
    """Normalised excess risk on the fixed validation prompts at ``n = d/2, d, 2d`` (capped at n_max)."""
    curve = evaluate(model, val, task)
    return {f"r@{n}": float(curve.risk_norm[n]) for n in marker_ns(task)}


def marker_ns(task: TaskConfig) -> list[int]:
    """The context lengths the docs report: ``d/2``, ``d`` and ``2d`` (capped at ``n_max``)."""
    return sorted({min(max(task.d // 2, 1), task.n_max), min(task.d, task.n_max), min(2 * task.d, task.n_max)})


def _progress(enabled: bool, start: int, total: int, desc: str, position: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                position=position)


def evaluate_checkpoint(ckpt: str | Path, out: str | Path, device: str = "cpu",
                        n_test: int | None = None) -> list[dict[str, Any]]:
    """``icl-heads eval``: risk vs n with 95% bands on the run's test prompts; CSV, PNG and config JSON.

    The test prompts are ``fixed_prompts(task, n_test, seed, "test")`` with the task
    and seed stored in the checkpoint, i.e. the prompts E1 and E5 use.
    """
    from .config import get_preset
    from .plotting import risk_vs_n

    model, meta = load_model(ckpt, device)
    if "task" not in meta:
        raise CheckpointError(f"{Path(ckpt) / 'meta.json'}: no task config (not made by icl-heads train)")
    task, seed = TaskConfig.model_validate(meta["task"]), int(meta.get("seed", 0))
    if n_test is None:
        n_test = get_preset(meta["preset"]).eval.n_test if meta.get("preset") in _preset_names() else 2000
    if n_test < 2:
        raise ConfigError(f"prompts: need at least 2 test prompts for a confidence band (got {n_test})")
    out = Path(out)
    label = ModelKey(model.cfg.n_heads).e1_label
    rows = [r for r in evaluate(model, fixed_prompts(task, n_test, seed, "test"), task).rows(label=label)]
    write_csv(out / "risk.csv", rows)
    risk_vs_n({label: rows}, out / "risk.png", f"{label}, step {meta.get('step')} (d={task.d}, s={task.s})")
    write_provenance(out, {"task": task, "model": model.cfg}, seed, experiment="eval", checkpoint=str(ckpt),
                     step=meta.get("step"), n_test=n_test)
    return rows


def _preset_names() -> tuple[str, ...]:
    from .config import PRESET_NAMES

    return PRESET_NAMES
