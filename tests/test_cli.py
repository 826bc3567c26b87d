"""Bad input fails fast: one line naming the field, non-zero exit, no traceback."""

import subprocess
import sys

import pytest

from icl_heads.config import PRESET_NAMES, ConfigError, get_preset


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icl_heads", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--s", "12"], ["task.s", "must be <= d"]),
        (["--sigma", "-0.5"], ["task.sigma"]),
        (["--n-max", "0"], ["task.n_max"]),
        (["--prompts", "1"], ["prompts", "eval.n_val", "eval.n_test"]),
        (["--preset", "huge"], ["preset", "huge"]),
        (["--only", "ridge,magic"], ["estimator", "magic"]),
        (["--d", "ten"], ["--d"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_estimators_bad_input(tmp_path, args, needles):
    assert_one_line_error(run_cli("estimators", "--out", str(tmp_path / "o"), *args), *needles)


def test_every_preset_validates():
    for name in PRESET_NAMES:
        p = get_preset(name)
        assert p.name == name and p.task.s <= p.task.d
        for h in p.heads:
            assert p.model_config_for(h).n_heads == h


def test_override_paths_and_errors():
    assert get_preset("smoke", **{"task.d": 8}).task.d == 8
    with pytest.raises(ConfigError, match="heads"):
        get_preset("smoke", heads=[3])
    with pytest.raises(ConfigError, match="train.lr"):
        get_preset("smoke", **{"train.lr": -1})
    with pytest.raises(ConfigError, match="train.nonsense"):
        get_preset("smoke", **{"train.nonsense": 1})


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--seeds", "0"], ["seeds"]),
        (["--set", "train.steps=-1"], ["train.steps"]),
        (["--set", "nonsense"], ["set", "KEY=VALUE"]),
        (["--set", "task.bogus=1"], ["task.bogus"]),
        (["--device", "tpu"], ["device", "tpu"]),
        (["--threads", "0"], ["threads"]),
        (["--preset", "paper", "--set", "heads=[3]"], ["heads"]),
    ],
)
def test_reproduce_bad_input(tmp_path, args, needles):
    res = run_cli("reproduce", "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "o").exists()  # nothing is created before the config is valid


OUT_COMMANDS = {  # every command with --out, with its other required arguments
    "estimators": ["estimators", "--preset", "smoke"],
    "train": ["train", "--preset", "smoke", "--heads", "1"],
    "eval": ["eval", "CKPT"],
    "sweep-heads": ["sweep-heads", "--preset", "smoke"],
    "assess-heads": ["assess-heads", "CKPT"],
    "prune": ["prune", "CKPT"],
    "probe": ["probe", "CKPT"],
    "mechanism": ["mechanism", "CKPT"],
    "emergence": ["emergence", "CKPT"],
    "reproduce": ["reproduce", "--preset", "smoke"],
    "sweep-arch": ["sweep-arch", "--preset", "smoke"],
}


def test_out_commands_cover_the_cli():
    from icl_heads.cli import app

    with_out = {name for name, cmd in app.commands.items() if any(p.name == "out" for p in cmd.params)}
    assert with_out == set(OUT_COMMANDS)


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
@pytest.mark.parametrize("where", ["proc", "under_file", "is_file"])
def test_unusable_out_folder_is_one_line_exit_2(tmp_path, capsys, command, where):
    """An --out folder that cannot be created or written: ``error: out: <why>``, exit 2, nothing run."""
    from icl_heads.cli import main

    (tmp_path / "file").write_text("x")
    out = {"proc": "/proc/icl_heads_x", "under_file": str(tmp_path / "file" / "sub"),
           "is_file": str(tmp_path / "file")}[where]
    args = [str(tmp_path / "ckpt") if a == "CKPT" else a for a in OUT_COMMANDS[command]]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", out])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: out: ") and out in err, err
    assert not (tmp_path / "ckpt").exists()


def test_unusable_out_folder_subprocess_has_no_traceback():
    res = run_cli("eval", "/nonexistent_ckpt", "--out", "/proc/icl_heads_x")
    assert res.returncode == 2
    assert_one_line_error(res, "out:", "/proc/icl_heads_x")


TINY_SETS = ["--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.snapshots=0",
             "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "eval.n_test=40",
             "--set", "eval.n_val=20"]


def test_sweep_arch_writes_its_table_and_prints_the_risks(tmp_path, capsys):
    """sweep-arch writes table.csv itself (the README promised it; only --table used to) and prints its rows."""
    from icl_heads.cli import main
    from icl_heads.io import read_csv

    out = tmp_path / "arch"
    main(["sweep-arch", "--preset", "smoke", "--layers", "1", "--mlp", "0", "--heads", "1", "--seeds", "1",
          "--out", str(out), *TINY_SETS])
    printed = capsys.readouterr().out
    rows = read_csv(out / "table.csv")
    assert len(rows) == 1 and rows[0]["L"] == "1"
    assert f"L=1 mlp=0 seed 0: excess risk / s tau^2 h=1 n=d {float(rows[0]['h1_risk_nd']):.3f}, " \
           f"n=2d {float(rows[0]['h1_risk_n2d']):.3f}" in printed
    assert f"table of 1 rows written to {out / 'table.csv'}" in printed


def test_sweep_heads_prints_models_beside_the_estimators(tmp_path, capsys):
    from icl_heads.cli import main
    from icl_heads.io import read_csv

    out = tmp_path / "e1"
    main(["sweep-heads", "--preset", "smoke", "--out", str(out), "--set", "heads=[1]", *TINY_SETS])
    lines = capsys.readouterr().out.splitlines()
    assert "n=2 (d/2)" in lines[1] and "n=5 (d)" in lines[1] and "n=10 (2d)" in lines[1]
    rows = {(r["label"], int(r["n"])): r for r in read_csv(out / "e1_heads.csv")}
    for label in ("transformer h=1", "ridge", "bayes"):
        line = next(ln for ln in lines if ln.strip().startswith(label + " "))
        assert f"{float(rows[(label, 5)]['risk_norm']):.3f} [" in line, line


def test_marker_labels_name_only_what_n_is():
    """``estimators --n-max 1`` labelled n = 1 "(d/2)" with d = 5 (issue 26): a capped marker is called n_max."""
    from icl_heads.config import TaskConfig
    from icl_heads.cli.output import risk_lines

    rows = [{"label": "ridge", "n": 1, "risk_norm": 0.5}]
    head = risk_lines(rows, TaskConfig(d=5, s=2, sigma=0.1, n_max=1))[1]
    assert head.split() == ["n=1", "(n_max)"]
    rows = [{"label": "ridge", "n": n, "risk_norm": 0.5} for n in (2, 5, 7)]
    head = risk_lines(rows, TaskConfig(d=5, s=2, sigma=0.1, n_max=7))[1]
    assert head.split() == ["n=2", "(d/2)", "n=5", "(d)", "n=7", "(n_max)"]


def test_one_rule_names_the_marker_lengths_for_every_reader():
    """d/2, d, 2d is written once (``training.marker_names``): the training log's r@n, the commands' last lines
    and the report's tables read the same lengths and names (the report's own copy called a capped 2d "2d")."""
    from icl_heads.config import TaskConfig
    from icl_heads.report import build
    from icl_heads.training import marker_names, marker_ns

    assert marker_names(TaskConfig(d=10, s=2, sigma=0.1, n_max=20)) == {5: "d/2", 10: "d", 20: "2d"}
    assert marker_names(TaskConfig(d=10, s=2, sigma=0.1, n_max=15)) == {5: "d/2", 10: "d", 15: "n_max"}
    assert marker_names(TaskConfig(d=1, s=1, sigma=0.1, n_max=4)) == {1: "d", 2: "2d"}  # d/2 rounds up to d
    assert marker_ns(TaskConfig(d=5, s=2, sigma=0.1, n_max=7)) == [2, 5, 7]
    assert build.marker_names is marker_names
