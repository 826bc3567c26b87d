"""Work bound per analysis stage: each stage's wall time against the forward-pass work it does.

Runs E1 (evaluation only: the models are given), E2, E3, E4, E6 and E7 as ``reproduce`` runs
them (three ablation kinds for E2/E3) on one zoo configuration's seed-0 models (default
``A``: the quick h = 4 model and its h = 1 reference), and for each stage prints

* its wall time,
* the forward-pass equivalents (FPE) it does: every attention layer applied to a token row is
  counted (``Attention.forward`` is wrapped: a block's attention, which E2 runs once per layer for
  all its gate settings; the per-setting output projection and MLP are not counted; a last block that
  computes the read-out's rows only counts those rows), and one FPE
  is the model's ``L`` layers over the stage's base prompt set (``eval.n_test`` prompts,
  ``2 n_max + 1`` tokens each) -- so partial passes from a layer, ablation batches and snapshot
  passes all count for what they cost,
* the wall time of that many plain forward passes of the same model, measured in the same run
  (``no_grad``, batch of ``eval.n_test`` prompts), and
* the ratio stage / forward work (the target of issue 17 is <= 3x for every stage), and
* for E6, whose work is mostly estimator solves, the time of those solves done alone in the same
  run (every PtO/GD algorithm path over its step-size grid and the ridge / many-step GD baselines
  on E6's val and test prompts: model-independent, computed once per pair) and the ratio of the
  stage to forward work plus solves. The probes' and decoders' ridge fits are not in it (they are
  what E3 and E4 also do, within their ratios).

    .venv/bin/python benchmarks/analysis.py [--config A] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from icl_heads.model import transformer as model_mod
from icl_heads.checkpoint import load_model
from icl_heads.tasks import fixed_prompts
from icl_heads.workers import keep_freed_memory
from icl_heads.zoo import available, get_config, model_path
from icl_heads.zoo.reproduce import zoo_preset

ROWS = {"n": 0}


def counting(forward):
    def wrapped(self, h, *args, **kwargs):
        rows = kwargs.get("rows", args[2] if len(args) > 2 else None)  # (mask, gates, rows): query rows computed
        ROWS["n"] += h.shape[0] * (h.shape[1] if rows is None else len(rows))
        return forward(self, h, *args, **kwargs)
    return wrapped


def plain_forward_time(ckpt: Path, n_test: int, seed: int, task, reps: int = 5) -> float:
    model, _ = load_model(ckpt)
    model.eval()
    p = fixed_prompts(task, n_test, seed, "test")
    x, y = p.x.float(), p.y.float()
    with torch.no_grad():
        model(x, y)
        t = time.perf_counter()
        for _ in range(reps):
            model(x, y)
    return (time.perf_counter() - t) / reps


def e6_solve_time(p, L: int) -> float:
    """The model-independent estimator work E6 does once per pair, timed alone: every algorithm's
    path (steps 1..L-1, every step size of its grid) and the baselines (ridge, GD with many steps) on
    E6's val and test prompts -- what ``analysis.mechanism`` computes once and caches for both models."""
    from icl_heads.analysis.mechanism import ALGORITHMS, algorithm_paths, baseline_paths

    t = time.perf_counter()
    for split, n in (("val", p.eval.n_val), ("test", p.eval.n_test)):
        prompts = fixed_prompts(p.task, n, p.seed, split)
        algorithm_paths(p.task, prompts, list(range(1, L)), list(ALGORITHMS.values()))
        baseline_paths(p.task, prompts)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="A")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc as it is (the CLI calls workers.keep_freed_memory; so does this by default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.glibc_default:
        keep_freed_memory()
    from icl_heads.analysis.pruning import default_policy
    from icl_heads.experiments.e2_importance import run_e2
    from icl_heads.experiments.e3_pruning import run_e3
    from icl_heads.experiments.e4_probes import run_e4
    from icl_heads.experiments.e6_mechanism import run_e6
    from icl_heads.experiments.e7_emergence import run_e7
    from icl_heads.experiments.heads_sweep import run_e1
    from icl_heads.reproduce import ABLATIONS

    cfg = get_config(a.config)
    need = [(0, h) for h in cfg.heads]
    if not all(m in available(cfg.name) for m in need):
        raise SystemExit(f"zoo/{cfg.name}: seed 0 needs heads {list(cfg.heads)} (icl-heads zoo train)")
    p = zoo_preset(cfg)
    p = p.model_copy(update={"heads": list(cfg.heads)})
    multi, single = model_path(cfg.name, 0, max(cfg.heads)), model_path(cfg.name, 0, min(cfg.heads))
    L, T = p.model.n_layers, 2 * p.task.n_max + 1
    fpe_rows = L * p.eval.n_test * T
    model_mod.Attention.forward = counting(model_mod.Attention.forward)
    common = dict(preset=p, seed=p.seed, device="cpu")
    stages = {
        "E1": lambda d: run_e1(p, d, "cpu", estimators=None, models={h: model_path(cfg.name, 0, h) for h in p.heads}),
        "E2": lambda d: run_e2(multi, d, ablations=ABLATIONS, **common),
        "E3": lambda d: run_e3(multi, d, ablations=ABLATIONS, **common),
        "E4": lambda d: run_e4(multi, d, prune=default_policy(L), compare=[single], **common),
        "E6": lambda d: run_e6(multi, d, single_ckpt=single, with_construct=False, with_any_t=False, **common),
        "E7": lambda d: run_e7(multi, d, **common),
    }
    t_fwd = plain_forward_time(multi, p.eval.n_test, p.seed, p.task)
    solves = {"E6": e6_solve_time(p, L)}
    print(f"config {cfg.name} (seed 0, h={max(cfg.heads)}, L={L}), {p.eval.n_test} test prompts x {T} tokens; "
          f"threads={a.threads}; glibc malloc {'default' if a.glibc_default else 'keeps freed memory'}; one plain forward pass: {t_fwd * 1e3:.1f} ms")
    print(f"{'stage':6s} {'wall s':>8s} {'FPE':>8s} {'FPE time s':>11s} {'ratio':>7s} {'solves s':>9s} "
          f"{'ratio to FPE + solves':>22s}")
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in stages.items():
            ROWS["n"] = 0
            t = time.perf_counter()
            fn(Path(tmp) / name)
            wall = time.perf_counter() - t
            total += wall
            fpe = ROWS["n"] / fpe_rows
            bound = fpe * t_fwd
            solve = solves.get(name, 0.0)
            print(f"{name:6s} {wall:8.2f} {fpe:8.1f} {bound:11.2f} {wall / bound if bound else float('inf'):7.1f}x "
                  f"{solve:9.2f} {wall / (bound + solve) if bound + solve else float('inf'):21.1f}x", flush=True)
    print(f"all stages: {total:.1f} s (target of issue 17: <= 60 s per configuration and seed)")


if __name__ == "__main__":
    main()
