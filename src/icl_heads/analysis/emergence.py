"""E7 (beyond the paper): how the head pattern emerges during training.

Training keeps log-spaced snapshots (``train.snapshots``, ``training.snapshot_steps``) under
``<checkpoint>/snapshots/step{N}/``. For each snapshot of a seed's largest-head model,
:func:`snapshot_rows` runs

* head assessment (E2's :func:`~icl_heads.analysis.importance.assess_heads`) on the ``val`` prompts:
  per-layer top-head share with its bootstrap CI, and the head ranking;
* the pruning test (E3's default policy ``1:all,l:top1`` and its control) on the ``test``
  prompts: pruned/full risk by the model's own read-out, with a paired bootstrap CI;
* the model's risk at ``n = d``.

Ranking on ``val`` and scoring on ``test`` is E3's design; using the same assessment for the
shares costs one assessment per snapshot instead of two. :func:`trend` turns a seed's snapshots
into "strengthens / fades / flat" by comparing CIs (rule in its docstring).

No file is read or written here: :mod:`icl_heads.experiments.e7_emergence` finds the snapshots,
loads them, writes ``emergence.csv`` and draws the report's figure.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import TaskConfig
from ..evaluation import predict
from ..metrics import squared_errors
from ..tasks import Prompts
from ..claims.keys import in_context_n_min
from .ablation import make_ablations
from .importance import assess_heads, assess_heads_kinds
from .probes import final_readouts
from .pruning import claim2a_stats, control_policy, default_policy, gated_readouts, paired_ratio, policy_gates, prune_gates

LEARNING = 0.9  # a snapshot counts as "learning started" once its risk at n = d is below this (zero predictor: 1)


def snapshot_rows(model: Any, task: TaskConfig, step: int, val: Prompts, test: Prompts, seed: int,
                  n_boot: int = 1000) -> list[dict[str, Any]]:
    """E7 rows (one per layer) for one loaded snapshot: heads ranked on ``val``, pruning scored on ``test``."""
    L = model.cfg.n_layers
    imp = assess_heads(model, val, task, keep=False)  # shares and ranking read the ablation scores only
    conc = imp.concentration(n_boot=n_boot, seed=seed)
    policy = default_policy(L)
    gates = {"full": torch.as_tensor(imp.base_gates), "pruned": prune_gates(imp, policy),
             "control": prune_gates(imp, control_policy(policy))}
    err = {k: squared_errors(predict(model, test, head_gates=g), test.f) for k, g in gates.items()}
    pruned = paired_ratio(err["pruned"], err["full"], imp.n_min, n_boot, seed)
    control = paired_ratio(err["control"], err["full"], imp.n_min, n_boot, seed)
    d = min(task.d, task.n_max)
    norm = task.s * task.tau ** 2
    risk_d = float(err["full"][:, d].mean() / norm)
    return [dict(step=step, layer=c["layer"], n_heads=c["n_heads"], top_head=c["top_head"],
                 top_share=c["top_share"], ci_low=c["ci_low"], ci_high=c["ci_high"],
                 share_minus_layer1=c["share_minus_layer1"],
                 pruned_ratio=pruned["ratio"], pruned_ci_low=pruned["ci_low"], pruned_ci_high=pruned["ci_high"],
                 control_ratio=control["ratio"], risk_norm_at_d=risk_d, ablation="zero", n_prompts=test.batch)
            for c in conc]


# --------------------------------------------------------------------------- the claims' statistics per snapshot

TREND_1B = ("neff_contrast", "keep_top_contrast", "later_keep_top")  # claim 1b's thresholded statistics (E2)
TREND_2A = ("pruned_over_full",)  # claim 2a's ratio (E3), by the own read-out and the probe after the final LN
TREND_2A_SINGLE = ("single_over_full", "fraction_lost")  # with the h = 1 snapshot of the same step
TREND_READOUTS = ("model", "probe_ln")


def claim_stat_rows(model: Any, task: TaskConfig, step: int, val: Prompts, test: Prompts, fit: Prompts, seed: int,
                    kinds: Sequence[str] = ("zero", "mean", "resample"), n_boot: int = 1000,
                    single: Any | None = None) -> list[dict[str, Any]]:
    """Claims 1b and 2a's key statistics of one snapshot, as E2 and E3 compute them, under every ablation kind:
    claim 1b's N_eff contrast and keep-top ratios on ``val`` (E2 scores on its own prompts), claim 2a's
    pruned/full (heads ranked on ``val``, scored on ``test``, the probe fitted on ``fit``) by the model's own
    read-out and by the probe after the final LN. Rows: ``step, statistic, ablation, readout, value, ci_low,
    ci_high`` (95% bootstrap CIs over prompts), pooled over n >= d/2. With ``single`` (the same seed's h = 1
    model at the same step) also the multi-head advantage single/full and the fraction of it pruning loses,
    as E3 computes them; without it the fraction is not among them."""
    n_from = in_context_n_min(task.d)
    abls = make_ablations(model, kinds, task, val.batch, seed)
    imps = assess_heads_kinds(model, val, task, list(abls.values()), n_min=n_from, keep="top")
    full = final_readouts(model, fit, test, torch.as_tensor(imps[kinds[0]].base_gates))
    one = final_readouts(single, fit, test) if single is not None else None
    wanted = TREND_2A + (TREND_2A_SINGLE if one is not None else ())
    policy = default_policy(model.cfg.n_layers)
    rows: list[dict[str, Any]] = []
    for kind, abl in abls.items():
        _, model_rows = imps[kind].claim1b_stats(n_from, n_boot, seed)
        rows += [dict(step=step, statistic=r["statistic"], ablation=kind, readout="", value=r["value"],
                      ci_low=r["ci_low"], ci_high=r["ci_high"]) for r in model_rows if r["statistic"] in TREND_1B]
        pruned = {"pruned": policy_gates(imps[kind], policy)["pruned"]}  # the control is not among the trends
        reads = gated_readouts(model, pruned, abl, fit, test, seed)
        for readout in TREND_READOUTS:
            errs = {"full": full[readout], "pruned": reads["pruned"][readout], "control": reads["pruned"][readout]}
            if one is not None:
                errs["single"] = one[readout]
            rows += [dict(step=step, statistic=r["statistic"], ablation=kind, readout=readout, value=r["value"],
                          ci_low=r["ci_low"], ci_high=r["ci_high"])
                     for r in claim2a_stats(errs, n_from, n_boot, seed)
                     if r["n"] == "pooled" and r["statistic"] in wanted]
    return rows


def late_steps(steps: Sequence[int]) -> list[int]:
    """The snapshots of the second half of training *on the log scale* (step >= sqrt(first * last)): with
    log-spaced snapshots the second half in steps holds only the last two, too few for a slope."""
    steps = sorted(steps)
    if len(steps) < 3:
        return list(steps)
    mid = (steps[0] * steps[-1]) ** 0.5
    return [s for s in steps if s >= mid - 1e-9]


# --------------------------------------------------------------------------- trends


def _direction(first: dict[str, Any], last: dict[str, Any], lo: str, hi: str) -> str:
    if last[lo] > first[hi]:
        return "rises"
    if last[hi] < first[lo]:
        return "falls"
    return "flat"


def trend(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per layer and for pruned/full: how the last snapshot compares with the first *learning* snapshot.

    The first learning snapshot is the earliest whose risk at ``n = d`` is below ``LEARNING``
    (before that the model predicts about zero and head importances are noise); if none is,
    the first snapshot. A quantity *rises* (*falls*) if the last snapshot's 95% CI lies wholly
    above (below) the first's, else it is *flat*. Claim 1b *strengthens* if some later layer's
    top share rises or layer 1's falls, and nothing moves the other way; it *fades* in the
    mirror case; otherwise it is flat (or mixed). Claim 2a strengthens if pruned/full falls.
    """
    steps = sorted({r["step"] for r in rows})
    by_step = {s: sorted((r for r in rows if r["step"] == s), key=lambda r: r["layer"]) for s in steps}
    learning = [s for s in steps if by_step[s][0]["risk_norm_at_d"] < LEARNING]
    s0, s1 = (learning[0] if learning else steps[0]), steps[-1]
    first, last = by_step[s0], by_step[s1]
    layers = {int(a["layer"]): _direction(a, b, "ci_low", "ci_high") for a, b in zip(first, last)}
    toward = [l for l, d in layers.items() if (l == 1 and d == "falls") or (l > 1 and d == "rises")]
    away = [l for l, d in layers.items() if (l == 1 and d == "rises") or (l > 1 and d == "falls")]
    c1b = "strengthens" if toward and not away else "fades" if away and not toward else \
        "mixed" if toward and away else "flat"
    p = _direction(first[0], last[0], "pruned_ci_low", "pruned_ci_high")
    c2a = {"falls": "strengthens", "rises": "fades", "flat": "flat"}[p]
    return {"from_step": s0, "to_step": s1, "layer_top_share": layers, "claim_1b": c1b,
            "pruned_ratio": p, "claim_2a": c2a,
            "first": {"shares": [r["top_share"] for r in first], "pruned_ratio": first[0]["pruned_ratio"]},
            "last": {"shares": [r["top_share"] for r in last], "pruned_ratio": last[0]["pruned_ratio"]}}
