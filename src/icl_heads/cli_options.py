"""Parsing shared by every command group (``cli`` and ``zoo_cli``): devices, number lists, ``--set``.

Its own module so that the sub-groups need not import :mod:`icl_heads.cli` (which imports them).
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError


def resolve_device(name: str) -> str:
    import torch

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


def parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to dotted overrides; VALUE is read as JSON when it parses, else as text."""
    import json

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
    import click

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
    from pathlib import Path

    from .config import ExecutorConfig, validate

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
    import json

    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            import tomllib  # Python >= 3.11

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

