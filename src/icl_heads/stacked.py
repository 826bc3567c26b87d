"""Stacked training: several models of one architecture trained as one, with a leading model axis.

Our models are far too small to fill a GPU, so a sweep (seeds x head counts)
trains as one *stack*: every parameter gets a leading member axis ``M``, every
matmul is one batched matmul over it (``torch.baddbmm``), and attention runs
once per head-count group with SDPA on ``(M_g * B, h, T, d_head)``. The
linear maps do not depend on the head count (``qkv`` is ``D -> 3D`` whatever
``h`` is), so members with different ``h`` share one stack and only the
attention core is split. A hand-written batched forward rather than
``torch.func.vmap``: vmap needs one module structure, and the head count
changes the structure.

Each member is exactly what :func:`icl_heads.training.train` would train, up to
float rounding of batched vs single matmuls: initialised by ``Transformer(cfg)``
under ``torch.manual_seed(stream_seed(seed, "init"))``, fed its own prompt
stream ``tasks.generator(seed, "train")`` (members that share a seed share one
draw, as they would share the stream), with the same lr schedule and
curriculum. The loss is the *sum* of the members' MSEs, so each member's
gradient is its own; AdamW is elementwise, so one AdamW over the stack is
per-member AdamW; gradient clipping is per member (each member's global norm).

Outputs: every member's folder holds today's per-model checkpoint (weights,
``meta.json`` with the same keys, ``train_log.csv``, provenance, snapshots), so
``checkpoint.load_model`` and every analysis command read it. The stack folder
holds the resumable state (stacked weights, AdamW moments, every prompt
generator, torch's RNG), written atomically with ``meta.json`` last; a resumed
stack ends bit-identical on CPU to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn

from .checkpoint import META_FILE, STATE_FILE, CheckpointError, load_meta, load_model, load_tensors, save_checkpoint
from .config import ConfigError, Preset, TaskConfig, TrainConfig
from .io import atomic_write_bytes, write_csv, write_json, write_provenance
from .model import Transformer, tokens
from .tasks import fixed_prompts, generator, stream_seed
from .training import (EVAL_STREAM, TrainResult, TrainSpec, _progress, _run_meta, _val_summary, cuda_fast_math,
                       curriculum, is_finished, lr_at, save_snapshot, snapshot_steps, train_prompts)


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


# --------------------------------------------------------------------------- the stacked model

def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-member ``x @ w.T + b``: x ``(M, B, T, i)``, w ``(M, o, i)``, b ``(M, o)`` -> ``(M, B, T, o)``."""
    M, B, T, i = x.shape
    return torch.baddbmm(b[:, None, :], x.reshape(M, B * T, i), w.transpose(1, 2)).view(M, B, T, -1)


class StackedTransformer(nn.Module):
    """``M`` transformers of one architecture (head counts may differ) as one module; training only.

    Parameters are the members' parameters stacked on a new leading axis, under
    the member's name with ``.`` replaced by ``__``. Head gates are not applied
    (they are 1 in training, and multiplying by 1 is exact).
    """

    def __init__(self, models: Sequence[Transformer]):
        super().__init__()
        base = models[0].cfg
        for m in models:
            if m.cfg.model_copy(update={"n_heads": base.n_heads}) != base:
                raise ConfigError("stack: members must share every model field but n_heads")
        self.cfg, self.heads = base, [m.cfg.n_heads for m in models]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.p = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.stack(
            [dict(m.named_parameters())[n].detach() for m in models])) for n in self.names})
        self._members = list(models)  # templates for member(i); a plain list, so not submodules
        self.groups: list[tuple[int, int, int]] = []  # (h, first, last + 1): contiguous runs of one head count
        for i, h in enumerate(self.heads):
            if self.groups and self.groups[-1][0] == h:
                self.groups[-1] = (h, self.groups[-1][1], i + 1)
            else:
                self.groups.append((h, i, i + 1))

    def w(self, name: str) -> torch.Tensor:
        return self.p[name.replace(".", "__")]

    def member(self, i: int) -> Transformer:
        """Member ``i`` as a plain ``Transformer`` holding a copy of its current weights."""
        model = self._members[i]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.w(name)[i])
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predictions ``(M, B, Q)`` for prompts ``x (M, B, N, d)``, ``y (M, B, N)``."""
        M, B, N, d = x.shape
        lay, mask = self._members[0].layout(N, x.device)  # the head count does not enter the layout
        tok = tokens(self.cfg, x.reshape(M * B, N, d), y.reshape(M * B, N))
        h = _linear(tok.view(M, B, -1, d + 1), self.w("read_in.weight"), self.w("read_in.bias"))  # (M, B, T, D)
        if self.cfg.pos_emb:
            emb = self.w("pos_emb.weight")[:, lay.position] + self.w("type_emb.weight")[:, lay.token_type]
            h = h + emb[:, None]  # (M, 1, T, D)
        for l in range(self.cfg.n_layers):
            pre = f"blocks.{l}."
            h = h + self._attention(self._norm(h, pre + "ln_1"), mask, pre + "attn.")
            if self.cfg.mlp:
                a = F.gelu(_linear(self._norm(h, pre + "ln_2"), self.w(pre + "mlp.0.weight"), self.w(pre + "mlp.0.bias")))
                h = h + _linear(a, self.w(pre + "mlp.2.weight"), self.w(pre + "mlp.2.bias"))
        h = self._norm(h[:, :, lay.query_index], "ln_f")  # (M, B, Q, D)
        return _linear(h, self.w("read_out.weight"), self.w("read_out.bias")).squeeze(-1)

    def _norm(self, h: torch.Tensor, name: str) -> torch.Tensor:
        if not self.cfg.layer_norm:
            return h
        D = h.shape[-1]
        return F.layer_norm(h, (D,)) * self.w(name + ".weight")[:, None, None] + self.w(name + ".bias")[:, None, None]

    def _attention(self, a: torch.Tensor, mask: torch.Tensor, pre: str) -> torch.Tensor:
        M, B, T, D = a.shape
        qkv = _linear(a, self.w(pre + "qkv.weight"), self.w(pre + "qkv.bias"))  # (M, B, T, 3D)
        outs = []  # split, not slice: slicing's backward zero-fills the whole tensor per slice (3x slower on CPU)
        for (n_heads, lo, hi), part in zip(self.groups, qkv.split([hi - lo for _, lo, hi in self.groups])):
            q, k, v = (t.reshape((hi - lo) * B, T, n_heads, D // n_heads).transpose(1, 2)  # (Mg*B, h, T, d_head)
                       for t in part.split(D, dim=-1))
            if self.cfg.attention == "linear":
                o = (q @ k.transpose(-1, -2)) * mask @ v / mask.sum(-1, keepdim=True).clamp(min=1)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape(hi - lo, B, T, D))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return _linear(out, self.w(pre + "proj.weight"), self.w(pre + "proj.bias"))


def make_optimizer(stack: StackedTransformer, lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW over the stack, grouped as ``training._make_optimizer`` groups one member's parameters."""
    decay = [stack.w(n) for n in stack.names if stack.w(n).dim() >= 3 and "emb" not in n]
    other = [stack.w(n) for n in stack.names if not (stack.w(n).dim() >= 3 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **({"fused": True} if device.startswith("cuda") else {}))


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
    """One training step of the stack at (0-based) ``step``; the ``(M,)`` losses, left on the device.

    ``gens`` maps each distinct seed to its ``train`` stream (insertion order);
    ``which[i]`` is member ``i``'s index into it. ``fwd`` is the stack or its
    compiled version.
    """
    n, d = curriculum(step, cfg, task)
    ps = [train_prompts(task, cfg.batch_size, g, n, d) for g in gens.values()]
    x, y = torch.stack([p.x for p in ps])[which], torch.stack([p.y for p in ps])[which]  # (M, B, N, d), (M, B, N)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        pred = fwd(x, y)
    losses = (pred.float() - y).pow(2).mean(dim=(1, 2))  # (M,): each member's MSE
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    clip_per_member([stack.w(n) for n in stack.names], cfg.grad_clip)
    opt.step()
    return losses


# --------------------------------------------------------------------------- stack checkpoint

def _save_stack(path: Path, stack: StackedTransformer, opt: torch.optim.Optimizer,
                gens: dict[int, torch.Generator], ema: torch.Tensor | None, meta: dict[str, Any]) -> None:
    """Stacked weights, AdamW moments, generators and RNG in one file, ``meta.json`` written last."""
    t: dict[str, torch.Tensor] = {f"param.{n}": stack.w(n) for n in stack.names}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            t[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    t.update({f"rng.train.{s}": g.get_state() for s, g in gens.items()})
    t["rng.torch"] = torch.get_rng_state()
    if ema is not None:
        t["ema"] = ema
    data = st_save({k: v.detach().contiguous().cpu() for k, v in t.items()})
    atomic_write_bytes(path / STATE_FILE, data)
    write_json(path / META_FILE, {**meta, "sha256": {STATE_FILE: hashlib.sha256(data).hexdigest()}})


def _load_stack(path: Path, meta: dict[str, Any], stack: StackedTransformer, opt: torch.optim.Optimizer,
                gens: dict[int, torch.Generator]) -> torch.Tensor | None:
    t = load_tensors(path, STATE_FILE, meta)
    try:
        with torch.no_grad():
            for n in stack.names:
                stack.w(n).copy_(t[f"param.{n}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, val in t.items():
            if name.startswith("optim."):
                _, idx, key = name.split(".", 2)
                state.setdefault(int(idx), {})[key] = val
        sd = opt.state_dict()
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        for s, g in gens.items():
            g.set_state(t[f"rng.train.{s}"])
        torch.set_rng_state(t["rng.torch"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: stack state does not fit these members ({e})") from None
    ema = t.get("ema")
    return None if ema is None else ema.to(stack.w(stack.names[0]).device)


def _members_meta(members: Sequence[Member]) -> list[dict[str, Any]]:
    return [{"out": str(m.out), "seed": m.spec.seed, "n_heads": m.spec.model.n_heads, "preset": m.spec.preset}
            for m in members]


# --------------------------------------------------------------------------- training

def train_stack(members: Sequence[Member], stack_dir: str | Path, device: str = "cpu", resume: bool = True, *,
                progress: bool = True, stop_at: int | None = None) -> list[TrainResult]:
    """Train ``members`` (one architecture) as one stack; per-member checkpoints, resumable stack state.

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
    run_meta = {"kind": "stack", "members": _members_meta(members), **arch_key(spec0)}
    have = (sdir / META_FILE).exists()
    if have and not resume:
        raise ConfigError(f"out: {sdir} already holds a stack checkpoint (resume to continue it)")

    stack, gens, which = init_stack(members, device)
    seeds = list(gens)
    opt = make_optimizer(stack, cfg.lr, cfg.weight_decay, device)
    step, wall, ema = 0, 0.0, None
    histories: list[list[dict[str, Any]]] = [[] for _ in members]
    if have:
        meta = load_meta(sdir)
        for key in run_meta:
            if meta.get(key) != run_meta[key]:
                raise ConfigError(f"resume: stack checkpoint in {sdir} was made with different {key}")
        ema = _load_stack(sdir, meta, stack, opt, gens)
        step, wall, histories = int(meta["step"]), float(meta["wall_s"]), meta["histories"]
    else:
        for m in members:
            if (m.out / META_FILE).exists():
                raise ConfigError(f"out: {m.out} already holds a checkpoint (not from this stack)")
        write_provenance(sdir, {"task": task, "model": spec0.model, "train": cfg}, spec0.seed, preset=spec0.preset,
                         members=_members_meta(members))
        for m in members:
            write_provenance(m.out, {"task": m.spec.task, "model": m.spec.model, "train": m.spec.train},
                             m.spec.seed, preset=m.spec.preset, stack=str(sdir))

    def write(finished: bool) -> None:
        _save_stack(sdir, stack, opt, gens, ema, {**run_meta, "step": step, "finished": finished, "wall_s": wall,
                                                  "histories": histories})
        for i, m in enumerate(members):
            meta_i = {**_run_meta(m.spec), "step": step, "finished": finished, "wall_s": wall,
                      "history": histories[i], "stack": str(sdir)}
            save_checkpoint(m.out, stack.member(i), meta_i)
            write_csv(m.out / "train_log.csv", histories[i] or [{"step": 0}])

    if have and meta.get("finished"):
        if not all(is_finished(m.out) for m in members):
            write(True)  # interrupted between the stack and the member files
        return [_result(m) for m in members]

    vals = {s: fixed_prompts(task, cfg.n_eval_prompts, s, EVAL_STREAM) for s in seeds}
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    snaps = set(snapshot_steps(cfg))
    fwd = torch.compile(stack) if cfg.compile and device.startswith("cuda") else stack
    amp = cfg.bf16 and device.startswith("cuda")
    bar = _progress(progress, start=step, total=cfg.steps, desc=f"stack x{len(members)}")
    stack.train()
    t0 = time.perf_counter()
    with cuda_fast_math(device):
        while step < end:
            losses = stack_step(stack, fwd, opt, gens, which, cfg, task, step, amp)
            step += 1
            ema = losses.detach() if ema is None else 0.98 * ema + 0.02 * losses.detach()  # on device: no sync
            if step in snaps:
                for i, m in enumerate(members):
                    save_snapshot(m.out, stack.member(i), _run_meta(m.spec), step)
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                loss_ema = ema.tolist()
                for i, m in enumerate(members):
                    histories[i].append({"step": step, "wall_s": round(wall, 2), "lr": lr_at(step - 1, cfg),
                                         "loss_ema": loss_ema[i],
                                         **_val_summary(stack.member(i), vals[m.spec.seed], task)})
                if bar is not None:
                    bar.set_postfix(loss=f"{max(loss_ema):.4f}", refresh=False)
            if step % cfg.checkpoint_every == 0 or step == end:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                write(step == cfg.steps)
    if bar is not None:
        bar.close()
    return [_result(m) for m in members]


def _result(m: Member) -> TrainResult:
    model, meta = load_model(m.out)
    model.eval()
    return TrainResult(model, m.out, meta, list(meta.get("history", [])))


def train_members(members: Sequence[Member], device: str = "cpu", stacked: bool | None = None,
                  stack_root: str | Path | None = None, workers: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse when finished) every member; the entry point for sweeps.

    ``stacked`` (default: on CUDA only, where one stack costs about one model)
    trains one stack per architecture (:func:`group_stacks`), each with its state
    under ``stack_root`` (default: ``<common parent of the members>/stacks``);
    otherwise every member trains alone
    (``experiments.heads_sweep.train_separately``: one process per model on CPU). Returns per-member info and wall time.
    """
    stacked = device.startswith("cuda") if stacked is None else stacked
    todo = [m for m in members if not is_finished(m.out)]
    info: dict[str, Any] = {"members": {str(m.out): {"reused": m not in todo} for m in members},
                            "stacked": stacked}
    t0 = time.perf_counter()
    if todo and stacked:
        root = Path(stack_root) if stack_root is not None else \
            Path(os.path.commonpath([m.out.resolve().parent for m in todo])) / "stacks"
        for group in group_stacks(todo):
            sdir = stack_dir_for(group, root)
            train_stack(group, sdir, device, resume=True, progress=progress)
            for m in group:
                info["members"][str(m.out)]["stack"] = str(sdir)
    elif todo:
        from .experiments.heads_sweep import train_separately

        info.update(train_separately([(m.spec, m.out) for m in todo], device, workers, progress))
    info["train_wall_s"] = time.perf_counter() - t0
    return info
