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
