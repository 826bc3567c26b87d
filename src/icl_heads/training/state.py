"""Optimizer grouping and the resumable state: AdamW moments and RNG states as flat safetensors.

One home for both checkpoint kinds, whose formats are unchanged:

* a model's ``state.safetensors`` (beside its weights): ``optim.{i}.{key}``, ``rng.train``,
  ``rng.torch`` and, on CUDA, ``rng.cuda``;
* a stack's ``state.safetensors`` (its own folder, ``meta.json`` written last): the stacked
  weights ``param.{name}``, the same ``optim.*`` entries, ``rng.train.{seed}`` per prompt stream,
  ``rng.torch`` and the loss EMA ``ema``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save as st_save

from ..checkpoint import META_FILE, STATE_FILE, CheckpointError, load_tensors
from ..io import sha256s, write_files_then_meta


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float, matrix_dim: int = 2
                 ) -> list[dict[str, Any]]:
    """AdamW groups as in GPT-2: weight decay on matrices only (not biases, LayerNorm or embeddings).

    ``matrix_dim`` is 2 for one model's parameters, 3 for a stack's (leading member axis).
    """
    named = list(named)
    decays = [p.dim() >= matrix_dim and "emb" not in n for n, p in named]
    return [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": weight_decay},
            {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]


def make_optimizer(named: Iterable[tuple[str, torch.Tensor]], lr: float, weight_decay: float, device: str = "cpu",
                   matrix_dim: int = 2) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; on CUDA the fused kernel (one launch for all parameters)."""
    fused = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(param_groups(named, weight_decay, matrix_dim), lr=lr, betas=(0.9, 0.999), **fused)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``optim.{index}.{key}`` tensors (safetensors has no pickle)."""
    out: dict[str, torch.Tensor] = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            out[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def optimizer_state(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of :func:`optimizer_tensors`: ``{index: {key: tensor}}``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    return state


def load_optimizer(opt: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]]) -> None:
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def rng_tensors(gens: Mapping[str, torch.Generator], cuda: bool = True) -> dict[str, torch.Tensor]:
    """Prompt generators as ``rng.{name}``, torch's global RNG as ``rng.torch`` (and CUDA's, if in use)."""
    out = {f"rng.{name}": g.get_state() for name, g in gens.items()}
    out["rng.torch"] = torch.get_rng_state()
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: Mapping[str, torch.Tensor], gens: Mapping[str, torch.Generator]) -> None:
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


# --------------------------------------------------------------------------- one model's state file

def model_state(opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """AdamW moments and both RNG states of a one-model run (saved beside its weights)."""
    return {**optimizer_tensors(opt), **rng_tensors({"train": gen})}


ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _adam_fits(st: Mapping[str, torch.Tensor], param: torch.Tensor) -> bool:
    """An AdamW entry with all its tensors, moments shaped like the parameter (a file missing one
    used to load and then stop training with a KeyError traceback)."""
    return all(k in st for k in ADAM_KEYS) and st["exp_avg"].shape == st["exp_avg_sq"].shape == param.shape


def restore_model_state(tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
                        path: Path) -> None:
    state = optimizer_state(tensors)
    params = [p for g in opt.param_groups for p in g["params"]]
    # a parameter that never gets a gradient (an attention-only model's ln_2) has no state: fit, not count
    fits = all(i < len(params) and _adam_fits(st, params[i]) for i, st in state.items())
    if not fits or "rng.train" not in tensors:
        raise CheckpointError(f"{path / STATE_FILE}: optimizer/RNG state does not fit this model")
    load_optimizer(opt, state)
    restore_rng(tensors, {"train": gen})


# --------------------------------------------------------------------------- a stack's state file

def save_stack_state(path: Path, params: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer,
                     gens: Mapping[int, torch.Generator], ema: torch.Tensor | None, meta: dict[str, Any]) -> None:
    """Stacked weights, AdamW moments, generators and RNG in one file, ``meta.json`` written last."""
    t: dict[str, torch.Tensor] = {f"param.{n}": p for n, p in params.items()}
    t.update(optimizer_tensors(opt))
    t.update(rng_tensors({f"train.{s}": g for s, g in gens.items()}, cuda=False))
    if ema is not None:
        t["ema"] = ema
    data = st_save({k: v.detach().contiguous().cpu() for k, v in t.items()})
    write_files_then_meta(path, {STATE_FILE: data}, META_FILE, {**meta, "sha256": sha256s({STATE_FILE: data})})


def load_stack_state(path: Path, meta: dict[str, Any], params: Mapping[str, torch.Tensor],
                     opt: torch.optim.Optimizer, gens: Mapping[int, torch.Generator]) -> torch.Tensor | None:
    """Restore what :func:`save_stack_state` wrote into ``params`` (copied in place), ``opt`` and ``gens``;
    returns the loss EMA (or None)."""
    t = load_tensors(path, STATE_FILE, meta)
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(t[f"param.{n}"])
        load_optimizer(opt, optimizer_state(t))
        restore_rng(t, {f"train.{s}": g for s, g in gens.items()})
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: stack state does not fit these members ({e})") from None
    ema = t.get("ema")
    return None if ema is None else ema.to(next(iter(params.values())).device)
