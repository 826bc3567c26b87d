"""Time to quality: normalised excess risk at n = d/2, d, 2d against CPU seconds, per training recipe.

Trains one model of a preset (default ``quick``, h = 4), with any ``--set`` overrides
(the recipe: ``train.lr``, ``train.batch_size``, ``train.warmup_steps``,
``train.curriculum``, ``model.mlp``, ``model.token_format`` ...), into
``OUT/<name>/`` -- resumable: rerun the same command after an interrupt and it
continues bit-identically. At every evaluation it appends a row to
``OUT/<name>/ttq.csv``: step, wall and CPU seconds of this process's training so
far, and the normalised risk at ``n = d/2, d, 2d`` on the training-validation
prompts. At the end it evaluates the run's log-spaced snapshots on the *test*
prompts (``eval.n_test``, 95% CIs) and writes ``convergence.csv`` and
``convergence.json``: a run is **converged** when the risk at n = d and at n = 2d
improves by less than ``--tol`` (default 3%) of its value over the last doubling
of steps (snapshot ``S/2`` to ``S``), the relative improvement with a paired
bootstrap CI over prompts. Ridge, lasso and Bayes on the same test prompts sit
beside it (``baselines``).

    nice -n 19 .venv/bin/python benchmarks/time_to_quality.py --name A-lr1e-3 \\
        --set train.lr=1e-3 --set train.steps=16000 --out runs/ttq/A
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from icl_heads.config import TaskConfig, get_preset
from icl_heads.io import write_csv, write_json
from icl_heads.training import marker_ns, snapshot_dir, snapshot_steps, train

DEFAULT_TOL = 0.03


def parse_sets(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def sq_errors(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor, ns: list[int]) -> np.ndarray:
    """Per-prompt squared excess error ``(B, len(ns))`` at the context lengths ``ns``, normalised by s tau^2."""
    with torch.no_grad():
        pred = model(x.float(), y.float())
    err = (pred[:, ns] - f[:, ns].float()) ** 2
    return err.numpy()


def relative_improvement(e_half: np.ndarray, e_full: np.ndarray, rng: np.random.Generator,
                         n_boot: int = 2000) -> tuple[float, float, float]:
    """``1 - mean(e_full) / mean(e_half)`` with a paired bootstrap 95% CI over prompts."""
    point = 1 - e_full.mean() / e_half.mean()
    idx = rng.integers(0, len(e_half), size=(n_boot, len(e_half)))
    boots = 1 - e_full[idx].mean(1) / e_half[idx].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(point), float(lo), float(hi)


def convergence(run: Path, preset, tol: float) -> dict[str, object]:
    """Test-prompt risk of every snapshot and the last-doubling verdict."""
    from icl_heads.checkpoint import load_model
    from icl_heads.estimators import bayes
    from icl_heads.metrics import risk_curve
    from icl_heads.tasks import fixed_prompts

    task: TaskConfig = preset.task
    ns = marker_ns(task)
    test = fixed_prompts(task, preset.eval.n_test, preset.seed, "test")
    scale = task.s * task.tau ** 2
    rows, errs = [], {}
    for step in snapshot_steps(preset.train):
        model, _ = load_model(snapshot_dir(run, step))
        model.eval()
        e = sq_errors(model, test.x, test.y, test.f, ns) / scale
        errs[step] = e
        row: dict[str, object] = {"step": step}
        for j, n in enumerate(ns):
            m, se = e[:, j].mean(), e[:, j].std(ddof=1) / np.sqrt(len(e))
            row.update({f"r@{n}": float(m), f"r@{n}_lo": float(m - 1.96 * se), f"r@{n}_hi": float(m + 1.96 * se)})
        rows.append(row)
    write_csv(run / "convergence.csv", rows)
    steps = sorted(errs)
    half, full = steps[-2], steps[-1]
    rng = np.random.default_rng(0)
    verdict: dict[str, object] = {"tol": tol, "from_step": half, "to_step": full, "improvement": {}}
    ok = True
    for j, n in enumerate(ns):
        point, lo, hi = relative_improvement(errs[half][:, j], errs[full][:, j], rng)
        verdict["improvement"][f"n={n}"] = {"point": point, "ci": [lo, hi]}
        if n in (min(task.d, task.n_max), min(2 * task.d, task.n_max)):
            ok = ok and point < tol
    verdict["converged"] = ok
    base = {}
    for name, curve in {"bayes": bayes(test.x, test.y, task.s, task.sigma, task.tau)}.items():
        base[name] = {f"n={n}": float(risk_curve(curve, test.f, task).risk_norm[n]) for n in ns}
    verdict["baselines"] = base
    verdict["final"] = rows[-1]
    write_json(run / "convergence.json", verdict)
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", required=True, help="recipe name: the run's folder under --out")
    ap.add_argument("--out", default="runs/ttq")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    over = {"train.snapshots": 8, "train.eval_every": 1000, **parse_sets(a.sets)}
    p = get_preset(a.preset, **over)
    run = Path(a.out) / a.name
    run.mkdir(parents=True, exist_ok=True)
    clock = run / "cpu_clock.json"
    cpu0 = json.loads(clock.read_text())["cpu_s"] if clock.exists() else 0.0
    t_start = time.process_time()
    log = run / "ttq.csv"
    rows = [] if not log.exists() else None
    if rows is None:
        import csv

        with log.open() as fh:
            rows = list(csv.DictReader(fh))
    ns = marker_ns(p.task)
    print(f"{a.name}: preset={p.name} h={a.heads} overrides={over}", flush=True)

    def show(row: dict[str, float]) -> None:
        cpu = cpu0 + time.process_time() - t_start
        rows.append({"step": row["step"], "wall_s": row["wall_s"], "cpu_s": round(cpu, 1),
                     **{f"r@{n}": row[f"r@{n}"] for n in ns}})
        write_csv(log, rows)
        write_json(clock, {"cpu_s": cpu})
        print(f"{a.name} step {row['step']:6d} cpu {cpu:7.0f}s " + " ".join(f"r@{n}={row[f'r@{n}']:.4f}" for n in ns),
              flush=True)

    train(p, a.heads, run, "cpu", resume=True, progress=False, on_eval=show)
    v = convergence(run, p, a.tol)
    print(f"{a.name}: converged={v['converged']} improvement over steps {v['from_step']}->{v['to_step']}: "
          + ", ".join(f"{k} {d['point']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" for k, d in v["improvement"].items())
          + f"; final {v['final']}; bayes {v['baselines']['bayes']}", flush=True)


if __name__ == "__main__":
    main()
