"""E1 (heads sweep): one model per head count, same seed and budget, against the estimators.

Models live in ``out/models/h{h}/`` (a finished checkpoint is reused, an unfinished
one resumed). Every model is evaluated on the same test prompts as the E5
estimators, ``fixed_prompts(task, eval.n_test, seed, "test")``; the tuned
estimator rows come from :func:`icl_heads.estimators.estimator_table`.

Depth-matched baselines: in the paper's story an L-layer model spends its first
layer on preprocessing and can run at most L - 1 optimisation steps after it,
while ``gd``/``pto`` tune T up to hundreds. So E1 also reports ``gd_depth`` and
``pto_depth``: GD and PtO with exactly T = L - 1 steps, the step still tuned per
n on the validation prompts (:func:`icl_heads.estimators.depth_matched_predictions`).

On CPU the head counts train *concurrently*, one process per model with
``max(1, cores // models)`` torch threads each: on the 2-core machine two
single-thread processes ran ~1.3x faster in total than one two-thread process
(measured, ``docs/training.md``), and three processes on two cores finish
together instead of leaving a core idle for the last model; more than ``cores + 1``
models queue (seven at once ran slower in total). On CUDA they train
as one stack (``icl_heads.training.train_stack``): the models are too small to fill a GPU,
so the stack costs about what one model does. ``stacked=`` overrides either.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import load_model
from ..claims.keys import ModelKey
from ..config import ExecutorConfig, Preset
from ..estimators import estimator_table
from ..evaluation import evaluate
from ..io import read_csv, write_csv, write_json, write_provenance
from ..plotting import risk_vs_n
from ..runs import layout
from ..tasks import fixed_prompts
from ..training import Member, TrainSpec, is_finished, marker_ns, members_for, train_members
from ..training.executors import job_device

E1_ESTIMATORS = ("ols", "ridge", "lasso", "gd", "pto", "oracle_ls", "bayes")
# ols (blows up at n = d) and oracle_ls (not an estimator; blows up at n < s) stay in the CSV, off the figure
PLOT_ESTIMATORS = ("ridge", "lasso", "gd", "pto", "bayes", "gd_depth", "pto_depth")
DEPTH_STYLE = {"ls": ":", "lw": 1.6}


def model_dir(out: str | Path, h: int) -> Path:
    return Path(out) / "models" / f"h{h}"


def default_stacked(device: str) -> bool:
    """Stack the sweep on CUDA (a stack costs about one model there); train separately on CPU (~1x, measured)."""
    return device.startswith("cuda")


def train_models(preset: Preset, out: str | Path, device: str = "cpu", heads: Sequence[int] | None = None,
                 workers: int | None = None, stacked: bool | None = None,
                 executor: ExecutorConfig | None = None) -> dict[int, dict[str, Any]]:
    """Train every head count of ``preset`` (reusing finished checkpoints); per-h path and wall time.

    ``stacked`` (default :func:`default_stacked`) trains the head counts as one
    stack (``icl_heads.training.train_stack``; stack state in ``out/models/stacks/``); ``executor``:
    where they train (``icl_heads.training.executors``; job folder ``out/models/jobs``).
    """
    heads = list(preset.heads if heads is None else heads)
    stacked = default_stacked(job_device(device, executor)) if stacked is None else stacked
    todo = [h for h in heads if not is_finished(model_dir(out, h))]
    info: dict[int, dict[str, Any]] = {h: {"path": str(model_dir(out, h)), "reused": h not in todo} for h in heads}
    if not todo:
        return info
    members = members_for(preset, todo, [preset.seed], lambda _s, h: model_dir(out, h))
    t0 = time.perf_counter()
    got = train_members(members, device, stacked=stacked, workers=workers, executor=executor)
    for h in todo:
        if stacked:
            info[h].update(stacked=True, stack=got["members"][str(model_dir(out, h))].get("stack"))
        else:
            info[h].update(stacked=False, call_wall_s=got["call_wall_s"][str(model_dir(out, h))],
                           processes=got["processes"], threads_each=got["threads_each"])
    info["total_train_wall_s"] = time.perf_counter() - t0  # type: ignore[index]
    return info


def depth_steps(preset: Preset) -> int | None:
    """T = L - 1 of the depth-matched baselines (None for a one-layer model: no step after preprocessing)."""
    return preset.model.n_layers - 1 if preset.model.n_layers >= 2 else None


def estimator_rows(preset: Preset, estimators: Sequence[str], depth_matched: bool = True,
                   e5_csv: str | Path | None = None) -> list[dict[str, Any]]:
    """E1's estimator rows (``kind="estimator"``): the tuned ``estimators`` and, with ``depth_matched``,
    ``gd_depth``/``pto_depth`` with T = L - 1 steps; all on the models' test prompts.

    ``e5_csv``: E5's ``e5_risk.csv`` *of the same task, evaluation sizes and seed* (so the same
    val/test prompts and tuning): its rows are taken instead of tuning every estimator again,
    which is most of E1's time on the paper preset.
    """
    T = depth_steps(preset) if depth_matched else None
    todo = list(estimators)
    reused: list[dict[str, Any]] = []
    if e5_csv is not None:
        for r in read_csv(e5_csv):
            if r["estimator"] in todo:
                reused.append({"estimator": r["estimator"], "n": int(r["n"]),
                               **{k: float(r[k]) for k in ("risk", "risk_norm", "ci_low", "ci_high")},
                               "hparams": r["hparams"]})
        todo = [e for e in todo if e not in {r["estimator"] for r in reused}]
        reused.sort(key=lambda r: estimators.index(r["estimator"]))
    rows = reused + estimator_table(preset, todo, depth_steps=T)
    return [{"kind": "estimator", "label": x.pop("estimator"), **x} for x in rows]


def seed_members(presets: Sequence[Preset], outs: Sequence[str | Path]) -> list[Member]:
    """The models :func:`train_seeds` trains: ``presets[k]``'s head counts into ``model_dir(outs[k], h)``."""
    return [Member(TrainSpec.from_preset(p, h), model_dir(o, h)) for p, o in zip(presets, outs) for h in p.heads]


def train_seeds(presets: Sequence[Preset], outs: Sequence[str | Path], device: str = "cpu",
                stacked: bool | None = None, stack_root: str | Path | None = None,
                executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """Train every seed's models at once: ``presets[k]`` (its seed and heads) into ``model_dir(outs[k], h)``.

    One call so that, on CPU, all models train concurrently (one process each: the cores stay
    busy until the last model ends) and, on CUDA, all seeds share one stack. Finished
    checkpoints are reused, unfinished ones resumed. ``executor``: where they train (default: here).
    """
    return train_members(seed_members(presets, outs), device, stacked=stacked, stack_root=stack_root,
                         executor=executor)


def run_e1(preset: Preset, out: str | Path, device: str = "cpu", workers: int | None = None,
           estimators: Sequence[str] | None = E1_ESTIMATORS, stacked: bool | None = None,
           depth_matched: bool = True, e5_csv: str | Path | None = None,
           models: dict[int, Path] | None = None, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """Train/reuse the models, evaluate them and the estimators, write CSV, PNG, summary JSON.

    ``e5_csv``: reuse E5's tuned estimator rows (same task, eval sizes and seed; see :func:`estimator_rows`).
    ``models``: finished checkpoints per head count (e.g. the zoo's) to evaluate instead of training.
    ``executor``: where the models train (``icl_heads.training.executors``; default: here).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_provenance(out, preset, preset.seed, experiment="E1 heads sweep", device=device)
    t0 = time.perf_counter()
    if models is None:
        info = train_models(preset, out, device, workers=workers, stacked=stacked, executor=executor)
    else:
        info = {h: {"path": str(models[h]), "reused": True, "source": "given"} for h in preset.heads}
    paths = {h: Path(info[h]["path"]) for h in preset.heads}
    train_wall = time.perf_counter() - t0

    test = fixed_prompts(preset.task, preset.eval.n_test, preset.seed, "test")
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    trained: dict[int, dict[str, Any]] = {}
    for h in preset.heads:
        model, meta = load_model(paths[h], device)
        label = f"transformer h={h}"
        r = [dict(kind="model", **x) for x in evaluate(model, test, preset.task).rows(label=label) if x["n"] >= 1]
        rows += r
        curves[label], styles[label] = r, {"lw": 2.2}
        trained[h] = {"steps": meta["step"], "train_wall_s": meta.get("wall_s"), **info[h]}
    if estimators:
        for x in estimator_rows(preset, estimators, depth_matched, e5_csv):
            rows.append(x)
            if x["label"] in PLOT_ESTIMATORS:
                curves.setdefault(x["label"], []).append(x)
                styles[x["label"]] = DEPTH_STYLE if x["label"].endswith("_depth") else {"ls": "--", "lw": 1.2}
    write_csv(out / "e1_heads.csv", rows)
    risk_vs_n(curves, out / "e1_heads.png", f"E1: heads sweep ({preset.name}, d={preset.task.d}, "
              f"s={preset.task.s}, sigma={preset.task.sigma})", styles)
    summary = {"experiment": "E1", **_summary(rows, preset, marker_ns(preset.task))}
    summary.update(train_wall_s=train_wall, total_wall_s=time.perf_counter() - t0, models=trained)
    write_json(out / layout.E1_SUMMARY, summary)
    return summary


def _summary(rows: list[dict[str, Any]], preset: Preset, ns: list[int]) -> dict[str, Any]:
    """Risk at the marker n's, ratios to Bayes, and the checks the brief asks for (stated, not asserted)."""
    table = {(r["label"], int(r["n"])): float(r["risk_norm"]) for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    models = [lab for lab in labels if lab.startswith("transformer")]
    d, n_max = preset.task.d, preset.task.n_max
    risk_at = {lab: {n: table.get((lab, n)) for n in ns} for lab in labels}
    out: dict[str, Any] = {"marker_n": ns, "risk_norm_at": risk_at}
    if ("bayes", d) in table:
        out["ratio_to_bayes"] = {m: {n: table[(m, n)] / table[("bayes", n)] for n in ns} for m in models}
        big = [n for n in range(d, n_max + 1)]
        out["within_2x_bayes_for_n_ge_d"] = {m: all(table[(m, n)] <= 2 * table[("bayes", n)] for n in big)
                                             for m in models}
        for ref in ("ridge", "lasso"):
            if (ref, d) in table:
                out[f"below_{ref}_for_n_ge_d"] = {m: all(table[(m, n)] < table[(ref, n)] for n in big) for m in models}
    heads = sorted(preset.heads)
    mean_big = {h: sum(table[(ModelKey(h).e1_label, n)] for n in range(d, n_max + 1)) / (n_max - d + 1) for h in heads}
    out["mean_risk_norm_n_ge_d"] = mean_big
    out["more_heads_not_worse"] = all(mean_big[b] <= mean_big[a] * 1.05 for a, b in zip(heads, heads[1:]))
    return out
