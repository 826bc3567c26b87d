"""``icl-heads estimators``: E5, the estimators alone (no trained model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .options import (check_prompts, make_preset, out_option, parse_list, preset_option, prompts_option, sets_option,
                      writing)
from .output import echo_lines, risk_lines


@click.command()
@preset_option
@out_option
@click.option("--d", type=int, help="override task.d")
@click.option("--s", type=int, help="override task.s")
@click.option("--sigma", type=float, help="override task.sigma")
@click.option("--n-max", type=int, help="override task.n_max")
@prompts_option
@click.option("--seed", type=int, help="base seed")
@click.option("--only", help="comma-separated estimator names (default: all)")
@sets_option
def estimators(preset: str, out: Path, d: Optional[int], s: Optional[int], sigma: Optional[float],
               n_max: Optional[int], prompts: Optional[int], seed: Optional[int], only: Optional[str],
               sets: tuple[str, ...]) -> None:
    """E5: PtO vs GD, ridge, lasso, OLS and the Bayes floor; risk vs n and vs T."""
    check_prompts(prompts, 2, "(eval.n_val, eval.n_test)")
    p = make_preset(preset, seed, sets, **{"task.d": d, "task.s": s, "task.sigma": sigma, "task.n_max": n_max,
                                     "eval.n_val": prompts, "eval.n_test": prompts})
    from ..experiments.algorithms import run_e5

    names = parse_list(only, "only") if only is not None else None
    with writing(out, "E5"):
        s = run_e5(p, out, names=names)
    order = [e for e in ("pto", "gd", "lasso", "ridge", "ols", "bayes") if names is None or e in names]
    echo_lines(risk_lines(s["rows"], p.task, order or None, key="estimator"))
    click.echo(f"E5 written to {out}")
