"""Figure and Markdown table of the time-to-quality runs (benchmarks/time_to_quality.py) under a folder.

    .venv/bin/python scripts/ttq_report.py benchmarks/results/ttq --figure docs/img/time_to_quality_recipes.png \
        [--e5 RUN/e5/e5_risk.csv] [--zoo zoo/D/seed1/h4/meta.json]

One panel per marker n (d/2, d, 2d): validation risk against CPU seconds, one line per
recipe (configuration = first letter of the name). The table gives each finished run's
test-prompt risk at the last snapshot with its 95% CI and the relative improvement over
the last doubling of steps (the convergence test, docs/training.md).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_runs(root: Path) -> dict[str, list[dict[str, float]]]:
    runs = {}
    for log in sorted(root.glob("*/ttq.csv")):
        with log.open() as fh:
            runs[log.parent.name] = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    return runs


def zoo_curve(meta_json: Path) -> tuple[str, list[dict[str, float]]]:
    """A zoo model's validation history (``meta.json``) as a curve: its wall seconds stand in for CPU
    seconds (zoo models train on one torch thread; exact only where the process had its core to itself)."""
    meta = json.loads(meta_json.read_text())
    parts = meta_json.parent.parts  # .../<config>/seed<k>/h<h>
    name = f"{parts[-3]}-zoo-{parts[-2]}-{parts[-1]} (wall)"
    return name, [{"step": r["step"], "cpu_s": r["wall_s"], **{k: r[k] for k in r if k.startswith("r@")}}
                  for r in meta["history"]]


def table(root: Path, runs: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| recipe | steps | CPU min | " + " | ".join(["r@5 (test)", "r@10 (test)", "r@20 (test)"])
             + " | last doubling r@10 / r@20 | converged |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        conv = root / name / "convergence.json"
        last = rows[-1]
        if not conv.exists():
            val = " | ".join(f"{last[k]:.4f} (val, running)" for k in last if k.startswith("r@"))
            lines.append(f"| {name} | {int(last['step'])} | {last['cpu_s'] / 60:.1f} | {val} | – | running |")
            continue
        v = json.loads(conv.read_text())
        at = v["at"]
        cells = [f"{at[n]['risk']:.4f} [{at[n]['ci'][0]:.4f}, {at[n]['ci'][1]:.4f}]" for n in ("5", "10", "20")]
        lines.append(f"| {name} | {v['to_step']} | {last['cpu_s'] / 60:.1f} | " + " | ".join(cells)
                     + f" | {at['10']['improvement']:+.1%} / {at['20']['improvement']:+.1%} | "
                     + ("yes" if v["converged"] else "no") + " |")
    return "\n".join(lines)


def references(e5_csv: Path | None) -> dict[str, tuple[float, float]]:
    """Ridge and lasso risk at the marker n's from an E5 run's ``e5_risk.csv`` (same task)."""
    if e5_csv is None:
        return {}
    with e5_csv.open() as fh:
        got = {(r["estimator"], int(r["n"])): float(r["risk_norm"]) for r in csv.DictReader(fh)}
    return {f"r@{n}": (got[("ridge", n)], got[("lasso", n)]) for n in (5, 10, 20)}


def figure(runs: dict[str, list[dict[str, float]]], path: Path, refs: dict[str, tuple[float, float]]) -> None:
    keys = ["r@5", "r@10", "r@20"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    styles = {"A": "-", "B": "--", "C": ":", "D": "-."}
    for name, rows in runs.items():
        for ax, k in zip(axes, keys):
            ax.plot([r["cpu_s"] / 60 for r in rows], [r[k] for r in rows], styles.get(name[0], "-"), label=name)
    for ax, k in zip(axes, keys):
        if k in refs:
            ridge, lasso = refs[k]
            ax.axhline(ridge, color="grey", lw=0.8, ls="--")
            ax.axhline(lasso, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xscale("log")  # 16k-step recipes (minutes) beside 64k-128k-step runs (an hour)
        ax.set_title(f"{k} (validation prompts); grey: ridge --, lasso :")
        ax.set_xlabel("CPU minutes (one core, log scale)")
    axes[0].set_ylabel("normalised excess risk")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--e5", type=Path, help="an E5 e5_risk.csv of the same task: ridge/lasso reference lines")
    ap.add_argument("--zoo", type=Path, action="append", default=[],
                    help="a zoo model's meta.json: its validation history joins the figure (not the table)")
    a = ap.parse_args()
    runs = read_runs(a.root)
    print(table(a.root, runs))
    if a.figure:
        figure({**runs, **dict(zoo_curve(m) for m in a.zoo)}, a.figure, references(a.e5))


if __name__ == "__main__":
    main()
