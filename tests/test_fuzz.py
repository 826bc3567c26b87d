"""Property-based hostile input (issue 26): hypothesis draws command lines and damaged checkpoints.

Properties, for every drawn input: the exit code is 2 (refused) or the command goes ahead (exit 0, or
its work function is reached); stderr has at most two lines, no traceback; nothing outside ``--out``
changes (every path of the sandbox, with size and mtime, compared before and after).

* :func:`test_command_lines`: argument vectors over every command; half from a pool of hostile values
  per option, half from values that pass on their own (combinations may still be refused). The commands' work functions (training, E1-E7, reproduce, the zoo) are replaced by a
  stub that raises :class:`Reached` -- so a valid vector costs nothing and the property is about what the
  command line accepts: everything it lets through has passed every check (``--out`` claimed included).
* :func:`test_damaged_checkpoints`: a real ``eval`` (tiny prompt set) of a checkpoint whose ``meta.json``
  is mutated (a key deleted, a value replaced by any JSON, the whole document replaced) or whose weights
  are damaged (bytes flipped, truncated, a NaN with its checksum updated).

Examples (300 and 80) and the deadline (30 s per example: room for a command's first import on a loaded
machine) are fixed below; ``derandomize``: the same examples on every run, so a failure reproduces. The
file costs about 14 s of CPU (one core).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from icl_heads.cli import main
from icl_heads.config import get_preset

COMMAND_LINE_EXAMPLES, CHECKPOINT_EXAMPLES = 300, 80
FUZZ = dict(derandomize=True, deadline=30_000, database=None,  # ms; the first import of a command costs seconds
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TINY = {"train.steps": 4, "train.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.snapshots": 0, "train.n_eval_prompts": 8, "model.d_model": 16}


WORK = {  # the functions that do a command's work (none of the checks), by module
    "icl_heads.training": ["train"], "icl_heads.experiments.algorithms": ["run_e5"],
    "icl_heads.experiments.e2_importance": ["run_e2"], "icl_heads.experiments.e3_pruning": ["run_e3"],
    "icl_heads.experiments.e4_probes": ["run_e4"], "icl_heads.experiments.e6_mechanism": ["run_e6"],
    "icl_heads.experiments.e7_emergence": ["run_e7"], "icl_heads.experiments.heads_sweep": ["run_e1"],
    "icl_heads.experiments.arch_sweep": ["run_arch_sweep", "arch_table"],
    "icl_heads.experiments.evaluate": ["evaluate_checkpoint"], "icl_heads.reproduce": ["reproduce"],
    "icl_heads.zoo.reproduce": ["reproduce_zoo"], "icl_heads.zoo": ["train_zoo"],
    "icl_heads.zoo.cards": ["write_cards"],
}


class Reached(Exception):
    """A work function was called: the command line accepted the input."""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Iterator[Path]:
    """``CK``: a tiny smoke checkpoint; ``RUN``: a reproduce run's top; ``ZOO``: a folder with SHA256SUMS."""
    from icl_heads.training import train

    root = tmp_path_factory.mktemp("fuzz")
    train(get_preset("smoke", **TINY), 2, root / "CK", progress=False)
    (root / "RUN").mkdir()
    (root / "RUN" / "run.json").write_text("{}")
    (root / "ZOO" / "A").mkdir(parents=True)
    (root / "ZOO" / "SHA256SUMS").write_text("")
    yield root


@contextmanager
def stubbed() -> Iterator[None]:
    """Every command's work function raises :class:`Reached` while the block runs."""
    mp = pytest.MonkeyPatch()

    def reached(*args: Any, **kwargs: Any) -> Any:
        raise Reached()

    for module, names in WORK.items():
        mod = importlib.import_module(module)
        for name in names:
            mp.setattr(mod, name, reached)
    try:
        yield
    finally:
        mp.undo()


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under ``root`` except ``skip`` and below: files with (size, mtime_ns), folders as such."""
    return {str(p.relative_to(root)): ("dir",) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if skip is None or (p != skip and skip not in p.parents)}


def invoke(args: list[str]) -> tuple[int | str, str]:
    """``icl-heads ARGS`` in-process (click's isolation captures both streams): (exit code or "reached", stderr)."""
    with CliRunner().isolation() as (out, err, _):
        try:
            main(args)
            code: int | str = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Reached:
            code = "reached"
        return code, err.getvalue().decode(errors="replace") + out.getvalue().decode(errors="replace")


def check(code: int | str, text: str, args: list[str]) -> None:
    err_lines = [ln for ln in text.splitlines() if ln.startswith(("error:", "interrupted:"))]
    assert code in (0, 2, "reached"), (args, code, text[-2000:])
    assert "Traceback" not in text, (args, text[-2000:])
    assert len(err_lines) <= 2, (args, text)
    if code == 2:
        assert len(err_lines) == 1 and err_lines[0].startswith("error: "), (args, text)


# --------------------------------------------------------------------------- command lines

HOSTILE_INTS = ["0", "-1", "1", "2", "3", "1e30", "1000000000000000000000000", "nan", "inf", "true", "", " ", "x",
                "2.5", "0x10", "٣"]
HOSTILE_LISTS = ["1,2", "1,,2", ",", "", "2,2", "1, 2", "0", "-1,2", "a,b", "1;2", "1e30", "4"]
SETS = ["train.steps=1e30", "train.steps=true", "train.steps=3", "task.d.x=1", "task.sigma=NaN", "seed=-1",
        "seed=1", "heads=[]", "heads=[1,true]", "model.mlp=1", "eval.n_test=1", "=1", "x", "train.threads=100000",
        "task=null", "train=[1]", "eval.n_test=99999999999", "sigmas=[0.1,-1]", ".steps=3", "train..steps=3"]
OUTS = ["{out}", "{out}", "{out}", "", " ", "{root}/RUN", "{root}/RUN/a", "{root}/ZOO", "{root}/ZOO/A", "{root}/CK",
        "{root}/CK/snapshots", "{out}/../CK"]
CKPTS = ["{root}/CK", "{root}/CK", "{root}/none", "{root}", "", "{root}/RUN", "{root}/CK/meta.json"]

OPTIONS: dict[str, list[tuple[str, list[str]]]] = {
    "train": [("--heads", HOSTILE_INTS), ("--steps", HOSTILE_INTS), ("--seed", HOSTILE_INTS), ("--resume", []),
              ("--quiet", []), ("--device", ["cpu", "tpu", ""])],
    "estimators": [("--d", HOSTILE_INTS), ("--s", HOSTILE_INTS), ("--sigma", HOSTILE_INTS),
                   ("--n-max", HOSTILE_INTS), ("--prompts", HOSTILE_INTS), ("--only", ["ridge", "ridge,,pto", "", "zz"])],
    "reproduce": [("--seeds", HOSTILE_INTS), ("--sigmas", HOSTILE_LISTS), ("--threads", HOSTILE_INTS),
                  ("--jobs", HOSTILE_INTS), ("--train", [])],
    "sweep-heads": [("--steps", HOSTILE_INTS), ("--jobs", HOSTILE_INTS), ("--workers", HOSTILE_INTS)],
    "sweep-arch": [("--layers", HOSTILE_LISTS), ("--mlp", HOSTILE_LISTS), ("--heads", HOSTILE_LISTS),
                   ("--seeds", HOSTILE_INTS), ("--jobs", HOSTILE_INTS), ("--table", [])],
    "eval": [("--prompts", HOSTILE_INTS), ("--device", ["cpu", "cuda9"])],
    "assess-heads": [("--prompts", HOSTILE_INTS), ("--boot", HOSTILE_INTS), ("--seed", HOSTILE_INTS),
                     ("--ablation", ["zero", "all", "zero,,mean", "", "magic"])],
    "prune": [("--keep", ["1:all,2:top1", "", "1:all,,2:top1", "9:top1", "x"]), ("--finetune", HOSTILE_INTS),
              ("--prompts", HOSTILE_INTS)],
    "probe": [("--prune", ["default", "", "1:all"]), ("--compare", CKPTS), ("--prompts", HOSTILE_INTS)],
    "mechanism": [("--single", CKPTS), ("--no-construct", []), ("--prompts", HOSTILE_INTS)],
    "emergence": [("--prompts", HOSTILE_INTS), ("--seed", HOSTILE_INTS)],
}
TAKES_CKPT = {"eval", "assess-heads", "prune", "probe", "mechanism", "emergence"}
TAKES_PRESET = {"train", "estimators", "reproduce", "sweep-heads", "sweep-arch"}


# values that pass on their own: half the vectors draw only from these, so valid command lines are common
VALID = {"--heads": ["1", "2"], "--steps": ["3"], "--seed": ["0", "5"], "--device": ["cpu"], "--d": ["4"],
         "--s": ["1"], "--sigma": ["0.2"], "--n-max": ["6"], "--prompts": ["20"], "--only": ["ridge,pto"],
         "--seeds": ["1"], "--sigmas": ["0.1,0.5"], "--threads": ["1"], "--jobs": ["1"], "--workers": ["1"],
         "--layers": ["1,2"], "--mlp": ["0,1"], "--boot": ["20"], "--ablation": ["zero,mean"],
         "--keep": ["1:all,2:top1"], "--finetune": ["2"], "--prune": ["default"], "--compare": ["{root}/CK"],
         "--single": ["{root}/CK"]}
VALID_SETS = ["train.steps=3", "seed=2", "eval.n_test=30", "model.mlp=false", "train.lr=0.001"]


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(sorted(OPTIONS)))
    valid = draw(st.booleans())
    args = [cmd]
    if cmd in TAKES_CKPT:
        args.append("{root}/CK" if valid else draw(st.sampled_from(CKPTS)))
    if cmd in TAKES_PRESET:
        args += ["--preset", "smoke" if valid else draw(st.sampled_from(["smoke", "smoke", "quick", "huge", ""]))]
    if cmd == "train" and (valid or draw(st.booleans())):
        args += ["--heads", "2"]
    for flag, values in draw(st.lists(st.sampled_from(OPTIONS[cmd]), max_size=3, unique_by=lambda o: o[0])):
        pool = VALID.get(flag, values) if valid else values
        args += [flag] + ([draw(st.sampled_from(pool))] if values else [])
    for item in draw(st.lists(st.sampled_from(VALID_SETS if valid else SETS), max_size=2)):
        args += ["--set", item]
    if valid or draw(st.integers(0, 9)):  # mostly with an --out
        args += ["--out", "{out}" if valid else draw(st.sampled_from(OUTS))]
    return args


@settings(max_examples=COMMAND_LINE_EXAMPLES, **FUZZ)
@given(argv=command_lines())
def test_command_lines(sandbox: Path, argv: list[str]) -> None:
    out = Path(tempfile.mkdtemp(dir=sandbox, prefix="out")) / "o"
    args = [a.replace("{out}", str(out)).replace("{root}", str(sandbox)) for a in argv]
    before = snapshot(sandbox, skip=out.parent)
    with stubbed():
        code, text = invoke(args)
    event(f"exit {code}")
    check(code, text, args)
    assert snapshot(sandbox, skip=out.parent) == before, f"{args} changed files outside --out"
    shutil.rmtree(out.parent)


# --------------------------------------------------------------------------- damaged checkpoints

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document (dicts and lists)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return []
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["delete", "replace", "replace", "document", "flip", "truncate", "nan", "state"]))
    if kind in ("delete", "replace"):
        return kind, (draw(st.integers(0, 10**6)), draw(JSON))
    if kind == "document":
        return kind, draw(JSON)
    return kind, draw(st.integers(0, 10**6))


def _apply(ck: Path, kind: str, arg: Any) -> None:
    meta = json.loads((ck / "meta.json").read_text())
    if kind in ("delete", "replace"):
        pick, value = arg
        paths = [p for p in _paths(meta) if p[0] != "history"]  # history is descriptive: nothing reads it
        path = paths[pick % len(paths)]
        node = meta
        for k in path[:-1]:
            node = node[k]
        if kind == "delete":
            del node[path[-1]]
        else:
            node[path[-1]] = value
        (ck / "meta.json").write_text(json.dumps(meta))
    elif kind == "document":
        (ck / "meta.json").write_text(json.dumps(arg))
    elif kind in ("flip", "truncate", "state"):
        f = ck / ("state.safetensors" if kind == "state" else "model.safetensors")
        data = bytearray(f.read_bytes())
        if kind == "truncate":
            data = data[: arg % len(data)]
        else:
            data[arg % len(data)] ^= 0xFF
        f.write_bytes(bytes(data))
    else:  # a NaN in one weight, the checksum updated: only the finiteness check can refuse it
        from safetensors.torch import load, save

        t = load((ck / "model.safetensors").read_bytes())
        names = sorted(k for k, v in t.items() if v.is_floating_point())
        w = t[names[arg % len(names)]]
        w.view(-1)[arg % w.numel()] = float("nan")
        data = save(t)
        (ck / "model.safetensors").write_bytes(data)
        meta["sha256"]["model.safetensors"] = hashlib.sha256(data).hexdigest()
        (ck / "meta.json").write_text(json.dumps(meta))


@settings(max_examples=CHECKPOINT_EXAMPLES, **FUZZ)
@given(hurt=damage())
def test_damaged_checkpoints(sandbox: Path, hurt: tuple[str, Any]) -> None:
    work = Path(tempfile.mkdtemp(dir=sandbox, prefix="ck"))
    ck = work / "ck"
    shutil.copytree(sandbox / "CK", ck, ignore=shutil.ignore_patterns(".lock", ".owner.json"))
    _apply(ck, *hurt)
    out = work / "o"
    before = snapshot(work, skip=out)
    code, text = invoke(["eval", str(ck), "--out", str(out), "--prompts", "8", "--device", "cpu"])
    event(f"{hurt[0]}: exit {code}")
    check(code, text, [hurt[0]])
    if hurt[0] == "nan":
        assert code == 2 and "non-finite" in text, text
    if hurt[0] in ("flip", "truncate") or (hurt[0] == "delete" and "sha256" not in (ck / "meta.json").read_text()):
        assert code == 2, (hurt, text)  # damaged or unverifiable weights are never evaluated
    assert snapshot(work, skip=out) == before
    shutil.rmtree(work)
