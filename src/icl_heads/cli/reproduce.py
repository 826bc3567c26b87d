"""``icl-heads reproduce``: the staged, resumable main job (``icl_heads.reproduce``; on the quick preset,
the zoo's factor study, ``icl_heads.zoo.reproduce``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click
import torch

from ..config import MAX_SEEDS, ConfigError, Preset, TaskConfig, validate
from .options import (check_cores, check_count, device_option, executor_options, make_executor, make_preset,
                      out_option, parse_floats, parse_list, preset_option, resolve_device, split_executor_sets, writing)


@click.command()
@preset_option
@out_option
@click.option("--seeds", type=int, help="training seeds (default: the preset's `seeds`: smoke 2, quick 3, paper 3)")
@click.option("--sigmas", help="noise levels for the trained-model stages, comma-separated (default: the preset's "
                               "task.sigma); each other level trains its own models under OUT/sigma{value}/")
@click.option("--stacked/--no-stacked", default=None,
              help="train each noise level's models as one stacked model (default: on CUDA only)")
@click.option("--e6-any-t/--no-e6-any-t", "any_t", default=True, show_default=True,
              help="E6's final-output-vs-any-T context for the first seed (no verdict reads it; slow on paper)")
@device_option
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override any preset field by dotted path, e.g. --set train.steps=2000 (repeatable)")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch threads for the estimator and analysis stages, 1 to the number of CPU cores "
                   "(training runs one process per model)")
@click.option("--train", "train_all", is_flag=True,
              help="quick: train every zoo configuration's models from scratch into OUT instead of analysing the "
                   "zoo's (hours on a CPU)")
@click.option("--jobs", type=int, default=None,
              help="quick on the zoo: analysis processes, one (configuration, seed) each, one torch thread each "
                   "(default: the number of CPU cores)")
@click.option("--not-learned", "not_learned", is_flag=True,
              help="quick on the zoo: also analyse configurations whose models have not learned (their claims "
                   "are not testable; skipped by default)")
@click.option("--configs", "configs_opt", default=None, metavar="A,B,...",
              help="quick on the zoo: the configurations to analyse (default: every one but D, the deeper side "
                   "study; zoo/README.md)")
@executor_options
def reproduce(preset: str, out: Path, seeds: Optional[int], sigmas: Optional[str], stacked: Optional[bool],
              any_t: bool, device: str, sets: tuple[str, ...], threads: int, train_all: bool,
              jobs: Optional[int], not_learned: bool, configs_opt: Optional[str], executor: str,
              no_wait: bool) -> None:
    """Run E5, E1-E4, E6 and E7 for a preset over seeds and write report.md/report.html into OUT.

    On the quick preset with no --set/--seeds/--sigmas, the models are the zoo's (every
    configuration, every complete seed; zoo/README.md); --train trains them here instead.
    """
    sets, executor_sets = split_executor_sets(sets)
    ex = make_executor(executor, executor_sets, no_wait)
    p = make_preset(preset, None, sets)
    dev = resolve_device(device)
    if seeds is not None and seeds < 1:
        raise ConfigError(f"seeds: must be >= 1 (got {seeds})")
    check_count("seeds", seeds, 1, MAX_SEEDS)
    check_threads(threads)
    check_cores("jobs", jobs)
    levels = check_sigmas(p, parse_floats(sigmas, "sigmas")) if sigmas is not None else None
    zoo_run = preset == "quick" and not (sets or seeds or levels)
    if configs_opt is not None and not zoo_run:
        raise ConfigError("configs: selects the zoo's configurations and needs --preset quick without "
                          "--set/--seeds/--sigmas")
    from ..zoo import get_config

    names = [] if configs_opt is None else list(dict.fromkeys(parse_list(configs_opt, "configs")))
    chosen = [get_config(c, "configs") for c in names] or None
    from ..reproduce import reproduce as run

    torch.set_num_threads(threads)
    if zoo_run:
        from ..zoo import CONFIGS, ZOO_DIR, complete_seeds
        from ..zoo.reproduce import reproduce_zoo

        if train_all or any(complete_seeds(c) for c in (chosen or CONFIGS.values())):
            with writing(out, "reproduce"):
                report = reproduce_zoo(out, chosen, train=train_all, device=dev, any_t=any_t,
                                       jobs=jobs or (1 if dev == "cuda" else os.cpu_count() or 1), executor=ex,
                                       not_learned=not_learned)
            click.echo(f"done: factor report at {report}; one report per configuration under {out}/<config>/")
            return
        click.echo(f"note: {ZOO_DIR} holds no complete seed yet; training the quick preset's models in this run",
                   err=True)
    elif train_all and preset != "quick":
        raise ConfigError("train: --train selects the zoo's configurations and needs --preset quick")
    with writing(out, "reproduce"):
        report = run(p, out, seeds=seeds, device=dev, sigmas=levels, stacked=stacked, any_t=any_t, executor=ex)
    click.echo(f"done: report at {report} (and {report.with_suffix('.html')})")


def check_threads(threads: int) -> None:
    """More torch threads than cores only oversubscribes them (``--threads 1000`` slowed E5 several-fold)."""
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise ConfigError(f"threads: must be between 1 and {cores}, the CPU cores of this machine (got {threads})")


def check_sigmas(preset: Preset, levels: list[float]) -> list[float]:
    """Each noise level through the same validation as ``task.sigma`` (``--sigma``, ``--set``, presets),
    so ``--sigmas nan`` fails here, not as a scikit-learn traceback after minutes of training."""
    for x in levels:
        try:
            validate(TaskConfig, {**preset.task.model_dump(), "sigma": x})
        except ConfigError as e:
            raise ConfigError(f"sigmas: {str(e).removeprefix('sigma: ')}") from None
    return levels
