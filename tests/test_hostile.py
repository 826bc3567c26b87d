"""Hostile input (issue 18): every bad input is exit 2, one line ``error: ...``, no traceback, nothing on disk changed.

The CLI runs in-process (``icl_heads.cli.main``) so the suite stays fast; every case snapshots the
whole test folder (files with size and mtime, folders) before and after and asserts they are equal.
The first rows are the issue's table; the rest are more bad inputs across the commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from icl_heads.cli import main
from icl_heads.config import get_preset

TINY = {"train.steps": 4, "train.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.snapshots": 0, "train.n_eval_prompts": 8}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny smoke checkpoint, copies of it with edited meta.json, a fake run folder, an eval folder."""
    from icl_heads.training import train

    root = tmp_path_factory.mktemp("hostile")
    train(get_preset("smoke", **TINY), 2, root / "ckpt", progress=False)
    edits: dict[str, Callable[[dict], None]] = {
        "bad_d": lambda m: m["task"].update(d=7),
        "bad_nmax": lambda m: m["task"].update(n_max=12),
        "bad_name": lambda m: m.update(preset="quick"),
        "bad_unknown": lambda m: m.update(preset="huge"),
        "bad_weights": lambda m: m["model_config"].update(d_model=16),
        "bad_layers": lambda m: (m["model_config"].update(n_layers=3), m.pop("preset_config")),
        "bad_arch": lambda m: m["preset_config"]["model"].update(mlp=False),
        "bad_nan": lambda m: m["task"].update(sigma=float("nan")),
    }
    for name, edit in edits.items():
        d = root / name
        d.mkdir()
        for f in (root / "ckpt").iterdir():
            if f.is_file() and f.name != ".lock":
                (d / f.name).write_bytes(f.read_bytes())
        meta = json.loads((d / "meta.json").read_text())
        edit(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    (root / "not_json").mkdir()
    (root / "not_json" / "meta.json").write_text("{oops")
    trunc = root / "truncated"
    trunc.mkdir()
    for f in (root / "ckpt").iterdir():
        if f.is_file():
            (trunc / f.name).write_bytes(f.read_bytes())
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:100])
    run = root / "run"  # the top level of a reproduce run
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"preset": "quick", "fingerprint": "0" * 16, "seeds": 3, "sigmas": []}))
    (run / "manifest.json").write_text("{}")
    sweep = root / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    ev = root / "evaluated"  # an eval command's own output: another analysis may not write there
    main(["eval", str(root / "ckpt"), "--out", str(ev), "--prompts", "20"])
    (root / "empty").mkdir()
    _issue26_folders(root)
    return root


def _copy_ckpt(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    for f in (root / "ckpt").iterdir():
        if f.is_file() and not f.name.startswith("."):
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _issue26_folders(root: Path) -> None:
    """Issue 26's inputs: a checkpoint without checksums (and flipped bytes), one with a NaN weight (checksum
    updated), meta.json as a list and as null, a zoo copy with a bad SHA256SUMS, a finished run's seed folder,
    a stage folder left by an interrupted assess-heads."""
    import hashlib

    from safetensors.torch import load, save

    d = _copy_ckpt(root, "no_sha")
    meta = json.loads((d / "meta.json").read_text())
    del meta["sha256"]
    (d / "meta.json").write_text(json.dumps(meta))
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    data[-9] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    d = _copy_ckpt(root, "nan_weight")
    t = load((d / "model.safetensors").read_bytes())
    t["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    data = save(t)
    (d / "model.safetensors").write_bytes(data)
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"]["model.safetensors"] = hashlib.sha256(data).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    _copy_ckpt(root, "meta_list").joinpath("meta.json").write_text("[1, 2, 3]")
    _copy_ckpt(root, "meta_null").joinpath("meta.json").write_text("null")
    for name, line in (("zoo_escape", f"{hashlib.sha256(b'x').hexdigest()}  ../../../../etc/hostname"),
                       ("zoo_malformed", "not a checksum line")):
        z = root / name
        (z / "A" / "seed0").mkdir(parents=True)
        (z / "A" / "seed0" / "w.txt").write_text("w")
        (z / "SHA256SUMS").write_text(f"{hashlib.sha256(b'w').hexdigest()}  A/seed0/w.txt\n{line}\n")
    (root / "zrun" / "A" / "seed0").mkdir(parents=True)  # a zoo main job's run: R/A/run.json, R/A/seed0/...
    (root / "zrun" / "A" / "run.json").write_text("{}")
    partial = root / "partial"  # assess-heads killed after its first CSV: no config.json yet
    partial.mkdir()
    (partial / ".owner.json").write_text(json.dumps({"experiment": "E2", "command": "assess-heads"}))
    (partial / "head_importance.csv").write_text("layer,head\n")


@pytest.fixture(scope="module")
def live_pid():
    """A live process that is not us: the holder of a foreign lock."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: files with (size, mtime_ns), folders as such."""
    return {str(p.relative_to(root)): ("dir",) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run_bad(capsys, root: Path, args: list[str]) -> str:
    """Run the CLI in-process on ``args``; assert exit 2, one ``error:`` line, no traceback, no change on disk."""
    capsys.readouterr()
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        main(args)
    captured = capsys.readouterr()
    err = captured.err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + captured.out
    assert snapshot(root) == before, f"{args} changed the disk"
    return lines[0]


# (id, args with {root} for the module folder, what the one line must contain)
ISSUE_TABLE = [
    ("reproduce-sigmas-nan", ["reproduce", "--preset", "smoke", "--sigmas", "nan", "--out", "{root}/o"],
     ["sigmas:", "finite"]),
    ("estimators-sigma-nan", ["estimators", "--preset", "smoke", "--sigma", "nan", "--out", "{root}/o"],
     ["task.sigma:", "finite"]),
    ("estimators-sigma-inf", ["estimators", "--preset", "smoke", "--sigma", "inf", "--out", "{root}/o"],
     ["task.sigma:", "finite"]),
    ("reproduce-sigmas-inf", ["reproduce", "--preset", "smoke", "--sigmas", "inf", "--out", "{root}/o"],
     ["sigmas:", "finite"]),
    ("sweep-arch-table-empty", ["sweep-arch", "--preset", "smoke", "--table", "--out", "{root}/empty"],
     ["out:", "no trained sweep"]),
    ("meta-task-d-7", ["eval", "{root}/bad_d", "--out", "{root}/o"], ["task.d:", "says 7", "n_dims is 5"]),
    ("meta-preset-renamed", ["assess-heads", "{root}/bad_name", "--out", "{root}/o"],
     ["preset:", "'quick'", "'smoke'"]),
    ("assess-heads-out-ckpt", ["assess-heads", "{root}/ckpt", "--out", "{root}/ckpt"], ["out:", "checkpoint"]),
    ("eval-out-rundir", ["eval", "{root}/ckpt", "--out", "{root}/run"], ["out:", "run.json"]),
    ("train-out-being-written", ["train", "--preset", "smoke", "--heads", "2", "--out", "{root}/locked"],
     ["out:", "is being written by PID"]),
    ("reproduce-threads-1000", ["reproduce", "--preset", "smoke", "--threads", "1000", "--out", "{root}/o"],
     ["threads:", "1000"]),
    ("meta-model-config-edited", ["eval", "{root}/bad_weights", "--out", "{root}/o"],
     ["weights do not fit", "tensor read_in.weight", "shape (32, 6) in the file vs (16, 6)"]),
]

MORE = [
    ("set-sigma-NaN", ["reproduce", "--preset", "smoke", "--set", "task.sigma=NaN", "--out", "{root}/o"],
     ["task.sigma:"]),
    ("set-sigma-Infinity-train", ["train", "--preset", "smoke", "--heads", "1", "--set", "task.sigma=Infinity",
                                  "--out", "{root}/o"], ["task.sigma:"]),
    ("set-lr-inf", ["train", "--preset", "smoke", "--heads", "1", "--set", "train.lr=Infinity", "--out", "{root}/o"],
     ["train.lr:"]),
    ("set-tau-minus-inf", ["estimators", "--preset", "smoke", "--set", "task.tau=-Infinity", "--out", "{root}/o"],
     ["task.tau:"]),
    ("set-sigmas-nan-list", ["estimators", "--preset", "smoke", "--set", "sigmas=[0.1, NaN]", "--out", "{root}/o"],
     ["sigmas.1:"]),
    ("sigmas-negative", ["reproduce", "--preset", "smoke", "--sigmas", "0.1,-1", "--out", "{root}/o"], ["sigmas:"]),
    ("sigmas-empty", ["reproduce", "--preset", "smoke", "--sigmas", ",", "--out", "{root}/o"], ["sigmas:"]),
    ("sigmas-text", ["reproduce", "--preset", "smoke", "--sigmas", "0.1,x", "--out", "{root}/o"], ["sigmas:"]),
    ("threads-negative", ["reproduce", "--preset", "smoke", "--threads", "-3", "--out", "{root}/o"], ["threads:"]),
    ("seeds-negative", ["reproduce", "--preset", "smoke", "--seeds", "-1", "--out", "{root}/o"], ["seeds:"]),
    ("train-heads-3", ["train", "--preset", "smoke", "--heads", "3", "--out", "{root}/o"], ["heads:"]),
    ("train-steps-0", ["train", "--preset", "smoke", "--heads", "1", "--steps", "0", "--out", "{root}/o"],
     ["train.steps:"]),
    ("train-over-checkpoint", ["train", "--preset", "smoke", "--heads", "2", "--out", "{root}/ckpt"],
     ["out:", "already holds a checkpoint"]),
    ("sweep-heads-workers-0", ["sweep-heads", "--preset", "smoke", "--workers", "0", "--out", "{root}/o"],
     ["workers:"]),
    ("sweep-arch-layers-0", ["sweep-arch", "--preset", "smoke", "--layers", "0", "--out", "{root}/o"], ["layers:"]),
    ("sweep-arch-mlp-2", ["sweep-arch", "--preset", "smoke", "--mlp", "2", "--out", "{root}/o"], ["mlp:"]),
    ("eval-prompts-1", ["eval", "{root}/ckpt", "--prompts", "1", "--out", "{root}/o"], ["prompts:"]),
    ("eval-not-a-checkpoint", ["eval", "{root}/empty", "--out", "{root}/o"], ["not a checkpoint"]),
    ("eval-corrupt-meta", ["eval", "{root}/not_json", "--out", "{root}/o"], ["corrupted JSON"]),
    ("eval-truncated-weights", ["eval", "{root}/truncated", "--out", "{root}/o"], ["checksum mismatch"]),
    ("eval-meta-n-max", ["eval", "{root}/bad_nmax", "--out", "{root}/o"], ["task.n_max:", "says 12"]),
    ("eval-meta-nan-sigma", ["eval", "{root}/bad_nan", "--out", "{root}/o"], ["task:", "finite"]),
    ("eval-layers-missing-tensors", ["eval", "{root}/bad_layers", "--out", "{root}/o"],
     ["missing tensor blocks.2."]),
    ("prune-unknown-preset-in-meta", ["prune", "{root}/bad_unknown", "--out", "{root}/o"], ["preset:", "'huge'"]),
    ("probe-arch-not-trained", ["probe", "{root}/bad_arch", "--out", "{root}/o"], ["preset:", "architecture"]),
    ("assess-heads-boot-5", ["assess-heads", "{root}/ckpt", "--boot", "5", "--out", "{root}/o"], ["boot:"]),
    ("assess-heads-ablation", ["assess-heads", "{root}/ckpt", "--ablation", "magic", "--out", "{root}/o"],
     ["ablation"]),
    ("prune-keep-nonsense", ["prune", "{root}/ckpt", "--keep", "nonsense", "--out", "{root}/o"], ["keep"]),
    ("prune-finetune-negative", ["prune", "{root}/ckpt", "--finetune", "-1", "--out", "{root}/o"], ["finetune:"]),
    ("probe-out-sweep", ["probe", "{root}/ckpt", "--out", "{root}/sweep"], ["out:", "sweep.json"]),
    ("prune-out-eval-results", ["prune", "{root}/ckpt", "--out", "{root}/evaluated"], ["out:", "results of eval"]),
    ("mechanism-out-parent-of-ckpt", ["mechanism", "{root}/ckpt", "--out", "{root}"], ["out:", "checkpoint"]),
    ("mechanism-prompts-2", ["mechanism", "{root}/ckpt", "--prompts", "2", "--out", "{root}/o"], ["prompts:"]),
    ("assess-heads-preset-huge", ["assess-heads", "{root}/ckpt", "--preset", "huge", "--out", "{root}/o"],
     ["preset:", "huge"]),
    ("analysis-out-locked", ["assess-heads", "{root}/ckpt", "--out", "{root}/locked"], ["is being written by PID"]),
    ("reproduce-other-run", ["reproduce", "--preset", "smoke", "--out", "{root}/run"], ["out:", "another config"]),
    ("eval-device-tpu", ["eval", "{root}/ckpt", "--device", "tpu", "--out", "{root}/o"], ["device:"]),
]


TINY_SETS = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]

# issue 26's table (CK = the module's tiny checkpoint)
ISSUE_26 = [
    ("ck-no-checksum-flipped", ["eval", "{root}/no_sha", "--out", "{root}/o"],
     ["sha256:", "missing", "never loaded unverified"]),
    ("ck-nan-weight", ["eval", "{root}/nan_weight", "--out", "{root}/o"],
     ["blocks.0.attn.qkv.weight holds 1 non-finite"]),
    ("zoo-sums-escape", ["zoo", "verify", "--root", "{root}/zoo_escape"], ["line 2", "relative and inside the zoo"]),
    ("zoo-sums-malformed", ["zoo", "verify", "--root", "{root}/zoo_malformed"],
     ["line 2 ('not a checksum line')", "expected"]),
    ("eval-out-zoo", ["eval", "{root}/ckpt", "--out", "{root}/zoo_escape"], ["out:", "is the model zoo"]),
    ("eval-out-zoo-config", ["eval", "{root}/ckpt", "--out", "{root}/zoo_escape/A"], ["out:", "inside the model zoo"]),
    ("eval-out-run-seed", ["eval", "{root}/ckpt", "--out", "{root}/zrun/A/seed0"], ["out:", "inside a reproduce run"]),
    ("eval-out-empty-string", ["eval", "{root}/ckpt", "--out", ""], ["out:", "empty string"]),
    ("eval-into-partial-assess-heads", ["eval", "{root}/ckpt", "--out", "{root}/partial"],
     ["out:", "belongs to `assess-heads`, not `eval`"]),
    ("train-resume-nothing", ["train", "--preset", "smoke", "--heads", "2", "--resume", "--out", "{root}/new"],
     ["resume:", "holds no checkpoint"]),
    ("set-steps-huge", ["train", "--preset", "smoke", "--heads", "1", "--set",
                        "train.steps=1000000000000000000000000000000", "--out", "{root}/o"],
     ["train.steps:", "less than or equal to 10000000"]),
    ("prune-finetune-huge", ["prune", "{root}/ckpt", "--keep", "1:all,2:top1", "--finetune", "100000000000000",
                             "--out", "{root}/o"], ["finetune:", "between 0 and 10000000"]),
    ("set-task-d-x", ["train", "--preset", "smoke", "--heads", "1", "--set", "task.d.x=1", "--out", "{root}/o"],
     ["task.d:", "not a group of fields"]),
    ("meta-list", ["eval", "{root}/meta_list", "--out", "{root}/o"], ["a JSON object is expected, got a list"]),
    ("meta-null", ["eval", "{root}/meta_null", "--out", "{root}/o"], ["a JSON object is expected, got null"]),
    ("sweep-arch-layers-twice", ["sweep-arch", "--preset", "smoke", "--layers", "2,2", "--heads", "1", "--mlp", "0",
                                 "--seeds", "1", "--out", "{root}/o"], ["layers: 2 is listed twice"]),
    ("sweep-arch-heads-empty-item", ["sweep-arch", "--preset", "smoke", "--heads", "1,,2", "--out", "{root}/o"],
     ["heads:", "without empty items"]),
    ("zoo-train-config-empty", ["zoo", "train", "--config", ""], ["config:", "without empty items"]),
    ("resume-shorter", ["train", "--preset", "smoke", "--heads", "2", "--resume", *TINY_SETS, "--steps", "2",
                        "--out", "{root}/ckpt"], ["train.steps:", "at step 4 already (got 2)", "not shortened"]),
    ("resume-other-lr", ["train", "--preset", "smoke", "--heads", "2", "--resume", *TINY_SETS, "--set",
                         "train.lr=0.1", "--out", "{root}/ckpt"], ["train.lr:", "made with 0.003, not 0.1"]),
    ("set-steps-bool", ["train", "--preset", "smoke", "--heads", "1", "--set", "train.steps=true", "--out", "{root}/o"],
     ["train.steps:", "not a boolean"]),
    ("set-threads-cores", ["train", "--preset", "smoke", "--heads", "1", "--set", "train.threads=1000",
                           "--out", "{root}/o"], ["train.threads:", "CPU cores"]),
    ("estimators-prompts-huge", ["estimators", "--preset", "smoke", "--prompts", "100000000", "--out", "{root}/o"],
     ["prompts:", "between 2 and 1000000"]),
    ("sweep-heads-jobs-cores", ["sweep-heads", "--preset", "smoke", "--jobs", "1000", "--out", "{root}/o"],
     ["jobs:", "CPU cores"]),
    ("reproduce-seeds-huge", ["reproduce", "--preset", "smoke", "--seeds", "100000", "--out", "{root}/o"], ["seeds:"]),
]


@pytest.fixture
def locked(base, live_pid):
    """``base/locked``: a folder whose lock a live process holds."""
    d = base / "locked"
    d.mkdir(exist_ok=True)
    (d / ".lock").write_text(json.dumps({"pid": live_pid, "host": os.uname().nodename, "started": "earlier"}))
    return d


@pytest.mark.parametrize("case", ISSUE_TABLE + MORE + ISSUE_26, ids=[c[0] for c in ISSUE_TABLE + MORE + ISSUE_26])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(capsys, base, locked, case):
    _, args, needles = case
    line = run_bad(capsys, base, [a.replace("{root}", str(base)) for a in args])
    for n in needles:
        assert n in line, line


def test_the_suite_is_as_large_as_promised():
    assert len(MORE) >= 20 and len(ISSUE_TABLE) >= 10 and len(ISSUE_26) >= 20


def test_a_diverged_training_is_one_line_and_leaves_no_checkpoint(tmp_path, capsys):
    """lr = 1e30: every weight turns NaN within a few steps; the run stops (exit 2), nothing is marked finished."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "smoke", "--heads", "1", "--steps", "40", "--set", "train.lr=1e30",
              "--set", "train.warmup_steps=1", "--quiet", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert err.startswith("error: train: the loss became non-finite by step ") and "no checkpoint was written" in err
    assert not (tmp_path / "d" / "meta.json").exists()


def test_a_permission_error_is_one_line_exit_1(monkeypatch, tmp_path, capsys):
    """``zoo cards --root RO`` (an immutable folder) raised PermissionError: now one line, exit 1 (the system
    refused, not the input); simulated, since this suite may run as root."""
    import icl_heads.zoo.cards

    def denied(root):
        raise PermissionError(13, "Permission denied", str(root / "README.md"))

    monkeypatch.setattr(icl_heads.zoo.cards, "write_cards", denied)
    with pytest.raises(SystemExit) as e:
        main(["zoo", "cards", "--root", str(tmp_path)])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'README.md'}: permission denied"


@pytest.mark.parametrize("argv,hint", [
    (["train", "--preset", "smoke", "--heads", "1", "--out", "{tmp}/t"],
     "no checkpoint was written yet; rerun the same command to start again"),
    (["prune", "{ckpt}", "--out", "{tmp}/p"], "nothing of this run is kept; rerun the same command to start it again"),
    (["assess-heads", "{ckpt}", "--out", "{tmp}/a"],
     "nothing of this run is kept; rerun the same command to start it again"),
])
def test_ctrl_c_hints_say_only_what_is_true(base, monkeypatch, tmp_path, capsys, argv, hint):
    """A resume hint only where something can be resumed (issue 26: ``train`` interrupted before its first
    checkpoint was told to rerun with --resume; prune and assess-heads claimed finished work is kept)."""
    import icl_heads.experiments.e2_importance
    import icl_heads.experiments.e3_pruning
    import icl_heads.training

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    for mod, name in ((icl_heads.training, "train"), (icl_heads.experiments.e3_pruning, "run_e3"),
                      (icl_heads.experiments.e2_importance, "run_e2")):
        monkeypatch.setattr(mod, name, ctrl_c)
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(base / "ckpt")) for a in argv])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {hint}"


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    """A Ctrl-C while the command line is still being imported (torch takes a second) is one line, exit 130."""
    import builtins

    import icl_heads.__main__ as entry

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli" or name.endswith(".cli"):
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as e:
        entry.run()
    monkeypatch.undo()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted: nothing was started"


def test_version_and_python_dash_m(capsys):
    from icl_heads import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"icl-heads {__version__}"
    r = subprocess.run([sys.executable, "-m", "icl_heads", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"icl-heads {__version__}"


def test_stale_lock_is_taken_over(base, capsys):
    """A lock whose PID is dead is stale: the next writer takes it and removes it when done."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    out = base / "stale"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename, "started": "long ago"}))
    main(["eval", str(base / "ckpt"), "--out", str(out), "--prompts", "20"])
    assert (out / "risk.csv").exists() and not (out / ".lock").exists()
    assert "n=5 (d)" in capsys.readouterr().out  # the headline numbers


def test_rerunning_an_analysis_into_its_own_folder_is_allowed(base, capsys):
    main(["eval", str(base / "ckpt"), "--out", str(base / "evaluated"), "--prompts", "20"])
    assert "evaluation written to" in capsys.readouterr().out


@pytest.mark.slow
def test_two_trainings_into_one_folder_one_is_refused(tmp_path):
    """Two ``train --out SAME`` at once: the second is one line naming the first's PID, exit 2, and writes
    nothing; the first, stopped by SIGTERM, leaves only its own (seed 0) files, no lock, and a resume hint."""
    out = tmp_path / "same"
    args = [sys.executable, "-m", "icl_heads", "train", "--preset", "smoke", "--heads", "2", "--out", str(out),
            "--quiet", "--set", "train.steps=100000", "--set", "train.checkpoint_every=20"]
    first = subprocess.Popen([*args, "--seed", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, holder = time.time() + 120, None
    while holder is None and time.time() < deadline:
        try:
            holder = json.loads((out / ".lock").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    assert holder is not None and holder["pid"] == first.pid
    second = subprocess.run([*args, "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first training ended before the second tried"
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"error: out: {out.resolve()} is being written by PID {first.pid} "
                                     f"(started {holder['started']})")
    while not (out / "meta.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    first.terminate()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143
    assert err.strip().splitlines()[-1] == "interrupted: rerun the same command with --resume to continue the checkpoint"
    metas = [out / "meta.json", *(out / "snapshots").glob("*/meta.json")]
    assert all(json.loads(m.read_text())["seed"] == 0 for m in metas)
    assert not (out / ".lock").exists()


def test_a_full_disk_is_one_line_exit_1(base, monkeypatch, tmp_path, capsys):
    """ENOSPC while results are written: one line naming the file and the cause, exit 1 (simulated)."""
    import errno

    import icl_heads.experiments.evaluate

    def full(ckpt, out, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "risk.csv"))

    monkeypatch.setattr(icl_heads.experiments.evaluate, "evaluate_checkpoint", full)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(base / "ckpt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'o' / 'risk.csv'}: no space left on the device (disk full)"


def test_the_architecture_sweeps_own_analysis_folders_are_allowed_inside_it_others_are_not(tmp_path):
    """sweep-arch reads E2/E3 from ``seed{k}/h{h}-e2`` and ``h{h}-e3`` beside the checkpoint (scripts/device_paper.sh
    writes them there); any other folder inside a sweep stays refused."""
    from icl_heads.config import ConfigError
    from icl_heads.folders import claim_out

    sweep = tmp_path / "sweep"
    (sweep / "L2-mlp0" / "seed0").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    for name in ("h4-e2", "h4-e3", "h4-e4", "elsewhere"):
        (sweep / "L2-mlp0" / "seed0" / name).mkdir()
    claim_out(sweep / "L2-mlp0" / "seed0" / "h4-e2", "E2")
    claim_out(sweep / "L2-mlp0" / "seed0" / "h4-e3", "E3")
    for name, experiment in (("h4-e2", "E3"), ("h4-e4", "E4"), ("elsewhere", "E2")):
        with pytest.raises(ConfigError, match="inside|belongs"):
            claim_out(sweep / "L2-mlp0" / "seed0" / name, experiment)
