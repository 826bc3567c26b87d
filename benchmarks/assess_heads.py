"""Time E2 (all single-head ablations + keep-only settings) against one plain evaluation.

Usage: ``python benchmarks/assess_heads.py [--heads 4] [--prompts 2000] [--threads 1] [--repeat 3]``

Also times ``--ablation all`` (zero, mean and resample sharing one base pass, plus the clean
reference run that mean and resample need) against ``--ablation zero`` and prints the ratio.

Model: the ``quick`` preset's 3-layer model with 4 heads, randomly initialised (timing does
not depend on training). Prompts: the preset's test-set size. Prints the plain-evaluation
time, the E2 time, their ratio, the ratio to the naive approach (one full forward per gate
setting) and the work ratio an exact method cannot go below with prefix sharing.
"""

from __future__ import annotations

import argparse
import time

import torch

from icl_heads.analysis.ablation import make_ablations
from icl_heads.analysis.importance import assess_heads, assess_heads_kinds
from icl_heads.config import get_preset
from icl_heads.evaluation import evaluate
from icl_heads.model import Transformer
from icl_heads.tasks import fixed_prompts


def best_time(fn, repeat: int) -> float:
    """Minimum wall time over ``repeat`` runs (the least disturbed one on a shared machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=None, help="default: the quick preset's eval.n_test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=2048)
    ap.add_argument("--naive", action="store_true", help="also time one full forward per gate setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre = get_preset("quick")
    torch.manual_seed(0)
    model = Transformer(pre.model_config_for(args.heads)).eval()
    L, h = model.cfg.n_layers, model.cfg.n_heads
    prompts = fixed_prompts(pre.task, args.prompts or pre.eval.n_test, pre.seed, "test")
    evaluate(model, prompts.slice(0, 64), pre.task)  # warm-up

    plain = best_time(lambda: evaluate(model, prompts, pre.task), args.repeat)
    e2 = best_time(lambda: assess_heads(model, prompts, pre.task, batch_rows=args.batch_rows), args.repeat)
    settings = 1 + 2 * L * h
    # layer passes: base L, plus 2h settings per layer l that rerun layers l..L-1
    floor = (L + sum(2 * h * (L - l) for l in range(L))) / L
    print(f"model: quick preset, L={L}, h={h}, D={model.cfg.d_model}; prompts={prompts.batch}; "
          f"threads={args.threads}; best of {args.repeat}")
    print(f"plain evaluation: {plain:.3f} s")
    print(f"E2 ({settings} gate settings, batched, prefix-shared): {e2:.3f} s")
    print(f"ratio E2 / plain = {e2 / plain:.2f}  (target in the issue: <= 3)")
    print(f"work ratio of exact E2 with prefix sharing (layer passes / plain) = {floor:.2f}; "
          f"naive (one forward per setting) = {settings}")

    def kinds(names: tuple[str, ...]) -> None:  # what run_e2 does: reference run, then one shared assessment
        abls = make_ablations(model, names, pre.task, prompts.batch, pre.seed)
        assess_heads_kinds(model, prompts, pre.task, list(abls.values()), batch_rows=args.batch_rows)

    zero = best_time(lambda: kinds(("zero",)), args.repeat)
    every = best_time(lambda: kinds(("zero", "mean", "resample")), args.repeat)
    print(f"E2 --ablation zero: {zero:.3f} s; --ablation all (zero, mean, resample + reference run): {every:.3f} s; "
          f"ratio all / zero = {every / zero:.2f}")
    if args.naive:
        def naive() -> None:
            for l in range(L):
                for k in range(h):
                    for keep in (False, True):
                        g = torch.ones(L, h)
                        if keep:
                            g[l] = 0
                        g[l, k] = 1.0 if keep else 0.0
                        evaluate(model, prompts, pre.task, head_gates=g)
            evaluate(model, prompts, pre.task)

        t = best_time(naive, 1)
        print(f"naive, one evaluation per gate setting: {t:.3f} s (ratio {t / plain:.2f}); "
              f"batched E2 is {t / e2:.2f}x faster")


if __name__ == "__main__":
    main()
