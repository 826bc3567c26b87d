"""Recover the training snapshots of zoo models exported without them (the h = 1 models before stop 25).

Retrains each member with its configuration's recipe and seed into ``--work`` with the zoo trainer's worker
(resumable, one torch thread per process) and, when the retrained final weights are byte-identical to the zoo
model's, copies the run's snapshots into the zoo (``icl_heads.zoo.add_snapshots``): E7 then has the h = 1 model at every snapshot step,
which the fraction of the multi-head advantage lost per step needs. A member whose weights differ is reported
and left alone.

    nice -n 15 .venv/bin/python scripts/zoo_snapshots.py --config A --heads 1 --jobs 1 >> runs/zoo/snaps.log 2>&1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from icl_heads.checkpoint import CheckpointError
from icl_heads.workers import Terminated, install_term_handler, run_in_processes
from icl_heads.zoo import ZOO_DIR, add_snapshots, available, get_config, model_path
from icl_heads.zoo.train import _train_member  # the zoo trainer's worker: same folder layout, CPU clock


def retrain(name: str, seed: int, h: int, work: str) -> str:
    """Worker: retrain (or resume) one member into ``work`` as ``zoo train`` does; then add its snapshots to the
    zoo if identical."""
    config = get_config(name)
    t0 = time.process_time()
    run = Path(_train_member(config, seed, h, work, threads=1))
    try:
        add_snapshots(run, config, seed, h, ZOO_DIR)
        return f"{name}/seed{seed}/h{h}: snapshots added ({time.process_time() - t0:.0f} CPU s)"
    except CheckpointError as e:
        return f"{name}/seed{seed}/h{h}: left alone: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--heads", type=int, nargs="+", default=[1])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", default="runs/zoo-snapshots")
    a = ap.parse_args()
    todo = [(a.config, k, h, a.work) for k, h in available(a.config)
            if h in a.heads and not (model_path(a.config, k, h) / "snapshots").is_dir()]
    install_term_handler()  # SIGTERM stops the workers too (they resume on the next call)
    try:
        run_in_processes(retrain, todo, a.jobs, on_done=lambda i, line: print(line, flush=True))
    except Terminated:
        raise SystemExit("stopped: rerun the same command to resume")


if __name__ == "__main__":
    main()
