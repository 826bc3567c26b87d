"""Head pruning (E3): keep chosen heads, compare the pruned model with the full one and a control.

* :func:`parse_policy` / :func:`prune_gates` turn a policy such as ``"1:all,2:top1,3:top1"``
  (1-based layers, as in the paper) into gates from a :class:`~.importance.HeadImportance`;
  :func:`control_policy` is the same policy with layer 1 cut to its top head too.
* :func:`policy_gates` gives a policy's pruned and control gates; :func:`gated_readouts` scores gated
  models by the three read-outs E3 judges (own read-out, last-layer probes before/after the final LN).
* :func:`finetune` is a short fine-tune with the gates fixed ("does training recover what pruning lost?").
* :func:`paired_ratio` and :func:`claim2a_stats` are claim 2a's statistics with paired bootstrap CIs.

Pure functions on loaded models and arrays; :mod:`icl_heads.experiments.e3_pruning` is the runner.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ConfigError, TaskConfig
from ..metrics import boot_counts
from ..model import Transformer, head_hooks
from ..tasks import Prompts
from ..training import fine_tune
from .ablation import Ablation
from .importance import HeadImportance
from .probes import final_readouts


_SPEC = re.compile(r"^(all|top([1-9][0-9]*))$")


def parse_policy(text: str) -> dict[int, str]:
    """Parse ``"1:all,2:top1,3:top1"`` into ``{1: "all", 2: "top1", 3: "top1"}`` (1-based layers).

    Each item is ``LAYER:all`` or ``LAYER:topK``; layers must be distinct positive integers.
    Whether they match a model is checked by :func:`prune_gates`.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"keep: empty policy (got {text!r}); expected e.g. '1:all,2:top1,3:top1'")
    policy: dict[int, str] = {}
    for item in text.split(","):
        layer, sep, spec = item.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not _SPEC.match(spec.strip()):
            raise ConfigError(f"keep: each item must be LAYER:all or LAYER:topK with LAYER >= 1 (got {item.strip()!r})")
        l = int(layer)
        if l < 1:
            raise ConfigError(f"keep: layers are 1-based (got {l})")
        if l in policy:
            raise ConfigError(f"keep: layer {l} listed twice")
        policy[l] = spec.strip()
    return policy


def default_policy(n_layers: int) -> str:
    """SPEC E3: all heads in layer 1, the most important head in every later layer."""
    return ",".join(["1:all"] + [f"{l}:top1" for l in range(2, n_layers + 1)])


def control_policy(policy: str) -> str:
    """The control: the same policy with layer 1 cut to its most important head."""
    p = parse_policy(policy)
    p[1] = "top1"
    return ",".join(f"{l}:{s}" for l, s in sorted(p.items()))


def prune_gates(importance: HeadImportance, policy: str) -> torch.Tensor:
    """Gates ``(L, h)`` keeping, per layer, all heads or the top-K heads by ablation importance.

    Every layer of the model must appear exactly once in ``policy`` (strict on purpose: a
    policy written for a 3-layer model is an error on a 4-layer one, not a silent default).
    """
    p = parse_policy(policy)
    L, h = importance.shape
    if set(p) != set(range(1, L + 1)):
        raise ConfigError(f"keep: policy must list every layer 1..{L} exactly once (got layers {sorted(p)})")
    gates = torch.zeros(L, h)
    for l, spec in p.items():
        if spec == "all":
            gates[l - 1] = 1.0
            continue
        k = int(spec[3:])
        if k > h:
            raise ConfigError(f"keep: layer {l} asks for top{k} but the model has {h} heads")
        gates[l - 1, importance.ranking(l - 1)[:k]] = 1.0
    return gates * torch.as_tensor(importance.base_gates, dtype=gates.dtype)


def policy_gates(importance: HeadImportance, policy: str) -> dict[str, torch.Tensor]:
    """``{"pruned": gates of policy, "control": gates of its control}`` ``(L, h)``, ranked by ``importance``."""
    return {"pruned": prune_gates(importance, policy), "control": prune_gates(importance, control_policy(policy))}


def gated_readouts(models: Transformer | Mapping[str, Transformer], gates: Mapping[str, torch.Tensor],
                   ablation: Ablation, fit: Prompts, test: Prompts, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """``name -> {"model", "probe", "probe_ln"} -> (P, N)`` squared errors of each gating in ``gates``.

    Gated-off heads output ``ablation``'s values on ``test``, and on ``fit`` (where the probes are fitted)
    those of another donor pairing (``seed + 1``), so the probe is not fitted on the test prompts' donors.
    ``models`` maps names to models (fine-tuned ones) or is the one model every gating applies to.
    """
    test_v, fit_v = ablation.values(test.batch), ablation.repaired(seed + 1).values(fit.batch)
    by_name = models if isinstance(models, Mapping) else {name: models for name in gates}
    return {name: final_readouts(by_name[name], fit, test, torch.as_tensor(g), fit_v, test_v)
            for name, g in gates.items()}


def finetune(model: Transformer, gates: torch.Tensor, task: TaskConfig, steps: int, batch_size: int = 64,
             lr: float = 1e-4, seed: int = 0, grad_clip: float = 1.0, ablation: Ablation | None = None) -> Transformer:
    """A copy of ``model`` trained ``steps`` AdamW steps with ``gates`` fixed (fresh "train" prompts).

    Minimal on purpose (constant LR, MSE on every query position as in training): it answers
    "does a short fine-tune recover what pruning lost?", not "what is the best pruned model?".
    The copy is :meth:`~icl_heads.model.Transformer.pruned` (its own head mask is ``gates``). With a
    mean or resample ``ablation`` the gated-off heads output the original model's mean (fixed) or a
    random reference prompt's output (drawn per prompt and step) while training, through hooks at
    ``hook_z`` (removed afterwards: the returned model is the pruned one, zero in the gated-off heads).
    """
    if steps < 0:
        raise ConfigError(f"finetune: steps must be >= 0 (got {steps})")
    tuned = model.pruned(gates.to(model.head_gates.device))  # a copy; gated-off heads zero in every pass
    if steps == 0:
        return tuned
    if ablation is None or ablation.kind == "zero":
        fine_tune(tuned, task, steps, batch_size, lr, seed, grad_clip)  # the training loop, constant lr
        return tuned
    drawn: dict[str, torch.Tensor | None] = {}  # this step's values, drawn after its prompts (the loop's order)

    def draw(gen: torch.Generator) -> None:
        drawn["values"] = ablation.sample(batch_size, gen)

    for name, hook in head_hooks(gates, lambda start, n: drawn["values"]):
        tuned.add_hook(name, hook, is_permanent=True)
    try:
        fine_tune(tuned, task, steps, batch_size, lr, seed, grad_clip, draw)
    finally:
        tuned.reset_hooks(including_permanent=True)
    return tuned


def paired_ratio(num_err: np.ndarray, den_err: np.ndarray, n_min: int = 1, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Ratio of risks averaged over ``n >= n_min`` with a paired percentile bootstrap CI over prompts."""
    a, b = num_err[:, n_min:].mean(-1), den_err[:, n_min:].mean(-1)
    counts = boot_counts(a.size, n_boot, seed)
    boot = (counts @ a) / (counts @ b)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return dict(ratio=float(a.mean() / b.mean()), ci_low=float(lo), ci_high=float(hi))


def claim2a_stats(errs: dict[str, np.ndarray], n_from: int, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95, **labels: Any) -> list[dict[str, Any]]:
    """Claim 2a's statistics per context length ``n >= n_from`` and pooled over those n.

    ``errs`` holds per-prompt squared errors ``(P, N)`` on the same test prompts for ``full``,
    ``pruned``, ``control`` and, optionally, ``single`` (the same seed's h = 1 model). Statistics:
    ``pruned_over_full``, ``control_over_pruned``, and with ``single``: ``single_over_full`` (the
    multi-head advantage) and ``fraction_lost = (pruned - full) / (single - full)``, the share of
    that advantage pruning gives back (0: none, 1: all of it). One prompt resample serves every
    model, n and statistic (paired percentile bootstrap). Rows: ``n`` is an integer or ``"pooled"``.
    """
    P, N = errs["full"].shape
    counts = boot_counts(P, n_boot, seed)
    cols = {"pooled": lambda e: e[:, n_from:].mean(-1, keepdims=True)}
    rows: list[dict[str, Any]] = []
    for n_key, cut in [("pooled", cols["pooled"])] + [(n, (lambda e, n=n: e[:, n:n + 1])) for n in range(n_from, N)]:
        m = {k: (cut(e).mean(0), counts @ cut(e) / P) for k, e in errs.items()}  # point (1,), boot (B, 1)
        for stat, fn in _2A_STATS.items():
            if stat in ("single_over_full", "fraction_lost") and "single" not in m:
                continue
            point, boot = fn(*(m[k][0] for k in ("full", "pruned", "control", "single") if k in m)), \
                fn(*(m[k][1] for k in ("full", "pruned", "control", "single") if k in m))
            with np.errstate(invalid="ignore"):
                lo, hi = (np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2]) if np.isfinite(boot).any()
                          else (np.nan, np.nan))
            rows.append(dict(**labels, n=n_key, statistic=stat, value=float(point[0]), ci_low=float(lo),
                             ci_high=float(hi), n_from=n_from))
    return rows


def _frac(full: np.ndarray, pruned: np.ndarray, control: np.ndarray, single: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pruned - full) / (single - full)


_2A_STATS = {
    "pruned_over_full": lambda full, pruned, *rest: pruned / full,
    "control_over_pruned": lambda full, pruned, control, *rest: control / pruned,
    "single_over_full": lambda full, pruned, control, single: single / full,
    "fraction_lost": _frac,
}

