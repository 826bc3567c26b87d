"""Time to quality: normalised excess risk at n = d/2, d, 2d against CPU seconds, per training recipe.

Trains one model of a preset (default ``quick``, h = 4), with any ``--set`` overrides
(the recipe: ``train.lr``, ``train.batch_size``, ``train.warmup_steps``,
``train.curriculum``, ``model.mlp``, ``model.token_format`` ...), into
``OUT/<name>/`` -- resumable: rerun the same command after an interrupt and it
continues bit-identically. At every evaluation it appends a row to
``OUT/<name>/ttq.csv``: step, wall and CPU seconds of this process's training so
far, and the normalised risk at ``n = d/2, d, 2d`` on the training-validation
prompts. At the end it evaluates the run's log-spaced snapshots on the *test*
prompts (``eval.n_test``, 95% CIs) with the zoo's test (``icl_heads.zoo.convergence``) and writes
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

import torch

from icl_heads.cli.options import parse_sets
from icl_heads.config import get_preset
from icl_heads.io import write_csv, write_json
from icl_heads.training import marker_ns, train
from icl_heads.zoo import convergence as zoo_convergence

DEFAULT_TOL = 0.03


def convergence(run: Path, preset, tol: float) -> dict[str, object]:
    """The zoo's last-doubling test (:func:`icl_heads.zoo.convergence`) with Bayes on the same test prompts."""
    from icl_heads.estimators import bayes
    from icl_heads.metrics import risk_curve
    from icl_heads.tasks import fixed_prompts

    verdict = zoo_convergence(run, preset, tol)
    task = preset.task
    test = fixed_prompts(task, preset.eval.n_test, preset.seed, "test")
    floor = risk_curve(bayes(test.x, test.y, task.s, task.sigma, task.tau), test.f, task).risk_norm
    verdict["baselines"] = {"bayes": {n: float(floor[int(n)]) for n in verdict["at"]}}
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
    over = {"train.snapshots": 8, "train.eval_every": 1000, **parse_sets(tuple(a.sets))}
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
    print(f"{a.name}: converged={v['converged']} over steps {v['from_step']}->{v['to_step']}: "
          + ", ".join(f"n={n}: risk {d['risk']:.4f} [{d['ci'][0]:.4f}, {d['ci'][1]:.4f}], improvement "
                      f"{d['improvement']:+.3f} [{d['improvement_ci'][0]:+.3f}, {d['improvement_ci'][1]:+.3f}]"
                      for n, d in v["at"].items()) + f"; bayes {v['baselines']['bayes']}", flush=True)


if __name__ == "__main__":
    main()
