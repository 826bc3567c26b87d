"""Size the device run from throughput measured on the device itself (used by scripts/device_paper.sh).

Reads the two ``benchmarks/train_throughput.py --stacked`` outputs (quick: 12 members; paper: 4
members, one seed) and prints shell assignments (``PAPER_STEPS=...`` etc.) so that training fits
the given windows. Assumptions, stated because they are guesses until a run confirms them:

* a stack's step time grows linearly with its members for the paper model (compute-bound); for
  the small quick-task models (launch-bound) it does not grow with members but grows with depth,
  and by 1.5x with an MLP;
* models training at the same time on one GPU each keep ``SHARE`` of their solo speed.

    python scripts/device_size.py BENCH_QUICK BENCH_PAPER PAPER_WINDOW_S SWEEP_WINDOW_S
"""

from __future__ import annotations

import re
import sys

SHARE = 0.6  # fraction of solo speed a stack keeps while the other jobs share the GPU
MAX_STEPS = 50000


def stacked_rate(path: str) -> tuple[float, int]:
    """(model-steps/s of the stack, members) from a benchmark output."""
    text = open(path).read()
    rate = float(re.search(r"stacked\s+([\d.]+) model-steps/s", text).group(1))
    members = int(re.search(r"members=(\d+)", text).group(1))
    return rate, members


def round_steps(x: float) -> int:
    return int(max(500, min(MAX_STEPS, x)) // 500 * 500)


def main() -> None:
    bench_quick, bench_paper, paper_window, sweep_window = sys.argv[1:5]
    rq, mq = stacked_rate(bench_quick)
    rp, mp = stacked_rate(bench_paper)
    t_quick = mq / rq  # s per stack step, quick (L=3, no MLP, mq members)
    t_paper = mp / rp  # s per stack step, paper (mp members)
    paper_s, sweep_s = float(paper_window) * SHARE, float(sweep_window) * SHARE
    # one paper seed: its CPU-side analyses (E4 probes, E6) take minutes per seed on the device,
    # so more seeds would cost analysis time the window does not have
    seeds, paper_steps = 1, paper_s / t_paper
    worst = t_quick * (4 / 3) * 1.5  # the L=4, MLP stack (quick is L=3, no MLP)
    print(f"PAPER_SEEDS={seeds}")
    print(f"PAPER_STEPS={round_steps(paper_steps)}")
    print(f"PAPER_WARMUP={round_steps(paper_steps) // 10}")
    print(f"SWEEP_STEPS={round_steps(sweep_s / worst)}")
    print(f"# measured: quick stack {t_quick * 1e3:.2f} ms/step ({mq} members), paper stack "
          f"{t_paper * 1e3:.2f} ms/step ({mp} members); share {SHARE}", file=sys.stderr)


if __name__ == "__main__":
    main()
