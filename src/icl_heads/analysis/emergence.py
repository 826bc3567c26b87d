"""E7 (beyond the paper): how the head pattern emerges during training.

Training keeps log-spaced snapshots (``train.snapshots``, ``training.snapshot_steps``) under
``<checkpoint>/snapshots/step{N}/``. For each snapshot of a seed's largest-head model,
:func:`emergence_rows` runs

* head assessment (E2's :func:`~icl_heads.analysis.importance.assess_heads`) on the ``val`` prompts:
  per-layer top-head share with its bootstrap CI, and the head ranking;
* the pruning test (E3's default policy ``1:all,l:top1`` and its control) on the ``test``
  prompts: pruned/full risk by the model's own read-out, with a paired bootstrap CI;
* the model's risk at ``n = d``.

Ranking on ``val`` and scoring on ``test`` is E3's design; using the same assessment for the
shares costs one assessment per snapshot instead of two. :func:`trend` turns a seed's snapshots
into "strengthens / fades / flat" by comparing CIs (rule in its docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import Preset, TaskConfig
from ..evaluation import predict
from ..io import read_csv, write_csv, write_json, write_provenance
from ..metrics import squared_errors
from ..tasks import Prompts, fixed_prompts
from ..experiments.loading import load_for_analysis, resolve_preset
from .importance import assess_heads
from .pruning import control_policy, default_policy, paired_ratio, prune_gates

SNAPSHOT_DIR = "snapshots"
LEARNING = 0.9  # a snapshot counts as "learning started" once its risk at n = d is below this (zero predictor: 1)


def snapshot_dirs(ckpt: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every snapshot of ``ckpt``, by step."""
    root = Path(ckpt) / SNAPSHOT_DIR
    found = [(int(p.name.removeprefix("step")), p) for p in root.glob("step*") if (p / "meta.json").exists()]
    return sorted(found)


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


def run_e7(ckpt: str | Path, out: str | Path, preset: Preset | str | None = None, n_prompts: int | None = None,
           seed: int | None = None, device: str = "cpu", n_boot: int = 1000) -> list[dict[str, Any]]:
    """E7 for one checkpoint's snapshots: ``emergence.csv`` and ``summary.json`` in ``out``."""
    from ..config import ConfigError

    out = Path(out)
    snaps = snapshot_dirs(ckpt)
    if not snaps:
        raise ConfigError(f"snapshots: {ckpt} has no training snapshots (train with train.snapshots > 0)")
    pre = resolve_preset(snaps[0][1], preset)  # every snapshot of a run shares its task and seed
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_emergence
    val, test = fixed_prompts(pre.task, n, seed, "val"), fixed_prompts(pre.task, n, seed, "test")
    rows: list[dict[str, Any]] = []
    for step, path in snaps:
        model, _, _ = load_for_analysis(path, pre, device)
        rows += snapshot_rows(model, pre.task, step, val, test, seed, n_boot)
    write_csv(out / "emergence.csv", rows)
    write_json(out / "summary.json", {"checkpoint": str(ckpt), "steps": [s for s, _ in snaps],
                                      "trend": trend(rows)})
    write_provenance(out, pre, seed, experiment="E7", checkpoint=str(ckpt),
                     snapshots=[str(p) for _, p in snaps], share_stream="val", ratio_stream="test")
    return rows


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


def read_emergence(paths: Sequence[Path]) -> dict[int, list[dict[str, Any]]]:
    """``seed index -> numeric rows`` from several seeds' ``emergence.csv``."""
    out = {}
    for k, p in enumerate(paths):
        out[k] = [{key: (float(v) if key not in ("ablation",) else v) for key, v in r.items()} for r in read_csv(p)]
    return out


def _yerr(rs: Sequence[dict[str, Any]], mid: str, lo: str, hi: str) -> np.ndarray:
    """Error bars from CI columns; a percentile bootstrap CI need not contain the point, so clip at 0."""
    e = np.array([[r[mid] - r[lo] for r in rs], [r[hi] - r[mid] for r in rs]], dtype=float)
    return np.nan_to_num(np.clip(e, 0, None))


def plot_emergence(per_seed: dict[int, list[dict[str, Any]]], seeds: Sequence[int], path: str | Path,
                   title: str) -> Path:
    """Left: top-head share per layer vs training step (every seed, log x); right: risk at n = d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = "osd^v<>"
    for k, rows in per_seed.items():
        layers = sorted({int(r["layer"]) for r in rows})
        for l in layers:
            rs = sorted((r for r in rows if int(r["layer"]) == l), key=lambda r: r["step"])
            x = [r["step"] for r in rs]
            ax.errorbar(x, [r["top_share"] for r in rs],
                        yerr=_yerr(rs, "top_share", "ci_low", "ci_high"),
                        color=f"C{l - 1}", marker=markers[k % len(markers)], ms=4, capsize=2, lw=1,
                        label=f"layer {l}" if k == 0 else None)
        rs = sorted((r for r in rows if int(r["layer"]) == 1), key=lambda r: r["step"])
        x = [r["step"] for r in rs]
        ax2.plot(x, [r["risk_norm_at_d"] for r in rs], marker=markers[k % len(markers)], label=f"seed {seeds[k]}")
        ax3.errorbar(x, [r["pruned_ratio"] for r in rs],
                     yerr=_yerr(rs, "pruned_ratio", "pruned_ci_low", "pruned_ci_high"),
                     marker=markers[k % len(markers)], capsize=2, label=f"seed {seeds[k]}")
    for a in (ax, ax2, ax3):
        a.set_xscale("log")
        a.set_xlabel("training step")
        a.grid(True, which="both", alpha=0.3)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_ylabel("top-head share of layer importance")
    ax.set_title("E2 on snapshots (markers: seeds)")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("normalised risk at n = d")
    ax2.set_title("risk")
    ax2.legend(fontsize=8)
    ax3.axhline(1.25, color="k", lw=0.6, ls=":")
    ax3.set_yscale("log")
    ax3.set_ylabel("pruned / full risk (own read-out)")
    ax3.set_title("E3 on snapshots")
    ax3.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
