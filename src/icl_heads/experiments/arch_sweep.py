"""Architecture sweep on one task: depth x MLP x head count x seeds, one stack per (depth, MLP).

Models go to ``out/L{L}-mlp{0|1}/seed{k}/h{h}/`` (seed ``preset.seed + k``),
their head analyses (``icl-heads assess-heads`` / ``prune``, run by
``scripts/device_paper.sh``) to ``.../seed{k}/h{h}-e2/`` and ``h{h}-e3/``, stack
state to ``out/stacks/``. :func:`arch_table` collects, per (L, MLP, seed), the
test risk at n = d and 2d of every head count, the top-head share per layer
and the pruned/full risk ratio of the largest head count, per ablation kind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import load_model
from ..config import ConfigError, ExecutorConfig, Preset, validate
from ..evaluation import evaluate
from ..io import read_json, write_csv, write_json, write_provenance
from ..tasks import fixed_prompts
from ..training import Member, group_stacks, is_finished, members_for, stack_dir_for, train_members, train_stack
from ..training.executors import is_local, job_device
from ..workers import run_in_processes


def arch_dir(out: str | Path, layers: int, mlp: bool, k: int, h: int) -> Path:
    return Path(out) / f"L{layers}-mlp{int(mlp)}" / f"seed{k}" / f"h{h}"


def arch_preset(preset: Preset, layers: int, mlp: bool) -> Preset:
    raw = preset.model_dump()
    raw["model"].update(n_layers=layers, mlp=mlp)
    return validate(Preset, raw)


def arch_members(preset: Preset, out: str | Path, layers: Sequence[int], mlps: Sequence[bool],
                 heads: Sequence[int], seeds: int) -> list[Member]:
    """Every (L, MLP, seed, h) member of the sweep, in stack order."""
    members = []
    for L in layers:
        for mlp in mlps:
            p = arch_preset(preset, L, mlp)
            members += members_for(p, heads, [preset.seed + k for k in range(seeds)],
                                   lambda s, h, L=L, mlp=mlp: arch_dir(out, L, mlp, s - preset.seed, h))
    return members


def _train_group(group: list[Member], sdir: str, device: str, threads: int) -> tuple[str, float]:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_stack(group, sdir, device, resume=True, progress=False)
    return sdir, time.perf_counter() - t0


def run_arch_sweep(preset: Preset, out: str | Path, layers: Sequence[int], mlps: Sequence[bool],
                   heads: Sequence[int], seeds: int, device: str = "cpu", stacked: bool | None = None,
                   jobs: int = 1, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """Train the sweep (finished models reused). ``jobs > 1`` trains that many stacks at once, one
    process each: on a GPU these small stacks are bound by kernel launches, so several overlap.
    ``executor`` (``icl_heads.training.executors``): ``debug`` trains here, ``slurm`` submits one job
    per stack (per model when not stacked), job folder ``out/jobs``."""
    if seeds < 1 or jobs < 1 or not layers or not mlps or not heads:
        raise ConfigError("sweep: need at least one seed, job, depth, MLP setting and head count")
    out = Path(out)
    members = arch_members(preset, out, layers, mlps, heads, seeds)
    write_provenance(out, preset, preset.seed, experiment="architecture sweep", layers=list(layers),
                     mlp=list(mlps), heads=list(heads), seeds=seeds, device=device)
    t0 = time.perf_counter()
    todo = [m for m in members if not is_finished(m.out)]
    stacked = job_device(device, executor).startswith("cuda") if stacked is None else stacked
    if todo and not is_local(executor):
        train_members(todo, device, stacked=stacked, stack_root=out / "stacks", executor=executor)
    elif stacked and jobs > 1 and todo:
        groups = group_stacks(todo)
        threads = max(1, (os.cpu_count() or 1) // min(jobs, len(groups)))
        calls = [(g, str(stack_dir_for(g, out / "stacks")), device, threads) for g in groups]
        run_in_processes(_train_group, calls, min(jobs, len(groups)),
                         on_done=lambda _i, r: print(f"stack {r[0]} finished in {r[1]:.0f} s", flush=True))
    elif todo:
        train_members(todo, device, stacked=stacked, stack_root=out / "stacks")
    info = {"layers": list(layers), "mlp": list(mlps), "heads": list(heads), "seeds": seeds, "stacked": stacked,
            "jobs": jobs, "models": len(members), "trained": len(todo), "train_wall_s": time.perf_counter() - t0}
    write_json(out / "sweep.json", info)
    return info


def _kinds(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-ablation-kind parts of an E2/E3 summary."""
    return summary["by_ablation"]


def arch_table(preset: Preset, out: str | Path, device: str = "cpu") -> list[dict[str, Any]]:
    """``out/table.csv``: one row per (L, MLP, seed) from the models and their ``h{h}-e2/e3`` folders."""
    out = Path(out)
    info = read_json(out / "sweep.json")
    task, d = preset.task, preset.task.d
    ns = {"d": min(d, task.n_max), "2d": min(2 * d, task.n_max)}
    h_top = max(info["heads"])
    rows = []
    for L in info["layers"]:
        for mlp in info["mlp"]:
            for k in range(info["seeds"]):
                row: dict[str, Any] = {"L": L, "mlp": int(mlp), "seed": preset.seed + k}
                test = fixed_prompts(task, preset.eval.n_test, preset.seed + k, "test")
                for h in info["heads"]:
                    model, _ = load_model(arch_dir(out, L, mlp, k, h), device)
                    risk = evaluate(model, test, task).risk_norm
                    row.update({f"h{h}_risk_n{key}": float(risk[n]) for key, n in ns.items()})
                base = arch_dir(out, L, mlp, k, h_top)
                e2, e3 = base.with_name(f"h{h_top}-e2") / "summary.json", base.with_name(f"h{h_top}-e3") / "summary.json"
                if e2.exists():
                    for kind, s in _kinds(read_json(e2)).items():
                        row.update({f"h{h_top}_top_share_layer{c['layer']}_{kind}": c["top_share"]
                                    for c in s["concentration"]})
                if e3.exists():
                    for kind, s in _kinds(read_json(e3)).items():
                        row[f"h{h_top}_pruned_over_full_{kind}"] = s["risk_ratio_vs_full"]["pruned"]["ratio"]
                rows.append(row)
    fixed = ["L", "mlp", "seed"]
    extra = sorted({k for r in rows for k in r} - set(fixed))  # layer columns grow with L: one header for all
    rows = [{k: r.get(k, "") for k in fixed + extra} for r in rows]
    write_csv(out / "table.csv", rows)
    return rows
