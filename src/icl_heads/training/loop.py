"""The one training loop, for one model and for a stack of ``M`` models (SPEC section 3;
``docs/training.md``).

:func:`run_steps` is the step every training here takes: draw prompts, set the learning rate,
forward, loss, backward, clip, AdamW. A :class:`Trainee` says how for what is trained:

* :class:`One` — one :class:`~icl_heads.model.Transformer` (a stack of one *is* a model): MSE,
  ``clip_grad_norm_``. :func:`train` and fine-tuning (``analysis.pruning.finetune``) use it.
* :class:`Stack` — a :class:`~icl_heads.model.stacked.StackedTransformer`: the *sum* of the
  members' MSEs, so each member's gradient is its own; AdamW is elementwise, so one AdamW over the
  stack is per-member AdamW; gradient clipping is per member (each member's global norm).
  :func:`train_stack` uses it; each member is what :func:`train` would train, up to float
  rounding of batched vs single matmuls.

:func:`_scheduled` wraps the steps with what a full run adds (log-spaced snapshots, evaluation
every ``eval_every`` steps, checkpoints every ``checkpoint_every``, the loss EMA, a progress bar).

One call of :func:`train` trains one model and keeps a resumable checkpoint in ``out_dir``
(``checkpoint.save_checkpoint``: weights, ``meta.json`` and a ``state.safetensors`` with the AdamW
moments and both RNG states, :mod:`.state`). Because every random draw comes from generators whose
states are checkpointed (the ``train`` prompt stream and torch's global RNG), ``resume=True``
continues bit-identically on CPU: an interrupted run ends with the same weights as an
uninterrupted one (tested); the same holds for a stack, whose state lives in its own folder.

Choices where the SPEC is silent:

* loss: MSE against the noisy label ``y_k`` over *all* query positions
  (context lengths ``0..n``), the all-prefixes pass of the SPEC;
* schedule: linear warm-up to ``lr``, then cosine down to ``min_lr_frac * lr`` (:mod:`.schedule`);
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import META_FILE, STATE_FILE, CheckpointError, load_meta, load_model, load_tensors, save_checkpoint
from ..config import ConfigError, Preset, TaskConfig, TrainConfig
from ..evaluation import evaluate
from ..folders import folder_lock
from ..io import write_csv, write_provenance
from ..model import Transformer
from ..model.stacked import StackedTransformer
from ..tasks import Prompts, fixed_prompts, generator, stream_seed
from .schedule import EVAL_STREAM, curriculum, lr_at, marker_ns, snapshot_dir, snapshot_steps, train_prompts
from .spec import (Member, TrainResult, TrainSpec, arch_key, group_stacks, members_meta, resolve_spec, run_meta)
from .state import (load_stack_state, make_optimizer, model_state, restore_model_state, save_stack_state)

# (x, y, extra forward keyword arguments) of one step
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


# --------------------------------------------------------------------------- what is trained

class One:
    """One model: ``F.mse_loss`` and ``clip_grad_norm_`` over its parameters (``M = 1``)."""

    def __init__(self, model: Transformer, fwd: Callable[..., torch.Tensor] | None = None):
        self.model, self.fwd = model, model if fwd is None else fwd
        self.n_members = 1

    def forward(self, batch: Batch) -> torch.Tensor:
        x, y, extra = batch
        return self.fwd(x, y, **extra)

    def losses(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.mse_loss(pred.float(), batch[1])  # 0-d

    def backward(self, losses: torch.Tensor) -> None:
        losses.backward()

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def member(self, i: int) -> Transformer:
        return self.model

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters())

    matrix_dim = 2


class Stack:
    """``M`` models as one :class:`StackedTransformer`: the sum of the members' MSEs, per-member clipping."""

    def __init__(self, stack: StackedTransformer, fwd: Callable[..., torch.Tensor] | None = None):
        self.stack, self.fwd = stack, stack if fwd is None else fwd
        self.n_members = len(stack.heads)

    def forward(self, batch: Batch) -> torch.Tensor:
        x, y, extra = batch
        return self.fwd(x, y, **extra)

    def losses(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (pred.float() - batch[1]).pow(2).mean(dim=(1, 2))  # (M,): each member's MSE

    def backward(self, losses: torch.Tensor) -> None:
        losses.sum().backward()

    def clip(self, max_norm: float) -> None:
        clip_per_member([self.stack.w(n) for n in self.stack.names], max_norm)

    def member(self, i: int) -> Transformer:
        return self.stack.member(i)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, self.stack.w(n)) for n in self.stack.names]

    matrix_dim = 3


Trainee = One | Stack


class TrainingDiverged(ConfigError):
    """The loss became NaN or inf: the run stops; it is not marked finished, its last finite checkpoint is kept."""


def clip_per_member(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to global norm ``max_norm`` (as ``clip_grad_norm_`` does per model).

    Returns the ``(M,)`` norms before clipping; no host sync.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


def optimizer_for(trainee: Trainee, cfg: TrainConfig, device: str = "cpu") -> torch.optim.AdamW:
    """AdamW with the GPT-2 grouping (:func:`.state.param_groups`) for a model or a stack."""
    return make_optimizer(trainee.named_parameters(), cfg.lr, cfg.weight_decay, device, trainee.matrix_dim)


# --------------------------------------------------------------------------- the step and the loop

def train_step(trainee: Trainee, opt: torch.optim.Optimizer, batch: Batch, lr: float | None, grad_clip: float,
               amp: bool = False) -> torch.Tensor:
    """One AdamW step on ``batch``; the loss (0-d for :class:`One`, ``(M,)`` for :class:`Stack`), on the device."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        pred = trainee.forward(batch)
    losses = trainee.losses(pred, batch)
    opt.zero_grad(set_to_none=True)
    trainee.backward(losses)
    trainee.clip(grad_clip)
    opt.step()
    return losses


def run_steps(trainee: Trainee, opt: torch.optim.Optimizer, start: int, end: int, draw: Callable[[int], Batch],
              grad_clip: float, lr: Callable[[int], float] | None = None, amp: bool = False,
              after: Callable[[int, torch.Tensor], None] | None = None) -> int:
    """Steps ``start .. end - 1`` (0-based): ``draw(step)`` gives the batch, ``lr(step)`` the learning rate
    (None: leave it), ``after(step + 1, losses)`` runs after each step. Returns the step reached."""
    step = start
    while step < end:
        losses = train_step(trainee, opt, draw(step), None if lr is None else lr(step), grad_clip, amp)
        step += 1
        if after is not None:
            after(step, losses)
    return step


@dataclass
class _Progress:
    """What a scheduled run carries from step to step (and, for a stack, across a resume)."""

    step: int = 0
    wall: float = 0.0
    ema: Any = None  # host float (one model on CPU) or device tensor (CUDA, stacks): no per-step sync there
    histories: list[list[dict[str, Any]]] = field(default_factory=list)


def _scheduled(trainee: Trainee, opt: torch.optim.Optimizer, members: Sequence[Member], cfg: TrainConfig,
               task: TaskConfig, device: str, state: _Progress, end: int, gens: Sequence[torch.Generator],
               which: torch.Tensor | None, write: Callable[[bool], None], progress: Any,
               on_eval: Callable[[dict[str, float]], None] | None = None, deadline: float | None = None) -> None:
    """The full run from ``state.step`` to ``end``: :func:`run_steps` plus snapshots, evaluation rows
    (one history per member), the loss EMA and checkpoints (``write(finished)``); past ``deadline``
    (``time.monotonic()``) it checkpoints and stops as an interrupt would."""
    vals = {s: fixed_prompts(task, cfg.n_eval_prompts, s, EVAL_STREAM) for s in dict.fromkeys(m.spec.seed for m in members)}
    snaps = set(snapshot_steps(cfg))
    cuda = device.startswith("cuda")
    host_ema = isinstance(trainee, One) and not cuda
    t0 = time.perf_counter()

    def draw(step: int) -> Batch:
        n, d = curriculum(step, cfg, task)
        ps = [train_prompts(task, cfg.batch_size, g, n, d) for g in gens]
        if which is None:
            return ps[0].x, ps[0].y, {}
        return torch.stack([p.x for p in ps])[which], torch.stack([p.y for p in ps])[which], {}  # (M, B, N, d)

    def after(step: int, losses: torch.Tensor) -> None:
        nonlocal t0
        state.step = step
        if host_ema:
            state.ema = losses.item() if state.ema is None else 0.98 * state.ema + 0.02 * losses.item()
        else:
            state.ema = losses.detach() if state.ema is None else 0.98 * state.ema + 0.02 * losses.detach()
        # a NaN or inf loss stays in the EMA: checked every step where it is a host float, else where the
        # run syncs anyway (evaluation, checkpoint), always before a checkpoint could be written
        late = deadline is not None and time.monotonic() >= deadline
        if (host_ema and not math.isfinite(state.ema)) or (
                not host_ema and (step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0 or step == end
                                  or late)
                and not bool(torch.isfinite(state.ema).all())):
            raise TrainingDiverged(f"train: the loss became non-finite by step {step} (diverged; try a lower "
                                   f"train.lr); not marked finished, {_last_checkpoint(members)}")
        if step in snaps:
            for i, m in enumerate(members):
                save_snapshot(m.out, trainee.member(i), run_meta(m.spec), step)
        if progress is not None:
            progress.update(1)
            if host_ema:
                progress.set_postfix(loss=f"{state.ema:.4f}", n=curriculum(step - 1, cfg, task)[0], refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            state.wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            loss_ema = [float(state.ema)] if isinstance(trainee, One) else state.ema.tolist()
            for i, m in enumerate(members):
                row = {"step": step, "wall_s": round(state.wall, 2), "lr": lr_at(step - 1, cfg),
                       "loss_ema": loss_ema[i], **_val_summary(trainee.member(i), vals[m.spec.seed], task)}
                state.histories[i].append(row)
                if on_eval is not None:
                    on_eval(row)
            if progress is not None:
                last = state.histories[0][-1] if len(members) == 1 else {}
                progress.set_postfix(loss=f"{max(loss_ema):.4f}",
                                     **{k: f"{v:.4f}" for k, v in last.items() if k.startswith("r@")})
        if step % cfg.checkpoint_every == 0 or step == end or late:
            state.wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            write(step == cfg.steps)
        if late and step < end:
            raise _Deadline

    with cuda_fast_math(device):
        try:
            run_steps(trainee, opt, state.step, end, draw, cfg.grad_clip, lambda s: lr_at(s, cfg),
                      cfg.bf16 and cuda, after)
        except _Deadline:
            pass
    if progress is not None:
        progress.close()


class _Deadline(Exception):
    """Raised after the checkpoint of the first step past a run's deadline (caught by :func:`_scheduled`)."""


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


def _last_checkpoint(members: Sequence[Member]) -> str:
    """What a diverged run leaves: its last (finite) checkpoint, or none."""
    out = members[0].out
    try:
        return f"its last finite checkpoint (step {load_meta(out)['step']}) in {out} is kept"
    except (CheckpointError, KeyError):
        return f"no checkpoint was written to {out}"


def save_snapshot(out: str | Path, model: Transformer, meta: dict[str, Any], step: int) -> Path | None:
    """Write the weights-only snapshot of ``step`` unless it exists (a resumed run keeps earlier ones).

    ``meta`` is the run's meta (task, train, seed, preset); nothing wall-clock
    dependent goes in, so the files depend on the weights alone.
    """
    path = snapshot_dir(out, step)
    if (path / "meta.json").exists():
        return None
    return save_checkpoint(path, model, {**meta, "step": step, "snapshot": True})


def _val_summary(model: Transformer, val: Prompts, task: TaskConfig) -> dict[str, float]:
    """Normalised excess risk on the fixed validation prompts at ``n = d/2, d, 2d`` (capped at n_max)."""
    curve = evaluate(model, val, task)
    return {f"r@{n}": float(curve.risk_norm[n]) for n in marker_ns(task)}


def _progress(enabled: bool, start: int, total: int, desc: str, position: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # optional at import time: only a run with a progress bar needs it

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                position=position)


# --------------------------------------------------------------------------- one model

def is_finished(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint whose training ran to the end."""
    try:
        return bool(load_meta(path).get("finished"))
    except CheckpointError:
        return False


def train(preset_or_cfgs: Preset | TrainSpec, n_heads: int | None, out_dir: str | Path,
          device: str = "cpu", resume: bool = False, *, progress: bool = True,
          stop_at: int | None = None, on_eval: Callable[[dict[str, float]], None] | None = None,
          position: int = 0, init_from: str | Path | None = None, deadline: float | None = None) -> TrainResult:
    """Train one model; checkpoint (resumable) in ``out_dir``; return the model and its meta.

    ``resume=True`` continues from the checkpoint in ``out_dir`` (it must come from
    the same task/train config and seed) or starts afresh if there is none;
    ``resume=False`` refuses to overwrite an existing checkpoint. ``stop_at``
    stops after that many steps, as an interrupt would, leaving a resumable
    checkpoint (used by tests and time-boxed runs); ``deadline`` (a ``time.monotonic()`` value) does the
    same at the first step after that time.

    ``schedule="wsd"`` runs are extendable: resuming a run with a larger ``train.steps`` continues it (the
    learning rate never depended on ``steps``). ``init_from`` starts a *cool-down branch*
    (``train.cooldown_from = T``) from the wsd run in that folder, which must stand at step ``T``: weights,
    AdamW moments and the prompt stream continue from there, and that folder is only read.
    """
    with folder_lock(out_dir):  # one writer per checkpoint folder (two trainings used to interleave files)
        return _train(resolve_spec(preset_or_cfgs, n_heads), Path(out_dir), device, resume, progress, stop_at,
                      on_eval, position, None if init_from is None else Path(init_from), deadline)


# train fields a cool-down branch sets differently from the stable run it starts from
BRANCH_FIELDS = ("steps", "cooldown_from", "snapshots", "eval_every", "checkpoint_every", "threads")


def _train(spec: TrainSpec, out: Path, device: str, resume: bool, progress: bool, stop_at: int | None,
           on_eval: Callable[[dict[str, float]], None] | None, position: int, init_from: Path | None = None,
           deadline: float | None = None) -> TrainResult:
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
    opt = optimizer_for(One(model), cfg, device)
    state = _Progress(histories=[[]])
    wsd = cfg.schedule == "wsd"
    source = out if have_ckpt else init_from
    if source is not None:
        model, meta = load_model(source, device)
        _check_resumable(source, meta, spec, branch=source == init_from)
        if source == init_from and (not wsd or int(meta["step"]) != cfg.cooldown_from):
            raise ConfigError(f"train.cooldown_from: {source} stands at step {meta['step']}, the cool-down branches "
                              f"at train.cooldown_from={cfg.cooldown_from}")
        opt = optimizer_for(One(model), cfg, device)
        restore_model_state(load_tensors(source, STATE_FILE, meta), opt, gen, source)
        state = _Progress(int(meta["step"]), float(meta.get("wall_s", 0.0)), None, [list(meta.get("history", []))])
        if have_ckpt and meta.get("finished") and state.step >= cfg.steps:
            return TrainResult(model, out, meta, state.histories[0])
    if not have_ckpt:
        write_provenance(out, {"task": task, "model": spec.model, "train": cfg}, spec.seed, preset=spec.preset,
                         **({"cooldown_of": str(init_from)} if init_from is not None else {}))

    def write(finished: bool) -> None:
        history = state.histories[0]
        meta = {**run_meta(spec), "step": state.step, "finished": finished, "wall_s": state.wall, "history": history}
        save_checkpoint(out, model, meta, model_state(opt, gen))
        write_csv(out / "train_log.csv", history or [{"step": 0}])

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    model.train()
    bar = _progress(progress, start=state.step, total=cfg.steps, desc=f"h={spec.model.n_heads}", position=position)
    fwd = torch.compile(model) if cfg.compile and device.startswith("cuda") else model
    _scheduled(One(model, fwd), opt, [Member(spec, out)], cfg, task, device, state, end, [gen], None, write, bar,
               on_eval, deadline)
    model.eval()
    return TrainResult(model, out, load_meta(out), state.histories[0])


def _check_resumable(out: Path, meta: dict[str, Any], spec: TrainSpec, branch: bool = False) -> None:
    """The checkpoint must come from the same task, train config, model and seed; one line names the first
    field that differs. ``train.steps`` may grow (a finished run is extended: a wsd run exactly, since its lr
    never depended on ``steps``; a cosine run's schedule and curriculum are stretched to the new length from
    the resumed step on) but not fall below the step reached. ``branch``: the checkpoint is the stable run a
    cool-down starts from, which differs in :data:`BRANCH_FIELDS`."""
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
        raise CheckpointError(f"step: {out / META_FILE} records no step to resume from")
    want = {**run_meta(spec), "model_config": spec.model.model_dump()}
    want.pop("preset_config", None)  # provenance: task, train, model and seed decide whether it resumes
    got = {k: meta.get(k) for k in want}
    try:  # train fields added since the checkpoint was written take their defaults
        got["train"] = TrainConfig.model_validate(got["train"]).model_dump()
    except (ValueError, TypeError):
        pass
    steps = spec.train.steps
    if isinstance(got["train"], dict) and got["train"].get("steps") != steps:
        if steps < meta["step"]:
            raise ConfigError(f"train.steps: the checkpoint in {out} is at step {meta['step']} already (got "
                              f"{steps}); a run can be extended, not shortened")
        got["train"] = {**got["train"], "steps": steps}
    if branch and isinstance(got["train"], dict):
        got["train"] = {**got["train"], **{k: want["train"][k] for k in BRANCH_FIELDS}}
    for key in want:
        if got[key] == want[key]:
            continue
        field, have, new = key, got[key], want[key]
        if isinstance(have, dict) and isinstance(new, dict):
            sub = next((k for k in {**new, **have} if have.get(k) != new.get(k)), None)
            field, have, new = f"{key}.{sub}", have.get(sub), new.get(sub)
        raise ConfigError(f"{field}: the checkpoint in {out} was made with {have!r}, not {new!r}; resume it with "
                          "the same settings or train into a new --out")


def fine_tune(model: Transformer, task: TaskConfig, steps: int, batch_size: int, lr: float, seed: int,
              grad_clip: float, values: Callable[[torch.Generator], object] | None = None) -> None:
    """Train ``model`` in place for ``steps`` AdamW steps at a constant ``lr`` (no weight decay) on fresh
    ``"train"`` prompts of ``seed`` with ``n_max`` examples; ``values(gen)`` is called after each batch's
    prompts are drawn (a pruning fine-tune draws its ablation's donors there, for its hooks to read)."""
    dev = next(model.parameters()).device
    model.train()
    trainee = One(model)
    opt = make_optimizer(trainee.named_parameters(), lr, 0.0, str(dev))
    gen = generator(seed, "train", dev)

    def draw(step: int) -> Batch:
        p = train_prompts(task, batch_size, gen, task.n_max, task.d)
        if values is not None:
            values(gen)
        return p.x, p.y, {}

    run_steps(trainee, opt, 0, steps, draw, grad_clip)
    model.eval()


# --------------------------------------------------------------------------- a stack

def init_stack(members: Sequence[Member], device: str = "cpu"
               ) -> tuple[StackedTransformer, dict[int, torch.Generator], torch.Tensor]:
    """The stack at initialisation, each member built as ``train`` builds it; its prompt streams.

    Returns the stack, one ``train`` generator per distinct seed (first-appearance
    order) and ``which``, each member's index into those generators.
    """
    models = []
    for m in members:
        torch.manual_seed(stream_seed(m.spec.seed, "init"))
        models.append(Transformer(m.spec.model).to(device))
    seeds = list(dict.fromkeys(m.spec.seed for m in members))
    gens = {s: generator(s, "train", device) for s in seeds}
    which = torch.tensor([seeds.index(m.spec.seed) for m in members], device=device)
    return StackedTransformer(models), gens, which


def stack_step(stack: StackedTransformer, fwd: Callable[..., torch.Tensor], opt: torch.optim.Optimizer,
               gens: dict[int, torch.Generator], which: torch.Tensor, cfg: TrainConfig, task: TaskConfig, step: int,
               amp: bool = False) -> torch.Tensor:
    """One training step of the stack at (0-based) ``step``; the ``(M,)`` losses, left on the device
    (the benchmarks time this)."""
    n, d = curriculum(step, cfg, task)
    ps = [train_prompts(task, cfg.batch_size, g, n, d) for g in gens.values()]
    batch = (torch.stack([p.x for p in ps])[which], torch.stack([p.y for p in ps])[which], {})
    return train_step(Stack(stack, fwd), opt, batch, lr_at(step, cfg), cfg.grad_clip, amp)


def train_stack(members: Sequence[Member], stack_dir: str | Path, device: str = "cpu", resume: bool = True, *,
                progress: bool = True, stop_at: int | None = None) -> list[TrainResult]:
    """Train ``members`` (one architecture) as one stack; per-member checkpoints, resumable stack state.

    Every member's folder holds the per-model checkpoint :func:`train` writes (weights, ``meta.json``
    with the same keys, ``train_log.csv``, provenance, snapshots), so ``checkpoint.load_model`` and
    every analysis read it; ``stack_dir`` holds the resumable state (:func:`.state.save_stack_state`).
    ``resume=True`` continues the stack checkpoint in ``stack_dir`` (it must hold
    exactly these members) or starts afresh; ``resume=False`` refuses an existing
    one. ``stop_at`` stops after that many steps as an interrupt would.
    """
    members = list(members)
    if not members:
        raise ConfigError("stack: no members to train")
    if len(group_stacks(members)) != 1:
        raise ConfigError("stack: members differ in task, train or model config (use group_stacks)")
    if len({m.out.resolve() for m in members}) != len(members):
        raise ConfigError("stack: two members share one output folder")
    spec0, sdir = members[0].spec, Path(stack_dir)
    cfg, task = spec0.train, spec0.task
    if cfg.threads and device == "cpu":
        torch.set_num_threads(cfg.threads)
    stack_meta = {"kind": "stack", "members": members_meta(members), **arch_key(spec0)}
    have = (sdir / META_FILE).exists()
    if have and not resume:
        raise ConfigError(f"out: {sdir} already holds a stack checkpoint (resume to continue it)")

    stack, gens, which = init_stack(members, device)
    opt = optimizer_for(Stack(stack), cfg, device)
    params = {n: stack.w(n) for n in stack.names}
    state = _Progress(histories=[[] for _ in members])
    if have:
        meta = load_meta(sdir)
        for key in stack_meta:
            if meta.get(key) != stack_meta[key]:
                raise ConfigError(f"resume: stack checkpoint in {sdir} was made with different {key}")
        ema = load_stack_state(sdir, meta, params, opt, gens)
        state = _Progress(int(meta["step"]), float(meta["wall_s"]), ema, meta["histories"])
    else:
        for m in members:
            if (m.out / META_FILE).exists():
                raise ConfigError(f"out: {m.out} already holds a checkpoint (not from this stack)")
        write_provenance(sdir, {"task": task, "model": spec0.model, "train": cfg}, spec0.seed, preset=spec0.preset,
                         members=members_meta(members))
        for m in members:
            write_provenance(m.out, {"task": m.spec.task, "model": m.spec.model, "train": m.spec.train},
                             m.spec.seed, preset=m.spec.preset, stack=str(sdir))

    def write(finished: bool) -> None:
        save_stack_state(sdir, params, opt, gens, state.ema,
                         {**stack_meta, "step": state.step, "finished": finished, "wall_s": state.wall,
                          "histories": state.histories})
        for i, m in enumerate(members):
            meta_i = {**run_meta(m.spec), "step": state.step, "finished": finished, "wall_s": state.wall,
                      "history": state.histories[i], "stack": str(sdir)}
            save_checkpoint(m.out, stack.member(i), meta_i)
            write_csv(m.out / "train_log.csv", state.histories[i] or [{"step": 0}])

    if have and meta.get("finished"):
        if not all(is_finished(m.out) for m in members):
            write(True)  # interrupted between the stack and the member files
        return [_result(m) for m in members]

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    fwd = torch.compile(stack) if cfg.compile and device.startswith("cuda") else stack
    bar = _progress(progress, start=state.step, total=cfg.steps, desc=f"stack x{len(members)}")
    stack.train()
    _scheduled(Stack(stack, fwd), opt, members, cfg, task, device, state, end, list(gens.values()), which, write, bar)
    return [_result(m) for m in members]


def _result(m: Member) -> TrainResult:
    model, meta = load_model(m.out)
    model.eval()
    return TrainResult(model, m.out, meta, list(meta.get("history", [])))
