"""Bad input on the command line, in-process (click's CliRunner isolation, no subprocess): every case exits
non-zero with one line ``error: <field>: ...`` on stderr and no traceback, before any work is done."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from icl_heads.cli import main


def invoke(*args: str) -> tuple[int, str, str]:
    """Run ``icl-heads ARGS`` through :func:`icl_heads.cli.main` (the entry point, with its error handling)."""
    with CliRunner().isolation() as (out, err, _):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue().decode(), err.getvalue().decode()


CASES = [
    ("unknown-preset", ["estimators", "--preset", "huge"], "preset", "huge"),
    ("nan-set", ["estimators", "--preset", "smoke", "--set", "task.sigma=nan"], "task.sigma", "finite"),
    ("bad-jobs", ["reproduce", "--preset", "smoke", "--jobs", "0"], "jobs", "got 0"),
    ("missing-checkpoint", ["assess-heads", "{tmp}/no_such_ckpt"], "checkpoint", "no_such_ckpt"),
    ("missing-checkpoint-eval", ["eval", "{tmp}/no_such_ckpt"], "checkpoint", "no meta.json"),
    ("unknown-config", ["reproduce", "--configs", "A,X"], "configs", "'X'"),
    ("configs-off-the-zoo", ["reproduce", "--preset", "smoke", "--configs", "A"], "configs", "--preset quick"),
    ("prompts-too-few", ["estimators", "--preset", "smoke", "--prompts", "1"], "prompts", "eval.n_val"),
]


@pytest.mark.parametrize("name, args, field, detail", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_field(tmp_path: Path, name: str, args: list[str], field: str,
                                                detail: str) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = invoke(*[a.format(tmp=tmp_path) for a in args], "--out", str(out))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in stderr + stdout, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: ") and detail in lines[0], stderr
    assert not out.exists(), "nothing is written on bad input"


def test_the_runner_sees_a_good_command_succeed() -> None:
    """The harness itself: --help exits 0 and prints the usage (so the failures above are the commands')."""
    code, stdout, stderr = invoke("eval", "--help")
    assert code == 0 and "Usage:" in stdout and "--prompts" in stdout and stderr == ""


@pytest.mark.parametrize("heads, detail", [("x", "integers"), ("0", "positive"), ("3", "none of 3")])
def test_zoo_train_heads_is_checked_before_any_training(tmp_path: Path, heads: str, detail: str) -> None:
    code, stdout, stderr = invoke("zoo", "train", "--config", "E", "--heads", heads, "--minutes", "1",
                                  "--state", str(tmp_path / "state"), "--root", str(tmp_path))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in stderr + stdout and len(lines) == 1, stderr
    assert lines[0].startswith("error: heads: ") and detail in lines[0]
    assert not (tmp_path / "state").exists()
