"""scripts/device_paper.sh on CPU at toy size, so the one-shot GPU script cannot rot.

The sweep phases run for real (two tiny stacks in two processes, the analyses, the table).
Phase 1 (``reproduce --preset paper``) is too slow for the unit suite on CPU and is tested by
tests/test_reproduce.py; here a ``PYTHON`` shim parses its command line with the real CLI
(options, preset, overrides) and records it instead of running it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_paper.sh"

SHIM = '''
import json, runpy, sys
args = sys.argv[1:]
if args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    exec(args[1])
elif args[:3] == ["-m", "icl_heads", "reproduce"]:
    from icl_heads.cli import app
    from icl_heads.cli.options import make_preset, parse_sets
    ctx = app.commands["reproduce"].make_context("reproduce", args[3:])  # parses and checks every option
    p = make_preset(ctx.params["preset"], None, **parse_sets(ctx.params["sets"]))
    json.dump({"args": args[3:], "preset": p.name, "steps": p.train.steps}, open(__file__ + ".json", "w"))
else:
    assert args[0] == "-m", args
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
'''


@pytest.mark.slow  # end-to-end
def test_device_script_dry_run_on_cpu(tmp_path: Path) -> None:
    shim = tmp_path / "py.py"
    shim.write_text(SHIM)
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{shim}" "$@"\n')
    wrapper.chmod(0o755)
    tiny = "--set model.d_model=16 --set train.n_eval_prompts=16 --set train.snapshots=0 --set train.eval_every=1000"
    env = {**os.environ, "PYTHON": str(wrapper), "DEVICE": "cpu", "PAPER_STEPS": "7", "SWEEP_STEPS": "3",
           "SWEEP_LAYERS": "1", "SWEEP_MLP": "0,1", "SWEEP_HEADS": "1,2", "SWEEP_SEEDS": "1", "SWEEP_JOBS": "2",
           "ANALYSIS_JOBS": "2", "BOOT": "10", "OMP_NUM_THREADS": "1", "PAPER_SET": "--set eval.n_test=50",
           "SWEEP_SET": tiny + " --set eval.n_test=30", "ANALYSIS_ARGS": "--prompts 20"}
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "all done (exit 0)" in res.stdout
    rec = json.loads((tmp_path / "py.py.json").read_text())
    assert rec["preset"] == "paper" and rec["steps"] == 7
    assert rec["args"][:2] == ["--preset", "paper"] and "--seeds" in rec["args"] and str(out / "paper") in rec["args"]
    sweep = out / "quick-long"
    for mlp in (0, 1):
        for h in (1, 2):
            meta = json.loads((sweep / f"L1-mlp{mlp}" / "seed0" / f"h{h}" / "meta.json").read_text())
            assert meta["finished"] and meta["step"] == 3 and meta["model_config"]["n_layers"] == 1
            assert meta["model_config"]["mlp"] is bool(mlp) and meta["model_config"]["n_heads"] == h
        assert (sweep / f"L1-mlp{mlp}" / "seed0" / "h2-e2" / "summary.json").exists()
        assert (sweep / f"L1-mlp{mlp}" / "seed0" / "h2-e3" / "summary.json").exists()
    assert len(list((sweep / "stacks").iterdir())) == 2  # one stack per (L, MLP)
    rows = list(csv.DictReader(open(sweep / "table.csv")))
    assert [(r["L"], r["mlp"], r["seed"]) for r in rows] == [("1", "0", "0"), ("1", "1", "0")]
    for r in rows:
        assert 0 < float(r["h1_risk_nd"]) and 0 < float(r["h2_risk_n2d"])
        assert 0.5 <= float(r["h2_top_share_layer1_zero"]) <= 1  # top share of 2 heads is at least 1/2


def test_device_size_from_benchmark_output(tmp_path):
    """scripts/device_size.py turns measured stack rates into step counts that fit the windows."""
    bench = "preset={p} device=cuda threads=1 members={m} (heads ...)\n  stacked {r} model-steps/s  (blocks: 1)\n"
    q, p = tmp_path / "q.txt", tmp_path / "p.txt"
    q.write_text(bench.format(p="quick", m=12, r=3000.0))  # 4 ms per quick stack step
    p.write_text(bench.format(p="paper", m=4, r=400.0))  # 10 ms per paper stack step of 4 members
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "device_size.py"), str(q), str(p), "200", "200"],
                         capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=") for line in out.split())
    # one paper seed, 4 members at 10 ms per stack step: 200 s x 0.6 / 0.01 = 12000 steps
    assert got["PAPER_SEEDS"] == "1" and got["PAPER_STEPS"] == "12000" and got["PAPER_WARMUP"] == "1200"
    # worst sweep stack (L=4, MLP): 4 ms x 4/3 x 1.5 = 8 ms: 120 s / 8 ms = 15000 steps
    assert got["SWEEP_STEPS"] == "15000"
    p.write_text(bench.format(p="paper", m=4, r=200.0))  # twice slower: half the steps
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "device_size.py"), str(q), str(p), "200", "200"],
                         capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=") for line in out.split())
    assert got["PAPER_STEPS"] == "6000"


@pytest.mark.slow  # end-to-end
def test_device_zoo_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """scripts/device_zoo.sh on CPU at toy size: configuration B stacked, exported, cards, verified."""
    script = SCRIPT.parent / "device_zoo.sh"
    tiny = ("--set model.d_model=16 --set train.steps=6 --set train.snapshots=2 --set train.eval_every=3 "
            "--set train.checkpoint_every=3 --set train.n_eval_prompts=16 --set train.batch_size=8 "
            "--set eval.n_test=40 --set eval.n_val=40")
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "ZOO_CONFIGS": "B", "ZOO_SET": tiny,
           "SKIP_PAPER": "1", "ACC_MINUTES": "0.25", "ACC_CONFIGS": "E", "ACC_JOBS": "2", "ACC_FROM_REPO": "0"}
    res = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=600, cwd=SCRIPT.parents[1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    zoo = tmp_path / "out" / "zoo"
    metas = sorted(zoo.glob("B/seed*/h*/meta.json"))
    assert len(metas) == 6  # 3 seeds x h in {1, 4}
    meta = json.loads(metas[0].read_text())
    assert meta["finished"] and meta["step"] == 6 and meta["zoo"]["overrides"]["train.steps"] == 6
    assert "zoo ok" in res.stdout and (zoo / "README.md").exists() and (zoo / "SHA256SUMS").exists()
    assert "6 models exported" in res.stdout
    # the accumulating configuration grew on the device with the same trainer, and stopped on time
    e_metas = sorted(zoo.glob("E/seed*/h*/meta.json"))
    assert e_metas and "cool-downs exported" in res.stdout
    z = json.loads(e_metas[0].read_text())["zoo"]
    assert z["schedule"] == "wsd" and z["stable_steps"] >= 6 and (tmp_path / "out" / "zoo_state" / "E").is_dir()
