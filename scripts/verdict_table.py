"""A markdown table of the across-seed verdicts of one or more reproduce runs (the README's table).

Per claim and variant (ablation kind, read-out), the key statistic of each configuration: every
seed's value, the mean over seeds with its 95% CI and the 95% prediction interval for a new seed (on
the statistic's scale: log for ratios, logit for bounded ones), the sign count (seeds that pass) and
the verdict -- all read from each run's ``verdicts.json``, nothing recomputed.

    .venv/bin/python scripts/verdict_table.py runs/quick/A runs/quick/B runs/quick/C
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _g(x: float) -> str:
    return f"{x:.3g}"


def _seeds(evidence: str) -> str:
    """Every seed's value, from the evidence line ``...: seed 0: v0, seed 1: v1; mean ...``."""
    head = re.split(r"; (?:geometric )?mean", evidence)[0]
    return " / ".join(re.findall(r"seed \d+: (-?[\d.]+(?:e-?\d+)?)", head))


def cell(v: dict) -> str:
    st = v["stats"][0] if v.get("stats") else None
    if st is None:
        return f"{v['verdict']}"
    seeds = _seeds(v["evidence"][0])
    n = len(seeds.split(" / ")) if seeds else 0
    return (f"{seeds}<br>mean {_g(st['value'])} [{_g(st['ci'][0])}, {_g(st['ci'][1])}], PI [{_g(st['pi'][0])}, "
            f"{_g(st['pi'][1])}], {st['passes']}/{n} pass (needs {'>' if st['above'] else '<'} {_g(st['threshold'])})"
            f"<br>**{v['verdict']}**")


def main(folders: list[str]) -> None:
    runs = {Path(f).name: json.loads((Path(f) / "verdicts.json").read_text()) for f in folders}
    claims = list(dict.fromkeys(v["claim"] for vs in runs.values() for v in vs))
    print("| claim (key statistic) | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for c in claims:
        row = []
        for vs in runs.values():
            hit = [v for v in vs if v["claim"] == c]
            row.append(cell(hit[0]) if hit else "–")
        name = hit[0]["stats"][0]["name"] if hit and hit[0].get("stats") else ""
        print(f"| {c}" + (f" ({name})" if name else "") + " | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
