"""One command-line surface: ``--set`` on every command that has overrides (short flags are aliases of it),
one name for the process count (``--jobs``); in-process, no subprocess per flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from icl_heads.cli import main
from icl_heads.config import get_preset
from icl_heads.io import read_csv
from icl_heads.training import train

TINY = {"train.steps": 8, "train.warmup_steps": 2, "train.eval_every": 8, "train.checkpoint_every": 8,
        "train.n_eval_prompts": 16, "train.batch_size": 8, "model.d_model": 16}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "h2"
    train(get_preset("smoke", **TINY), 2, path, progress=False)
    return path


def bad(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("cmd,extra", [("assess-heads", ["--boot", "20"]), ("probe", [])])
def test_set_is_the_long_form_of_prompts_and_seed_on_analysis_commands(ckpt, tmp_path, cmd, extra):
    short = tmp_path / "short"
    long = tmp_path / "long"
    main([cmd, str(ckpt), "--out", str(short), "--device", "cpu", "--prompts", "12", "--seed", "3", *extra])
    main([cmd, str(ckpt), "--out", str(long), "--device", "cpu", "--set", "eval.n_test=12", "--set", "seed=3",
          *extra])
    name = "head_importance.csv" if cmd == "assess-heads" else "probes.csv"
    assert read_csv(short / name) == read_csv(long / name)
    other = tmp_path / "other"  # and the override is not ignored: another seed gives other prompts
    main([cmd, str(ckpt), "--out", str(other), "--device", "cpu", "--set", "eval.n_test=12", "--set", "seed=4",
          *extra])
    assert read_csv(other / name) != read_csv(long / name)


def test_set_on_an_analysis_command_is_validated(ckpt, tmp_path, capsys):
    err = bad(capsys, ["assess-heads", str(ckpt), "--out", str(tmp_path / "o"), "--device", "cpu",
                       "--set", "task.s=9"])
    assert err.startswith("error: task.s")
    err = bad(capsys, ["mechanism", str(ckpt), "--out", str(tmp_path / "o"), "--device", "cpu", "--set", "x=1"])
    assert err.startswith("error: ")


def test_eval_takes_set_for_its_one_field(ckpt, tmp_path, capsys):
    main(["eval", str(ckpt), "--out", str(tmp_path / "a"), "--device", "cpu", "--prompts", "9"])
    main(["eval", str(ckpt), "--out", str(tmp_path / "b"), "--device", "cpu", "--set", "eval.n_test=9"])
    assert read_csv(tmp_path / "a" / "risk.csv") == read_csv(tmp_path / "b" / "risk.csv")
    err = bad(capsys, ["eval", str(ckpt), "--out", str(tmp_path / "c"), "--device", "cpu", "--set", "train.steps=3"])
    assert err.startswith("error: set: eval reads only eval.n_test")


def test_one_process_count_flag_with_the_old_name_as_alias(tmp_path, capsys):
    for flag in ("--jobs", "--workers"):
        err = bad(capsys, ["sweep-heads", "--preset", "smoke", "--out", str(tmp_path / "o"), "--device", "cpu",
                           flag, "0"])
        assert err.startswith(f"error: {flag[2:]}: must be >= 1")  # the message names the flag given
    err = bad(capsys, ["sweep-heads", "--preset", "smoke", "--out", str(tmp_path / "o"), "--device", "cpu",
                       "--jobs", "1", "--workers", "2"])
    assert err.startswith("error: jobs: --workers is its old name")
