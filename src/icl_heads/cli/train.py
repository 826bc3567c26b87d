"""The training commands: ``train`` (one model), ``sweep-heads`` (E1: one model per head count) and
``sweep-arch`` (depth x MLP x heads x seeds). The trainers are imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..config import MAX_SEEDS, ConfigError
from ..io import read_csv, read_json
from .options import (check_cores, check_count, device_option, executor_options, make_executor, make_preset,
                      out_option, parse_list, preset_option, resolve_device, sets_option, split_executor_sets, writing)
from .output import arch_lines, echo_lines, risk_lines


@click.command("train")
@preset_option
@click.option("--heads", type=int, required=True, help="number of attention heads")
@out_option
@click.option("--resume", is_flag=True, help="continue the checkpoint in OUT (bit-identical on CPU)")
@device_option
@click.option("--steps", type=int, help="override train.steps")
@click.option("--seed", type=int, help="base seed")
@click.option("--quiet", is_flag=True, help="no progress bar")
@sets_option
def train_cmd(preset: str, heads: int, out: Path, resume: bool, device: str, steps: Optional[int],
              seed: Optional[int], quiet: bool, sets: tuple[str, ...]) -> None:
    """Train one model on fresh prompts; checkpoint (safetensors + JSON) in OUT."""
    p = make_preset(preset, seed, sets, **{"train.steps": steps})
    dev = resolve_device(device)
    from ..training import TrainSpec, train

    TrainSpec.from_preset(p, heads)  # validates the head count before any work
    if resume and not (out / "meta.json").exists():
        raise ConfigError(f"resume: {out} holds no checkpoint to continue (run without --resume to start one)")
    with writing(out, "train"):
        r = train(p, heads, out, dev, resume=resume, progress=not quiet)
    last = r.history[-1] if r.history else {}
    click.echo(f"trained h={heads} to step {r.meta['step']} in {out}; "
               + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("r@")))


@click.command("sweep-heads")
@preset_option
@out_option
@device_option
@click.option("--steps", type=int, help="override train.steps")
@click.option("--seed", type=int, help="base seed")
@click.option("--jobs", type=int, help="training processes on CPU (default: one per head count)")
@click.option("--workers", type=int, help="the old name of --jobs")
@click.option("--stacked/--no-stacked", default=None,
              help="train the head counts as one stacked model (default: on CUDA only)")
@sets_option
@executor_options
def sweep_heads(preset: str, out: Path, device: str, steps: Optional[int], seed: Optional[int],
                jobs: Optional[int], workers: Optional[int], stacked: Optional[bool], sets: tuple[str, ...],
                executor: str, no_wait: bool) -> None:
    """E1: one model per head count (same seed and budget) vs the estimators; e1_heads.csv/.png."""
    sets, executor_sets = split_executor_sets(sets)
    ex = make_executor(executor, executor_sets, no_wait)
    p = make_preset(preset, seed, sets, **{"train.steps": steps})
    for name, value in (("jobs", jobs), ("workers", workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1 (got {value})")
        check_cores(name, value)
    if jobs is not None and workers is not None and jobs != workers:
        raise ConfigError(f"jobs: --workers is its old name; give one of them (got --jobs {jobs}, --workers {workers})")
    workers = jobs if jobs is not None else workers
    dev = resolve_device(device)
    from ..experiments.heads_sweep import run_e1

    with writing(out, "E1 heads sweep"):
        s = run_e1(p, out, dev, workers=workers, stacked=stacked, executor=ex)
    models = [f"transformer h={h}" for h in p.heads]
    echo_lines(risk_lines(read_csv(out / "e1_heads.csv"), p.task, models + ["pto", "gd", "lasso", "ridge", "bayes"]))
    click.echo(f"E1 written to {out} (training {s['train_wall_s']:.0f} s)")


def int_list(name: str, text: str) -> list[int]:
    """Comma-separated non-negative integers, no empty item (``1,,2``) and none twice (``2,2`` trained one
    architecture twice, into one folder)."""
    items = parse_list(text, name)
    try:
        vals = [int(v) for v in items]
    except ValueError:
        vals = []
    if not vals or min(vals) < 0:
        raise ConfigError(f"{name}: expected comma-separated non-negative integers (got {text!r})")
    twice = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
    if twice is not None:
        raise ConfigError(f"{name}: {twice} is listed twice (got {text!r})")
    return vals


@click.command("sweep-arch")
@preset_option
@out_option
@click.option("--layers", default="2,3,4", show_default=True, help="depths, comma-separated")
@click.option("--mlp", "mlps", default="0,1", show_default=True, help="MLP off (0) / on (1), comma-separated")
@click.option("--heads", default="1,4", show_default=True, help="head counts, comma-separated")
@click.option("--seeds", default=3, show_default=True, type=int, help="seeds per architecture and head count")
@device_option
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a preset field (repeatable)")
@click.option("--jobs", default=1, show_default=True, type=int, help="stacks trained at once, one process each")
@click.option("--stacked/--no-stacked", default=None, help="one stack per architecture (default: on CUDA only)")
@click.option("--table", is_flag=True, help="only write OUT/table.csv from the trained models and their analyses")
@executor_options
def sweep_arch(preset: str, out: Path, layers: str, mlps: str, heads: str, seeds: int, device: str,
               sets: tuple[str, ...], jobs: int, stacked: Optional[bool], table: bool, executor: str,
               no_wait: bool) -> None:
    """Architecture sweep: L x MLP x heads x seeds into OUT/L{L}-mlp{0|1}/seed{k}/h{h}/ (stacked on CUDA)."""
    sets, executor_sets = split_executor_sets(sets)
    ex = make_executor(executor, executor_sets, no_wait)
    p = make_preset(preset, None, sets)
    Ls, ms, hs = int_list("layers", layers), int_list("mlp", mlps), int_list("heads", heads)
    check_count("seeds", seeds, 1, MAX_SEEDS)
    check_cores("jobs", jobs)
    if min(Ls) < 1:
        raise ConfigError(f"layers: every depth must be >= 1 (got {layers!r})")
    if set(ms) - {0, 1}:
        raise ConfigError(f"mlp: must be 0 or 1 (got {mlps!r})")
    from ..training import TrainSpec

    for h in hs:
        TrainSpec.from_preset(p, h)
    dev = resolve_device(device)
    from ..experiments.arch_sweep import arch_table, run_arch_sweep

    if table and not (out / "sweep.json").exists():
        raise ConfigError(f"out: {out} holds no trained sweep (no sweep.json); run sweep-arch without --table first")
    with writing(out, "architecture sweep"):
        s = None if table else run_arch_sweep(p, out, Ls, [bool(m) for m in ms], hs, seeds, dev, stacked=stacked,
                                              jobs=jobs, executor=ex)
        rows = arch_table(p, out, dev)
    echo_lines(arch_lines(rows, read_json(out / "sweep.json")["heads"]))
    if s is not None:
        click.echo(f"sweep of {s['models']} models written to {out} (training {s['train_wall_s']:.0f} s)")
    click.echo(f"table of {len(rows)} rows written to {out / 'table.csv'}")
