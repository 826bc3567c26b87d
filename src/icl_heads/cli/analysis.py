"""The analysis commands, each on a trained checkpoint: ``assess-heads`` (E2), ``prune`` (E3), ``probe`` (E4),
``mechanism`` (E6), ``emergence`` (E7) and ``eval`` (risk vs n).

Each checks its arguments and the checkpoints it reads, and refuses an unusable ``--out``, before any
work; the experiment runners (``icl_heads.experiments``) are imported inside the commands so that
``--help`` and a bad argument answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ..checkpoint import load_meta, load_model
from ..config import MAX_BOOT, MAX_SEED, MAX_STEPS, ConfigError, TaskConfig, get_preset, validate, with_overrides
from ..io import read_json
from .options import (analysis_out, check_cores, check_count, check_prompts, device_option, out_option, parse_sets,
                      prompts_option, resolve_device, sets_option)
from .output import e2_lines, e3_lines, e4_lines, e6_lines, e7_lines, echo_lines, risk_lines


def analysis_options(f: Any) -> Any:
    """Options shared by the analysis commands (preset defaults to the checkpoint's; ``--set`` overrides any of
    its fields; ``--prompts`` is the size of every prompt set, ``--seed`` short for ``--set seed=...``)."""
    for opt in reversed([
        click.option("--preset", default=None, help="preset for prompts (default: the one in the checkpoint's meta.json)"),
        out_option,
        prompts_option,
        click.option("--seed", type=int, help="prompt seed (default: the preset's)"),
        device_option,
        sets_option,
    ]):
        f = opt(f)
    return f


def ablation_option(f: Any) -> Any:
    return click.option("--ablation", default="zero", show_default=True,
                        help="what an ablated/pruned head outputs: zero (gate 0, the paper's masking), mean (its mean "
                             "over reference prompts), resample (a paired reference prompt's output), or all; "
                             "comma-separated for several")(f)


def check_ablation(ablation: str) -> tuple[str, ...]:
    from ..analysis.ablation import parse_ablations

    return parse_ablations(ablation)


def analysis_preset(ckpt: Path, preset: Optional[str], sets: tuple[str, ...]) -> Any:
    """The preset name as given, or, with ``--set``, the resolved preset (the checkpoint's by default) with
    the overrides applied."""
    if not sets:
        return preset
    from ..experiments.loading import resolve_preset

    load_model(ckpt)  # a damaged checkpoint says so before an override is judged against it
    p = with_overrides(resolve_preset(ckpt, preset), **parse_sets(sets))
    if p.train.threads:  # prune --finetune trains
        check_cores("train.threads", p.train.threads)
    return p


def check_analysis_args(preset: Optional[str], prompts: Optional[int], seed: Optional[int]) -> None:
    if preset is not None:
        get_preset(preset)
    check_prompts(prompts, 3, "(the probes' cross-validation)")
    check_count("seed", seed, 0, MAX_SEED)


@click.command("assess-heads")
@click.argument("ckpt", type=click.Path(path_type=Path))
@analysis_options
@click.option("--boot", type=int, default=1000, show_default=True, help="bootstrap resamples for concentration CIs")
@ablation_option
def assess_heads_cmd(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
                     device: str, sets: tuple[str, ...], boot: int, ablation: str) -> None:
    """E2: risk increase when each head is ablated (and keep-only), heat-map, per-layer concentration."""
    check_analysis_args(preset, prompts, seed)
    preset = analysis_preset(ckpt, preset, sets)
    kinds = check_ablation(ablation)
    if boot < 10:
        raise ConfigError(f"boot: need at least 10 bootstrap resamples (got {boot})")
    check_count("boot", boot, 10, MAX_BOOT)
    dev = resolve_device(device)
    from ..experiments.e2_importance import run_e2

    with analysis_out(out, [ckpt], "E2", preset):
        s = run_e2(ckpt, out, preset, prompts, seed, dev, boot, ablations=kinds)
    echo_lines(e2_lines(s))
    click.echo(f"E2 written to {out}")


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@analysis_options
@click.option("--keep", default=None, help='per-layer policy, 1-based layers, e.g. "1:all,2:top1,3:top1" '
                                          "(default: all heads in layer 1, top1 in every later layer)")
@click.option("--finetune", "finetune_steps", type=int, default=0, show_default=True,
              help="AdamW steps with the gates fixed after pruning (0 = no retraining)")
@ablation_option
def prune(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int], device: str,
          sets: tuple[str, ...], keep: Optional[str], finetune_steps: int, ablation: str) -> None:
    """E3: risk vs n of the full model, the pruned model and the control (layer 1 cut to one head too)."""
    check_analysis_args(preset, prompts, seed)
    preset = analysis_preset(ckpt, preset, sets)
    kinds = check_ablation(ablation)
    if finetune_steps < 0:
        raise ConfigError(f"finetune: steps must be >= 0 (got {finetune_steps})")
    check_count("finetune", finetune_steps, 0, MAX_STEPS)
    dev = resolve_device(device)
    from ..analysis.pruning import parse_policy
    from ..experiments.e3_pruning import run_e3

    if keep is not None:
        parse_policy(keep)
    with analysis_out(out, [ckpt], "E3", preset):
        s = run_e3(ckpt, out, keep, preset, finetune_steps, prompts, seed, dev, ablations=kinds)
    echo_lines(e3_lines(s))
    click.echo(f"E3 written to {out}")


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@analysis_options
@click.option("--prune", "prune_policy", default=None,
              help='also probe the pruned model: a policy such as "1:all,2:top1,3:top1", or "default"')
@click.option("--compare", multiple=True, type=click.Path(path_type=Path),
              help="other checkpoints to probe on the same prompts (e.g. the single-head model); repeatable")
@ablation_option
def probe(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int], device: str,
          sets: tuple[str, ...], prune_policy: Optional[str], compare: tuple[Path, ...], ablation: str) -> None:
    """E4: ridge probes of <w*, x_q> from the residual stream after each layer, per context length."""
    check_analysis_args(preset, prompts, seed)
    preset = analysis_preset(ckpt, preset, sets)
    kinds = check_ablation(ablation)
    dev = resolve_device(device)
    from ..analysis.pruning import parse_policy
    from ..experiments.e4_probes import run_e4, summary_models

    if prune_policy not in (None, "default"):
        parse_policy(prune_policy)
    with analysis_out(out, [ckpt, *compare], "E4", preset):
        s = run_e4(ckpt, out, prune_policy, list(compare), preset, prompts, seed, dev, ablations=kinds)
    echo_lines(e4_lines(summary_models(s)))
    click.echo(f"E4 written to {out}")


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@analysis_options
@click.option("--single", type=click.Path(path_type=Path), default=None,
              help="single-head checkpoint of the same task, analysed on the same prompts")
@click.option("--no-construct", is_flag=True, help="skip E6c (the hand-built PtO transformer check)")
def mechanism(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
              device: str, sets: tuple[str, ...], single: Optional[Path], no_construct: bool) -> None:
    """E6: decode PtO's features from layer 1 (E6a), compare layers with PtO/GD steps (E6b), check E6c."""
    check_analysis_args(preset, prompts, seed)
    preset = analysis_preset(ckpt, preset, sets)
    dev = resolve_device(device)
    from ..experiments.e6_mechanism import run_e6

    with analysis_out(out, [ckpt] + ([single] if single else []), "E6", preset):
        s = run_e6(ckpt, out, single, preset=preset, n_prompts=prompts, seed=seed, device=dev,
                   with_construct=not no_construct)
    echo_lines(e6_lines(s))
    click.echo(f"E6 written to {out}")



@click.command("eval")
@click.argument("ckpt", type=click.Path(path_type=Path))
@out_option
@device_option
@prompts_option
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="eval.n_test=N (the one field eval reads; the same as --prompts: eval samples one set, test)")
def eval_cmd(ckpt: Path, out: Path, device: str, prompts: Optional[int], sets: tuple[str, ...]) -> None:
    """Risk vs n (95% bands) of a checkpoint on the test prompts: risk.csv, risk.png, config.json."""
    ov = parse_sets(sets)
    if set(ov) - {"eval.n_test"}:
        raise ConfigError(f"set: eval reads only eval.n_test (got {sorted(set(ov) - {'eval.n_test'})[0]})")
    if "eval.n_test" in ov:
        if not isinstance(ov["eval.n_test"], int) or isinstance(ov["eval.n_test"], bool):
            raise ConfigError(f"eval.n_test: must be an integer (got {ov['eval.n_test']!r})")
        prompts = ov["eval.n_test"] if prompts is None else prompts
    check_prompts(prompts, 2, "(a confidence band)")
    dev = resolve_device(device)
    from ..experiments.evaluate import evaluate_checkpoint

    with analysis_out(out, [ckpt], "eval"):
        rows = evaluate_checkpoint(ckpt, out, dev, prompts)
    echo_lines(risk_lines(rows, validate(TaskConfig, load_meta(ckpt)["task"])))
    click.echo(f"evaluation written to {out}")


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@analysis_options
def emergence(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
              device: str, sets: tuple[str, ...]) -> None:
    """E7: head assessment and the pruning test on every training snapshot of CKPT (train.snapshots > 0)."""
    check_analysis_args(preset, prompts, seed)
    preset = analysis_preset(ckpt, preset, sets)
    dev = resolve_device(device)
    from ..experiments.e7_emergence import run_e7

    with analysis_out(out, [ckpt], "E7", preset):
        run_e7(ckpt, out, preset=preset, n_prompts=prompts, seed=seed, device=dev)
    echo_lines(e7_lines(read_json(out / "summary.json")["trend"]))
    click.echo(f"E7 written to {out}")
