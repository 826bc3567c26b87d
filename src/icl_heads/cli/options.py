"""What every command shares: its options (``--preset``, ``--set``, ``--out``, ``--prompts``, ``--device``,
``--executor``), their parsing and checks, the preset they make, and the ``--out`` folder's lock.

A bad value is a :class:`~icl_heads.config.ConfigError` naming the field (``error: <field>: <why>``,
exit 2: :mod:`.errors`), raised while the command line is read, before any work.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click
import torch

from ..checkpoint import load_model
from ..config import MAX_PROMPTS, PRESET_NAMES, ConfigError, ExecutorConfig, Preset, get_preset, validate
from ..folders import check_analysis_out, claim_out, folder_lock


def resolve_device(name: str) -> str:
    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device: must be cpu, cuda or auto (got {name!r})")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    return name


def parse_list(text: str, field: str) -> list[str]:
    """``"a,b"`` to ``["a", "b"]``; an empty list or an empty item (``1,,2``, ``""``) is a one-line error
    naming ``field`` (an empty item used to be skipped, or to select nothing and run anyway)."""
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in items):
        raise ConfigError(f"{field}: expected a comma-separated list without empty items (got {text!r})")
    return items


def parse_floats(text: str, field: str) -> list[float]:
    """``"0.1,0.5"`` to ``[0.1, 0.5]``, or a one-line error naming ``field``."""
    if not text.strip() or not text.replace(",", "").strip():
        raise ConfigError(f"{field}: expected at least one number (got {text!r})")
    try:
        values = [float(v) for v in parse_list(text, field)]
    except ValueError:
        raise ConfigError(f"{field}: expected comma-separated numbers (got {text!r})") from None
    if not values:
        raise ConfigError(f"{field}: expected at least one number (got {text!r})")
    return values


def parse_ints(text: str, field: str) -> list[int]:
    """``"1,4"`` to ``[1, 4]`` (each a positive integer), or a one-line error naming ``field``."""
    try:
        values = [int(v) for v in parse_list(text, field)]
    except ValueError:
        raise ConfigError(f"{field}: expected comma-separated integers (got {text!r})") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{field}: expected positive integers (got {text!r})")
    return values


def parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to dotted overrides; VALUE is read as JSON when it parses, else as text."""
    ov: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"set: expected KEY=VALUE (got {item!r})")
        try:
            ov[key] = json.loads(value)
        except json.JSONDecodeError:
            ov[key] = value
    return ov


EXECUTOR_HELP = ("where the models train: local (processes here, the default), debug (in this process) or slurm "
                 "(one job per model or stack; docs/cluster.md); or a .json/.toml file of executor settings. "
                 "--set executor.FIELD=VALUE overrides one (partition, time_min, gpus, cpus, folder, ...)")


def executor_options(f: Any) -> Any:
    """``--executor`` and ``--no-wait``, for every command that trains (or analyses) many models."""
    f = click.option("--no-wait", is_flag=True,
                     help="slurm: submit the jobs, print their ids and the command that collects the results")(f)
    return click.option("--executor", "executor", default="local", show_default=True, metavar="KIND|FILE",
                        help=EXECUTOR_HELP)(f)


def split_executor_sets(sets: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``--set`` pairs for the preset, and the ``executor.*`` ones (keys without the prefix)."""
    ov = parse_sets(tuple(s for s in sets if s.startswith("executor.")))
    return tuple(s for s in sets if not s.startswith("executor.")), {k[len("executor."):]: v for k, v in ov.items()}


def make_executor(value: str, overrides: dict[str, Any], no_wait: bool = False) -> Any:
    """The :class:`~icl_heads.config.ExecutorConfig` of ``--executor KIND|FILE`` with ``--set executor.*``
    on top; a bad value is one line naming the field (``executor.time_min: ...``)."""
    raw: dict[str, Any]
    if value in ("local", "debug", "slurm"):
        raw = {"kind": value}
    elif Path(value).suffix in (".json", ".toml"):
        if not Path(value).is_file():
            raise ConfigError(f"executor: no settings file {value}")
        raw = _read_settings(Path(value))
    else:
        raise ConfigError(f"executor: expected local, debug, slurm or a .json/.toml settings file (got {value!r})")
    raw.update(overrides)
    if no_wait:
        raw["wait"] = False
    try:
        executor = validate(ExecutorConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"executor.{e}") from None
    if not executor.wait and executor.kind != "slurm":
        raise ConfigError(f"executor.wait: --no-wait needs --executor slurm (got {executor.kind}: the work runs here)")
    return executor


def _read_settings(path: Any) -> dict[str, Any]:
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            import tomllib  # Python >= 3.11 (3.10 has none: the except below says so)

            raw = tomllib.loads(path.read_text())
    except ImportError:
        raise ConfigError(f"executor: {path}: TOML needs Python 3.11 or later; write the settings as JSON") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"executor: {path}: cannot read the settings ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"executor: {path}: expected a table of settings (got {type(raw).__name__})")
    section = raw.get("executor", raw)  # a file may hold the settings at its top or under [executor]
    if not isinstance(section, dict):
        raise ConfigError(f"executor: {path}: [executor] must be a table of settings")
    return section


def preset_option(f: Any) -> Any:
    return click.option("--preset", default="quick", show_default=True,
                        help=f"one of {', '.join(PRESET_NAMES)}")(f)


def sets_option(f: Any) -> Any:
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="override any preset field by dotted path, e.g. --set model.token_format=interleaved "
                             "or --set train.steps=2000 (repeatable)")(f)


class OutDir(click.Path):
    """``--out``: while the command line is parsed, the folder is created and test-written, then
    whatever this probe created is removed again (nothing is left behind if a later check fails).
    So an unusable folder is one line ``error: out: <why>`` (exit 2) for every command, before any work."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, str) and not value.strip():  # "" is the current folder to pathlib: never meant
            raise ConfigError("out: must name a folder (got an empty string)")
        path = Path(super().convert(value, param, ctx))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out: {value} exists and is not a folder")
        missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise ConfigError(f"out: cannot create or write the folder {value} ({e.strerror or e})") from None
        finally:
            for p in missing:
                try:
                    p.rmdir()
                except OSError:  # gone already, or another writer started filling it meanwhile: leave it
                    pass
        return path


def out_option(f: Any) -> Any:
    return click.option("--out", required=True, type=OutDir(path_type=Path),
                        help="output folder (created; results are written atomically)")(f)


PROMPTS_HELP = ("prompts per set: every prompt set the command samples (test; val, probe and reference where it "
                "uses them) has this many (default: the preset's eval.n_test)")


def prompts_option(f: Any) -> Any:
    """``--prompts``, one meaning for every command: the size of each prompt set (docs/cli.md)."""
    return click.option("--prompts", type=int, help=PROMPTS_HELP)(f)


def check_prompts(prompts: Optional[int], minimum: int, why: str) -> None:
    if prompts is not None and prompts < minimum:
        raise ConfigError(f"prompts: need at least {minimum} prompts per set {why} (got {prompts})")
    check_count("prompts", prompts, minimum, MAX_PROMPTS)


def check_count(name: str, value: Optional[int], low: int, high: int) -> None:
    """A count option within ``low .. high`` (the bounds stated in ``config.py``)."""
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{name}: must be between {low} and {high} (got {value})")


def check_cores(name: str, value: Optional[int]) -> None:
    """Processes or threads beyond the CPU cores only oversubscribe them."""
    cores = os.cpu_count() or 1
    if value is not None and not 1 <= value <= cores:
        raise ConfigError(f"{name}: must be between 1 and {cores}, the CPU cores of this machine (got {value})")


def device_option(f: Any) -> Any:
    return click.option("--device", default="auto", show_default=True, help="cpu | cuda | auto")(f)


def make_preset(name: str, seed: Optional[int] = None, sets: tuple[str, ...] = (), **overrides: Any) -> Preset:
    """The named preset with ``--set`` pairs, then dotted-path overrides (``None`` values are ignored)."""
    ov = parse_sets(sets)
    ov.update({k: v for k, v in overrides.items() if v is not None})
    if seed is not None:
        ov["seed"] = seed
    p = get_preset(name, **ov)
    if p.train.threads:
        check_cores("train.threads", p.train.threads)
    return p


@contextmanager
def writing(out: Path, experiment: str) -> Iterator[Path]:
    """Hold ``out``'s one-writer lock (``icl_heads.folders``) and claim it for ``experiment`` (refused inside
    a zoo, a run or a checkpoint, or when another command owns it) while a command writes into it."""
    with folder_lock(out) as held:
        claim_out(out, experiment)
        yield held


def analysis_out(out: Path, reads: list[Path], experiment: str, preset: Optional[Any] = None) -> Any:
    """Check the checkpoints read (task, weights, preset: ``checkpoint.load_model``) and refuse an ``--out``
    holding one of them or someone else's files, all before anything is written; then lock ``out``."""
    from ..experiments.loading import resolve_preset  # a work module: deferred, as the commands' own

    for ckpt in reads:
        load_model(ckpt)
    if experiment != "eval":
        resolve_preset(reads[0], preset)
    check_analysis_out(out, reads, experiment)
    return writing(out, experiment)
