"""The ``icl-heads`` command line: one sub-command per experiment (SPEC section 5).

Every command fails fast on bad input with one line ``error: <field>: <why>``
and a non-zero exit, never a traceback (see :func:`main`). Heavy imports happen
inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click

from .checkpoint import CheckpointError
from .config import PRESET_NAMES, ConfigError, Preset, get_preset


@click.group(help="Trained transformers, attention heads and in-context sparse regression (SPEC experiments E1-E6).", context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    pass


def preset_option(f: Any) -> Any:
    return click.option("--preset", default="quick", show_default=True,
                        help=f"one of {', '.join(PRESET_NAMES)}")(f)


def out_option(f: Any) -> Any:
    return click.option("--out", required=True, type=click.Path(path_type=Path),
                        help="output folder (created; results are written atomically)")(f)


def device_option(f: Any) -> Any:
    return click.option("--device", default="auto", show_default=True, help="cpu | cuda | auto")(f)


def make_preset(name: str, seed: Optional[int] = None, **overrides: Any) -> Preset:
    """The named preset with dotted-path overrides (``None`` values are ignored)."""
    ov = {k: v for k, v in overrides.items() if v is not None}
    if seed is not None:
        ov["seed"] = seed
    return get_preset(name, **ov)


def resolve_device(name: str) -> str:
    import torch

    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device: must be cpu, cuda or auto (got {name!r})")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    return name


@app.command()
@preset_option
@out_option
@click.option("--d", type=int, help="override task.d")
@click.option("--s", type=int, help="override task.s")
@click.option("--sigma", type=float, help="override task.sigma")
@click.option("--n-max", type=int, help="override task.n_max")
@click.option("--prompts", type=int, help="number of test prompts (eval.n_test)")
@click.option("--seed", type=int, help="base seed")
@click.option("--only", help="comma-separated estimator names (default: all)")
def estimators(preset: str, out: Path, d: Optional[int], s: Optional[int], sigma: Optional[float],
               n_max: Optional[int], prompts: Optional[int], seed: Optional[int], only: Optional[str]) -> None:
    """E5: PtO vs GD, ridge, lasso, OLS and the Bayes floor; risk vs n and vs T."""
    p = make_preset(preset, seed, **{"task.d": d, "task.s": s, "task.sigma": sigma, "task.n_max": n_max,
                                     "eval.n_test": prompts})
    from .experiments.algorithms import run_e5

    run_e5(p, out, names=only.split(",") if only else None)
    click.echo(f"E5 written to {out}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning every expected failure into one line on stderr."""
    try:
        app.main(args=argv, prog_name="icl-heads", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code or 2)
    except (ConfigError, CheckpointError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
