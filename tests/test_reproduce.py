"""`reproduce --preset smoke` end to end: sections, figures, verdicts recomputed from the CSVs, reuse, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SECTIONS = ["## Verdicts", "## E1 — heads sweep", "## E2 — head assessment", "## E3 — pruning",
            "## E4 — layer-wise probes", "## E5 — algorithms", "## E6 — mechanism", "## E7 — emergence during training",
            "## Provenance"]
N_STAGES = 1 + 1 + 2 * 6 + 1  # e5, train, 2 seeds x (e1 e2 e3 e4 e6 e7), report


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "icl_heads", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    t = time.perf_counter()
    res = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(out), "--device", "cpu"),
                         capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"[1/{N_STAGES}] e5" in res.stderr and "report at" in res.stdout
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - t:.1f}")
    return out


@pytest.mark.slow  # end-to-end
def test_statistics_match_the_reference_run(run):
    """Every CSV cell, summary value and verdict of the smoke run equals the run made by the code
    before the analysis-speed work (tests/reference_run.py) within 1e-6 relative."""
    from reference_run import compare, fingerprint, kernels, load, reference_path

    if not reference_path().exists():
        pytest.skip(f"no smoke reference for this machine's CPU kernels ({kernels()}): see tests/reference_run.py")
    msg = compare(load(reference_path()), fingerprint(run), rtol=1e-6)
    assert msg is None, msg


def test_reference_comparison_catches_a_changed_number(run):
    from reference_run import compare, fingerprint

    ref = fingerprint(run)
    got = json.loads(json.dumps(ref))
    cell = got["seed0/e3/claim2a.csv"][3]
    key = next(k for k, v in cell.items() if isinstance(v, float) and v not in (0.0,) and v == v)
    cell[key] *= 1 + 1e-5
    assert compare(ref, got, rtol=1e-6) == f"/seed0/e3/claim2a.csv[3]/{key}: {ref['seed0/e3/claim2a.csv'][3][key]!r} " \
        f"in the reference, {cell[key]!r} now"
    assert compare(ref, got, rtol=1e-4) is None
    residue = json.loads(json.dumps(ref))  # E6c's float64 rounding residue: equal below 1e-9, compared above
    row = residue["seed0/e6/e6c_construct.csv"][1]
    row["max_abs_dev"] = 2 * row["max_abs_dev"] + 1e-12
    assert compare(ref, residue, rtol=1e-6) is None
    row["max_abs_dev"] = 1e-6
    assert compare(ref, residue, rtol=1e-6).startswith("/seed0/e6/e6c_construct.csv[1]/max_abs_dev")


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # end-to-end
def test_report_has_every_section_figure_and_verdict(run):
    md = (run / "report.md").read_text()
    pos = [md.index(s) for s in SECTIONS]
    assert pos == sorted(pos)
    figures = [line[line.index("](") + 2:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(figures) >= 8
    for f in figures:
        assert (run / f).stat().st_size > 1000, f
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)
    # the answer first: the claim summary and its chart before any experiment, the evidence folded away
    head = md[: md.index("## E1")]
    assert "summary.png" in head and "transformer h=2 (mean [min, max] over 2 seeds)" in head
    assert head.count("<details>") >= 2 and "Rule — " in head
    assert html.index("<details>") < html.index("<h2>E1")
    verdicts = json.loads((run / "verdicts.json").read_text())
    assert [key(v["claim"]) for v in verdicts] == (["1a"] + [f"1b/{k}" for k in KINDS]
                                                   + [f"2a/{k}/{r}" for k in KINDS for r in ("model", "probe")]
                                                   + ["2b", "2c", "3."])
    for v in verdicts:
        assert v["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        assert v["verdict"].upper() in md
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and "torch" in manifest["environment"]["packages"]
    assert set(manifest["stage_wall_s"]) >= {"e5", "train"} | {f"seed{k}/{s}" for k in (0, 1)
                                                              for s in ("e1", "e2", "e3", "e4", "e6", "e7")}


def _bands(path: Path, key: str, label: str) -> dict[int, tuple[float, float]]:
    return {int(r["n"]): (float(r["ci_low"]), float(r["ci_high"])) for r in rows(path) if r[key] == label}


KINDS = ("zero", "mean", "resample")


def key(claim: str) -> str:
    """Short key of a report claim: "1a", "1b/<kind>", "2a/<kind>/<model|probe>", "2b", "2c", "3."."""
    kind = next((k for k in KINDS if f"{k} ablation" in claim), None)
    if claim.startswith("1b"):
        return f"1b/{kind}"
    if claim.startswith("2a"):
        return f"2a/{kind}/{'probe' if 'probe after' in claim else 'model'}"
    return claim[:2]


def seed_verdicts_from_csvs(sd: Path) -> dict[str, str]:
    """Each per-seed rule recomputed from one seed's files, independently of icl_heads.report.

    Keys: "1a", "1b/<ablation>", "2a/<ablation>/<readout>", "2b", "2c".
    """
    got = {}
    # 1a: h=2 vs h=1, n >= d/2 = 2.5
    a, b = _bands(sd / "e1/e1_heads.csv", "label", "transformer h=2"), _bands(sd / "e1/e1_heads.csv", "label", "transformer h=1")
    ns = [n for n in a if n >= 2.5]
    below = sum(a[n][1] < b[n][0] for n in ns)
    above = sum(a[n][0] > b[n][1] for n in ns)
    got["1a"] = "reproduced" if 2 * below >= len(ns) and above == 0 else "not reproduced" if above > below else "inconclusive"
    # 1b, per ablation kind: e2/claim1b.csv, thresholds of docs/report.md (h = 2: N_eff contrast > 1/3)
    def judged(checks: list[tuple[dict[str, str], float, bool]]) -> str:
        """(row, threshold, above) -> reproduced if every CI clears, not reproduced if some CI is wholly on the wrong side."""
        lo_hi = [(float(r["ci_low"]), float(r["ci_high"]), t, up) for r, t, up in checks]
        if all((lo > t) if up else (hi < t) for lo, hi, t, up in lo_hi):
            return "reproduced"
        if any((hi < t) if up else (lo > t) for lo, hi, t, up in lo_hi):
            return "not reproduced"
        return "inconclusive"
    for kind in KINDS:
        c1b = {r["statistic"]: r for r in rows(sd / "e2/claim1b.csv") if r["ablation"] == kind}
        got[f"1b/{kind}"] = judged([(c1b["neff_contrast"], 1 / 3, True), (c1b["keep_top_contrast"], 1.5, True),
                                    (c1b["later_keep_top"], 1.5, False)])
    # 2a: e3/claim2a.csv, pooled over n >= d/2; the fraction lost counts only if single/full's CI is above 1
    for kind in KINDS:
        for readout, col in (("model", "model"), ("probe", "probe_ln")):
            at = {r["statistic"]: r for r in rows(sd / "e3/claim2a.csv")
                  if r["ablation"] == kind and r["readout"] == col and r["n"] == "pooled"}
            checks = [(at["pruned_over_full"], 1.25, False), (at["control_over_pruned"], 1.0, True)]
            if float(at["single_over_full"]["ci_low"]) > 1:
                checks.append((at["fraction_lost"], 0.25, False))
            elif judged(checks) == "reproduced":  # an undefined fraction can never be passed
                checks.append(({"ci_low": "nan", "ci_high": "nan"}, 0.25, False))
            got[f"2a/{kind}/{readout}"] = judged(checks)
    # 2b: layer-1 probes, mean over n >= d/2 = 3, band = mean half-width
    def probe(model: str) -> tuple[float, float]:
        rs = [r for r in rows(sd / "e4/probes.csv") if r["model"] == model and r["layer"] == "1" and int(r["n"]) >= 3]
        m = sum(float(r["risk_norm"]) for r in rs) / len(rs)
        return m, sum((float(r["ci_high"]) - float(r["ci_low"])) / 2 for r in rs) / len(rs)
    (m, mh), (s, sh) = probe("h=2 full"), probe("h=1 full")
    got["2b"] = "reproduced" if s - sh > m + mh else "not reproduced" if s + sh < m - mh else "inconclusive"
    # 2c: the h=2 model's own read-out per layer >= 2, matched step, all n: which algorithm is closer
    tracks = {r["tracks"] for r in rows(sd / "e6/e6b_verdict.csv") if r["model"] == "h2" and r["readout"] == "lens"
              and r["eta_fit"] == "match" and r["n_range"] == "all"}
    assert tracks and tracks <= {"pto", "gd", "tie", "neither"}
    got["2c"] = "reproduced" if tracks == {"pto"} else "not reproduced" if tracks == {"gd"} else "inconclusive"
    return got


def _transform(st: dict):
    """The across-seed scale of a statistic (docs/report.md): log, logit on its bounds, or linear."""
    if st["scale"] == "log":
        return np.log
    if st["scale"] == "logit":
        lo, hi = st["bounds"]
        return lambda v: (lambda u: np.log(u / (1 - u)))(np.clip((v - lo) / (hi - lo), 1e-6, 1 - 1e-6))
    return lambda v: v


@pytest.mark.slow  # end-to-end
def test_verdicts_follow_from_the_csvs(run):
    """Recompute every seed's verdicts from its files, then the across-seed rule with a hand t-interval."""
    from scipy import stats

    verdicts = {key(v["claim"]): v for v in json.loads((run / "verdicts.json").read_text())}
    per_seed = [seed_verdicts_from_csvs(run / f"seed{k}") for k in (0, 1)]
    assert set(verdicts) == set(per_seed[0]) | {"3."}
    for claim in per_seed[0]:
        v = verdicts[claim]
        assert [p["verdict"] for p in v["per_seed"]] == [ps[claim] for ps in per_seed], claim
        assert [p["seed"] for p in v["per_seed"]] == [0, 1]
        clears, fails = [], []
        for st in v["stats"]:
            vals = np.array([p["stats"][st["name"]] for p in v["per_seed"]], dtype=float)
            tr = _transform(st)
            z, zt = tr(vals), tr(np.array(st["threshold"]))
            half = stats.t.ppf(0.975, 1) * z.std(ddof=1) / np.sqrt(2)
            lo, hi = z.mean() - half, z.mean() + half
            side = (z > zt) if st["above"] else (z < zt)
            clears.append(bool(side.all()) and bool(lo > zt if st["above"] else hi < zt))
            fails.append(bool((~side).all()) and bool(hi < zt if st["above"] else lo > zt))
        own = {ps[claim] for ps in per_seed}
        want = ("reproduced" if clears and all(clears) and "not reproduced" not in own
                else "not reproduced" if any(fails) and "reproduced" not in own else "inconclusive")
        assert v["verdict"] == want, claim
    # 3: PtO band below both GD and ridge at some n
    e5 = run / "e5/e5_risk.csv"
    pto, gd, ridge = (_bands(e5, "estimator", k) for k in ("pto", "gd", "ridge"))
    wins = [n for n in pto if pto[n][1] < gd[n][0] and pto[n][1] < ridge[n][0]]
    assert verdicts["3."]["verdict"] == ("reproduced" if wins else "not reproduced")


@pytest.mark.slow  # end-to-end
def test_verdicts_across_seeds_use_every_seed(run, tmp_path):
    """Identical seeds decide a claim by its own rule; one flipped seed makes the claim inconclusive."""
    from icl_heads.config import get_preset
    from icl_heads.claims.rules import compute_verdicts, seed_verdicts

    same = tmp_path / "same"
    shutil.copytree(run, same)
    shutil.rmtree(same / "seed1")
    shutil.copytree(same / "seed0", same / "seed1")
    preset = get_preset("smoke")
    seed0 = {key(v.claim): v for v in seed_verdicts(same / "seed0", preset)}
    own = {k: v.verdict for k, v in seed0.items()}
    both = {key(v.claim): v.verdict for v in compute_verdicts(same, preset, 2)}
    for claim, v in seed0.items():  # zero spread: the interval over seeds is the point value itself
        ok = [s.passes_value(s.value) for s in v.stats]
        bad = [s.fails_value(s.value) for s in v.stats]
        want = ("reproduced" if ok and all(ok) and v.verdict != "not reproduced"
                else "not reproduced" if any(bad) and v.verdict != "reproduced" else "inconclusive")
        assert both[claim] == want, claim
    c2a = same / "seed1/e3/claim2a.csv"
    table = rows(c2a)
    if own["2a/zero/model"] == "not reproduced":  # make seed 1 clearly reproduce 2a
        flipped, seed1 = {"pruned_over_full": (1.0, 0.99, 1.01), "single_over_full": (3.0, 2.5, 3.5),
                          "fraction_lost": (0.0, -0.01, 0.01), "control_over_pruned": (20.0, 19.0, 21.0)}, "reproduced"
    else:  # make seed 1 clearly fail 2a
        flipped, seed1 = {"pruned_over_full": (9.0, 8.0, 10.0)}, "not reproduced"
    for r in table:
        if r["ablation"] == "zero" and r["readout"] == "model" and r["n"] == "pooled" and r["statistic"] in flipped:
            r["value"], r["ci_low"], r["ci_high"] = flipped[r["statistic"]]
    with open(c2a, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    mixed = {key(v.claim): v for v in compute_verdicts(same, preset, 2)}
    flip = mixed["2a/zero/model"]
    assert flip.verdict == "inconclusive"
    assert [p["verdict"] for p in flip.per_seed] == [own["2a/zero/model"], seed1]
    assert flip.evidence[-1] == f"per-seed verdicts: seed 0 {own['2a/zero/model']}, seed 1 {seed1}"
    assert mixed["2a/zero/probe"].verdict == both["2a/zero/probe"]  # the probe judgement was not touched
    one = {key(v.claim): v.verdict for v in compute_verdicts(run, preset, 1)}
    assert {v for k, v in one.items() if k != "3."} == {"inconclusive"}  # one seed decides nothing


@pytest.mark.slow  # end-to-end
def test_emergence_snapshots_and_table(run):
    """E7: every seed's largest-h model has its planned snapshots, and emergence.csv covers each of them."""
    from icl_heads.config import get_preset
    from icl_heads.training import snapshot_steps

    planned = snapshot_steps(get_preset("smoke").train)
    for k in (0, 1):
        snaps = sorted(p.name for p in (run / f"seed{k}/e1/models/h2/snapshots").iterdir())
        assert snaps == [f"step{s:06d}" for s in planned]
        e7 = rows(run / f"seed{k}/e7/emergence.csv")
        assert sorted({int(r["step"]) for r in e7}) == planned
        assert {"step", "layer", "top_share", "ci_low", "ci_high", "pruned_ratio", "risk_norm_at_d"} <= set(e7[0])
        assert len(e7) == len(planned) * 2  # one row per snapshot and layer (L = 2)
    assert (run / "e7_emergence.png").stat().st_size > 1000


@pytest.mark.slow  # end-to-end
def test_rerun_reuses_everything(run):
    markers = {p: p.stat().st_mtime_ns for p in run.rglob("stage.json")}
    t = time.perf_counter()
    res = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(run), "--device", "cpu"),
                         capture_output=True, text=True, timeout=300, env=env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert time.perf_counter() - t < 60
    assert res.stderr.count("reused") == N_STAGES - 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("stage.json")} == markers


@pytest.mark.slow  # end-to-end
def test_other_config_in_same_folder_is_refused(run):
    res = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(run), "--set", "train.steps=7"),
                         capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: out:")


IDENTICAL = ("seed0/e1/e1_heads.csv", "seed0/e2/head_importance.csv", "seed0/e3/pruning.csv",
             "seed1/e1/e1_heads.csv", "seed1/e3/pruning.csv", "seed0/e7/emergence.csv", "seed1/e7/emergence.csv",
             "seed1/e1/models/h2/snapshots/step000300/model.safetensors", "verdicts.json")


@pytest.mark.slow  # end-to-end
def test_kill_mid_training_then_resume_gives_same_numbers(run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli("reproduce", "--preset", "smoke", "--out", str(out), "--device", "cpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    ckpt = out / "seed0/e1/models/h1/meta.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    assert not (out / "seed0/e1/stage.json").exists(), "killed too late: E1 had already finished"
    assert (out / "e5/stage.json").exists()
    e5_before = (out / "e5/e5_risk.csv").read_bytes()
    res = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(out), "--device", "cpu"),
                         capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "e5: done earlier" in res.stderr  # finished work was kept, not redone
    assert (out / "e5/e5_risk.csv").read_bytes() == e5_before
    for rel in IDENTICAL:
        assert (out / rel).read_bytes() == (run / rel).read_bytes(), rel
    shutil.rmtree(out)


def process_group(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (the run's parent, its workers, the resource tracker)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def as_from_a_terminal() -> None:
    """Start the run with SIGINT at its default, as a command typed at a terminal has it. A test suite started
    in the background by a shell without job control (``cmd &`` in a script, as a CI runner may) inherits
    SIGINT *ignored*, and so would the run: it honours that, as a background job should, and a Ctrl-C sent to
    it changes nothing (the run went on to exit 0; seen in suites started with ``(nohup .ci/run &)``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_during_training(proc: subprocess.Popen, sig: int, wait_for: Path, since_ns: int = 0) -> str:
    """Send ``sig`` to the parent once ``wait_for`` is newer than ``since_ns``; assert the whole process group
    is gone within 10 s, the exit code is 128 + sig and stderr ends in one line saying how to resume."""
    deadline = time.time() + 300
    while (not wait_for.exists() or wait_for.stat().st_mtime_ns <= since_ns) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    t = time.time()
    proc.send_signal(sig)  # the parent only, as `kill` would: it must end its workers itself
    _, err = proc.communicate(timeout=60)
    while process_group(proc.pid) and time.time() - t < 10:
        time.sleep(0.1)
    assert process_group(proc.pid) == [], "processes of the run survived the signal"
    assert time.time() - t < 10
    assert proc.returncode == 128 + sig, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln]
    assert "Traceback" not in err and "Warning" not in err, err[-2000:]
    assert lines[-1] == "interrupted: rerun the same command to resume (finished work is kept)", lines[-3:]
    return err


@pytest.mark.slow
def test_sigterm_then_sigint_stop_every_process_and_the_rerun_is_identical(run, tmp_path):
    """SIGTERM during training, then SIGINT during the resumed training: nothing survives either, and the
    final rerun ends byte-identical to the uninterrupted run."""
    out = tmp_path / "signals"
    args = cli("reproduce", "--preset", "smoke", "--out", str(out), "--device", "cpu")
    ckpt = out / "seed0/e1/models/h1/meta.json"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    interrupt_during_training(proc, signal.SIGTERM, ckpt)
    assert not (out / "train/stage.json").exists(), "interrupted too late: training had finished"
    assert json.loads(ckpt.read_text())["finished"] is False
    before = ckpt.stat().st_mtime_ns
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True, preexec_fn=as_from_a_terminal)
    interrupt_during_training(proc, signal.SIGINT, ckpt, since_ns=before)
    assert not (out / "train/stage.json").exists()
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "e5: done earlier" in res.stderr
    for rel in IDENTICAL:
        assert (out / rel).read_bytes() == (run / rel).read_bytes(), rel
    assert not list(out.rglob(".lock")), "a finished run leaves no lock behind"
    shutil.rmtree(out)


@pytest.mark.slow  # end-to-end
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_report_renders_with_images_in_chromium(run, tmp_path):
    shot = tmp_path / "report.png"
    res = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts/check_report_html.py"),
                          str(run / "report.html"), str(shot)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert shot.stat().st_size > 10_000


@pytest.mark.slow  # end-to-end
def test_sigmas_train_their_own_models_and_name_their_verdicts(tmp_path):
    """--sigmas: each other noise level trains its own models under sigma{value}/ and gets its own verdict rows."""
    out = tmp_path / "sig"
    small = ["--set", "train.steps=40", "--set", "train.warmup_steps=5", "--set", "eval.n_test=60",
             "--set", "eval.n_val=40", "--set", "eval.n_emergence=40"]
    res = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(out), "--sigmas", "0.1,0.5", *small),
                         capture_output=True, text=True, timeout=600, env=env())
    assert res.returncode == 0, res.stderr[-3000:]
    for k in (0, 1):
        for prefix in ("", "sigma0.5/"):
            assert (out / f"{prefix}seed{k}/e1/models/h2/meta.json").exists()
    base = json.loads((out / "seed0/e1/models/h1/meta.json").read_text())["task"]["sigma"]
    other = json.loads((out / "sigma0.5/seed0/e1/models/h1/meta.json").read_text())["task"]["sigma"]
    assert (base, other) == (0.1, 0.5)
    claims = [v["claim"] for v in json.loads((out / "verdicts.json").read_text())]
    assert sum(c.endswith("[sigma=0.1]") for c in claims) == sum(c.endswith("[sigma=0.5]") for c in claims) == 12
    assert json.loads((out / "manifest.json").read_text())["sigmas"] == [0.1, 0.5]
    bad = subprocess.run(cli("reproduce", "--preset", "smoke", "--out", str(tmp_path / "b"), "--sigmas", "0.1,x"),
                         capture_output=True, text=True, timeout=120, env=env())
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: sigmas:") and "Traceback" not in bad.stderr


@pytest.mark.slow  # end-to-end
def test_e1_estimator_rows_taken_from_e5_equal_a_fresh_tuning(run):
    """E1 (first seed) reuses E5's tuned rows; they must equal tuning the estimators again on E1's prompts."""
    from icl_heads.config import get_preset
    from icl_heads.experiments.heads_sweep import E1_ESTIMATORS, estimator_rows

    fresh = {(r["label"], int(r["n"])): r for r in estimator_rows(get_preset("smoke"), E1_ESTIMATORS)}
    used = {(r["label"], int(r["n"])): r for r in rows(run / "seed0/e1/e1_heads.csv") if r["kind"] == "estimator"}
    assert set(used) == set(fresh)
    for key, r in used.items():
        for col in ("risk_norm", "ci_low", "ci_high"):
            assert float(r[col]) == pytest.approx(fresh[key][col], rel=1e-12, abs=1e-300), (key, col)
        assert r["hparams"] == fresh[key]["hparams"]


def test_eta_prices_stages_by_their_measured_cost_and_says_so():
    """A stage kind that ran already is priced at its measured cost; the line names the machine."""
    from icl_heads.config import get_preset
    from icl_heads.reproduce import StageRunner, machine, stage_names

    r = StageRunner(Path("."), get_preset("smoke"), stage_names(2), log=lambda m: None)
    assert r._eta("e5").startswith("? (no stage measured yet)")
    r.wall.update({"e5": 10.0, "train": 100.0, "seed0/e1": 1.0, "seed0/e2": 2.0, "seed0/e3": 3.0,
                   "seed0/e4": 4.0, "seed0/e6": 6.0, "seed0/e7": 7.0})
    eta = r._eta("seed1/e1")  # seed 1's six stages cost what seed 0's did; the report by its share
    from icl_heads.reproduce import _WEIGHTS
    spent = sum(r.wall.values())
    done_w = _WEIGHTS["e5"] + _WEIGHTS["train"] + sum(_WEIGHTS[k] for k in ("e1", "e2", "e3", "e4", "e6", "e7"))
    want = 23.0 + _WEIGHTS["report"] * spent / done_w
    assert eta.startswith(f"{int(round(want))}s (6 of 7 stages left measured in this run on {machine()}")
