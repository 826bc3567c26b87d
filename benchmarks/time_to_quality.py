"""Time to quality: normalised excess risk at n = 2d (capped at n_max) against wall time while training.

Trains one model of a preset (default: ``quick``, h = 4) from scratch into a temporary
folder and prints, at every evaluation, the step, the training wall time, the
normalised risk at ``n = d/2, d, 2d`` on the fixed training-validation prompts and
its ratio to the Bayes posterior mean on the same prompts (the floor).

    .venv/bin/python benchmarks/time_to_quality.py --preset quick --heads 4 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from icl_heads.config import get_preset
from icl_heads.estimators import bayes
from icl_heads.metrics import risk_curve
from icl_heads.tasks import fixed_prompts
from icl_heads.training import EVAL_STREAM, marker_ns, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, help="override train.steps (the schedule follows it)")
    ap.add_argument("--eval-every", type=int, help="override train.eval_every")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = get_preset(a.preset, **{"train.steps": a.steps, "train.eval_every": a.eval_every})
    task = p.task
    ns = marker_ns(task)
    val = fixed_prompts(task, p.train.n_eval_prompts, p.seed, EVAL_STREAM)
    floor = risk_curve(bayes(val.x, val.y, task.s, task.sigma, task.tau), val.f, task).risk_norm
    print(f"preset={p.name} h={a.heads} steps={p.train.steps} threads={a.threads} device={a.device}; "
          f"Bayes on these prompts: " + ", ".join(f"n={n}: {floor[n]:.4f}" for n in ns))
    print(f"{'step':>7} {'wall_s':>8} " + " ".join(f"{'r@' + str(n):>9} {'/bayes':>7}" for n in ns))

    def show(row: dict[str, float]) -> None:
        print(f"{row['step']:7d} {row['wall_s']:8.1f} "
              + " ".join(f"{row[f'r@{n}']:9.4f} {row[f'r@{n}'] / floor[n]:7.1f}" for n in ns), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        train(p, a.heads, tmp, a.device, progress=False, on_eval=show)


if __name__ == "__main__":
    main()
