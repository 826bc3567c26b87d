"""E3 runner: full vs pruned vs control on test prompts, judged by the model's read-out and last-layer probes.

The pruning and its statistics are :mod:`icl_heads.analysis.pruning`; this module loads, runs and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..analysis.ablation import REFERENCE_STREAM, make_ablations, parse_ablations
from ..analysis.importance import assess_heads_kinds
from ..analysis.probes import final_readouts
from ..analysis.pruning import (claim2a_stats, control_policy, default_policy, finetune, gated_readouts, paired_ratio,
                                parse_policy, policy_gates)
from ..claims.keys import in_context_n_min
from ..config import Preset
from ..io import write_csv, write_json, write_provenance
from ..metrics import curve_from_errors
from ..plotting import risk_vs_n
from ..tasks import Prompts, fixed_prompts
from .loading import load_for_analysis, model_label


def run_e3(ckpt: str | Path, out: str | Path, policy: str | None = None, preset: Preset | str | None = None,
           finetune_steps: int = 0, n_prompts: int | None = None, seed: int | None = None,
           device: str = "cpu", n_boot: int = 1000, ablations: str | Sequence[str] = ("zero",),
           single_ckpt: str | Path | None = None) -> dict[str, Any]:
    """E3: heads ranked on "val" prompts, full vs pruned vs control compared on "test" prompts.

    Judged by each model's own read-out (``risk_ratio_vs_full``) and by a ridge probe after
    the last layer fitted per model and gating on "probe" prompts (``probe_ratio_vs_full``),
    before and after the final LayerNorm. ``claim2a.csv`` holds claim 2a's statistics per n in
    the in-context regime and pooled (:func:`claim2a_stats`); with ``single_ckpt`` (the same
    seed's h = 1 model, scored on the same prompts) also the fraction of the multi-head advantage
    that pruning loses.
    For every kind in ``ablations`` heads are ranked and pruned heads ablated that way;
    ``summary.json`` holds the run's settings and every kind's numbers under ``by_ablation``.
    """

    out = Path(out)
    kinds = parse_ablations(ablations)
    if policy is not None:
        parse_policy(policy)  # fail before loading anything
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    policy = policy or default_policy(model.cfg.n_layers)
    control = control_policy(policy)
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_test
    test, fit = fixed_prompts(pre.task, n, seed, "test"), fixed_prompts(pre.task, n, seed, "probe")
    abls = make_ablations(model, kinds, pre.task, n, seed)
    # heads ranked by importance in the in-context regime n >= d/2 (small n would dominate the mean)
    imps = assess_heads_kinds(model, fixed_prompts(pre.task, n, seed, "val"), pre.task, list(abls.values()),
                              n_min=in_context_n_min(pre.task.d), keep=False)
    norm = pre.task.s * pre.task.tau ** 2
    n_min = 1
    full_gates = imps[kinds[0]].base_gates
    full = final_readouts(model, fit, test, torch.as_tensor(full_gates))  # own read-out, probes before/after LN
    full_err, full_probe, full_probe_ln = full["model"], full["probe"], full["probe_ln"]
    single = _single_errors(single_ckpt, pre, fit, test, device)
    n_from = in_context_n_min(pre.task.d)
    claim_rows: list[dict[str, Any]] = []
    rows = curve_from_errors(full_err, pre.task).rows(model="full", ablation="none", n_heads=model.cfg.n_heads, policy="")
    curves = {"full": rows[:]}
    by_kind = {}
    for kind, abl in abls.items():
        gates = policy_gates(imps[kind], policy)
        models = {name: model for name in gates}
        if finetune_steps:
            for name in ("pruned", "control"):
                models[f"{name}+ft"] = finetune(model, torch.as_tensor(gates[name]), pre.task, finetune_steps,
                                                pre.train.batch_size, lr=pre.train.lr * 0.1, seed=seed, ablation=abl)
                gates[f"{name}+ft"] = gates[name]
        errs, probe, probe_ln = {"full": full_err}, {"full": full_probe}, {"full": full_probe_ln}
        for name, reads in gated_readouts(models, gates, abl, fit, test, seed).items():
            errs[name], probe[name], probe_ln[name] = reads["model"], reads["probe"], reads["probe_ln"]
            label = name if len(kinds) == 1 else f"{name} [{kind}]"
            c = curve_from_errors(errs[name], pre.task).rows(
                model=name, ablation=kind, n_heads=model.cfg.n_heads,
                policy={"pruned": policy, "control": control}[name.removesuffix("+ft")])
            rows += c
            curves[label] = c
        for readout, e in (("model", errs), ("probe", probe), ("probe_ln", probe_ln)):
            four = {k: e[k] for k in ("full", "pruned", "control")} | ({"single": single[readout]} if single else {})
            claim_rows += claim2a_stats(four, n_from, n_boot, seed, ablation=kind, readout=readout)
        ratios = {k: paired_ratio(e, full_err, n_min, n_boot, seed) for k, e in errs.items() if k != "full"}
        pratios = {k: paired_ratio(e, full_probe, n_min, n_boot, seed) for k, e in probe.items() if k != "full"}
        by_kind[kind] = dict(
            gates={"full": np.asarray(full_gates).tolist(), **{k: np.asarray(v).tolist() for k, v in gates.items()}},
            kept_heads={k: [[i + 1 for i in np.flatnonzero(row)] for row in np.asarray(v)]
                        for k, v in {"full": full_gates, **gates}.items()},
            risk_ratio_vs_full=ratios, probe_ratio_vs_full=pratios,
            probe_ratio=pratios["pruned"]["ratio"],
            probe_ratio_ci=[pratios["pruned"]["ci_low"], pratios["pruned"]["ci_high"]],
            risk_norm_mean={k: float(v[:, n_min:].mean() / norm) for k, v in errs.items()},
            probe_risk_norm_mean={k: float(v[:, n_min:].mean() / norm) for k, v in probe.items()})
    write_csv(out / "pruning.csv", rows)
    write_csv(out / "claim2a.csv", claim_rows)
    risk_vs_n(curves, out / "pruning.png", f"E3 pruning, {model_label(model)}: full vs {policy} vs control {control}"
              + ("" if kinds == ("zero",) else f" ({', '.join(kinds)} ablation)"))
    summary = dict(experiment="E3", checkpoint=str(ckpt), policy=policy, control=control,
                   finetune_steps=finetune_steps, n_prompts=n, n_min=n_min, ablations=list(kinds),
                   reference_stream=REFERENCE_STREAM, probe="one RidgeCV per n on the residual stream after the last "
                   "layer, standardised features, fitted per model and gating on 'probe', scored on 'test'",
                   single_checkpoint=None if single_ckpt is None else str(single_ckpt), claim2a_n_from=n_from,
                   by_ablation=by_kind)
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E3", checkpoint=str(ckpt), policy=policy, control=control,
                     finetune_steps=finetune_steps, rank_stream="val", eval_stream="test", probe_fit_stream="probe",
                     ablations=list(kinds), reference_stream=REFERENCE_STREAM)
    return summary


def _single_errors(ckpt: str | Path | None, pre: Preset, fit: Prompts, test: Prompts,
                   device: str) -> dict[str, np.ndarray] | None:
    """The single-head model's errors on the same test prompts: own read-out, probes before/after the final LN."""
    if ckpt is None:
        return None
    m, _, _ = load_for_analysis(ckpt, pre, device)
    return final_readouts(m, fit, test)
