"""The ``icl-heads`` command line: one sub-command per experiment (SPEC section 5).

Every command fails fast on bad input with one line ``error: <field>: <why>``
and a non-zero exit, never a traceback (see :func:`main` for the exit codes). Heavy imports happen
inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from . import __version__
from .checkpoint import CheckpointError
from .cli_options import parse_floats, parse_list, parse_sets, resolve_device  # noqa: F401  (public here too)
from .cli_options import executor_options, make_executor, split_executor_sets
from .config import (MAX_BOOT, MAX_PROMPTS, MAX_SEED, MAX_SEEDS, MAX_STEPS, PRESET_NAMES, ConfigError, Preset,
                     get_preset)

EXIT_CODES = """exit codes: 0 done; 2 refused (bad input, a damaged checkpoint, an unusable --out, a diverged
run), one line 'error: <field>: <why>'; 1 the system failed the command (disk full, no permission),
one line 'error: <path>: <why>'; 130 Ctrl-C, 143 SIGTERM, one line saying what a rerun does."""


@click.group(help="Trained transformers, attention heads and in-context sparse regression: experiments E1-E7 "
                  "(docs/science.md).\n\n" + EXIT_CODES.replace("\n", " "),
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="icl-heads", message="%(prog)s %(version)s")
def app() -> None:
    pass


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
    from .folders import claim_out, folder_lock

    with folder_lock(out) as held:
        claim_out(out, experiment)
        yield held


def analysis_out(out: Path, reads: list[Path], experiment: str, preset: Optional[Any] = None) -> Any:
    """Check the checkpoints read (task, weights, preset: ``checkpoint.load_model``) and refuse an ``--out``
    holding one of them or someone else's files, all before anything is written; then lock ``out``."""
    from .checkpoint import load_model
    from .folders import check_analysis_out

    for ckpt in reads:
        load_model(ckpt)
    if experiment != "eval":
        from .experiments.loading import resolve_preset

        resolve_preset(reads[0], preset)
    check_analysis_out(out, reads, experiment)
    return writing(out, experiment)


def echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


@app.command()
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
    from .experiments.algorithms import run_e5
    from .headline import risk_lines

    names = parse_list(only, "only") if only is not None else None
    with writing(out, "E5"):
        s = run_e5(p, out, names=names)
    order = [e for e in ("pto", "gd", "lasso", "ridge", "ols", "bayes") if names is None or e in names]
    echo_lines(risk_lines(s["rows"], p.task, order or None, key="estimator"))
    click.echo(f"E5 written to {out}")


def _analysis_options(f: Any) -> Any:
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


def _check_ablation(ablation: str) -> tuple[str, ...]:
    from .analysis.ablation import parse_ablations

    return parse_ablations(ablation)


def _analysis_preset(ckpt: Path, preset: Optional[str], sets: tuple[str, ...]) -> Any:
    """The preset name as given, or, with ``--set``, the resolved preset (the checkpoint's by default) with
    the overrides applied."""
    if not sets:
        return preset
    from .experiments.loading import resolve_preset
    from .checkpoint import load_model
    from .config import with_overrides

    load_model(ckpt)  # a damaged checkpoint says so before an override is judged against it
    p = with_overrides(resolve_preset(ckpt, preset), **parse_sets(sets))
    if p.train.threads:  # prune --finetune trains
        check_cores("train.threads", p.train.threads)
    return p


def _check_analysis_args(preset: Optional[str], prompts: Optional[int], seed: Optional[int]) -> None:
    if preset is not None:
        get_preset(preset)
    check_prompts(prompts, 3, "(the probes' cross-validation)")
    check_count("seed", seed, 0, MAX_SEED)


@app.command("assess-heads")
@click.argument("ckpt", type=click.Path(path_type=Path))
@_analysis_options
@click.option("--boot", type=int, default=1000, show_default=True, help="bootstrap resamples for concentration CIs")
@ablation_option
def assess_heads_cmd(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
                     device: str, sets: tuple[str, ...], boot: int, ablation: str) -> None:
    """E2: risk increase when each head is ablated (and keep-only), heat-map, per-layer concentration."""
    _check_analysis_args(preset, prompts, seed)
    preset = _analysis_preset(ckpt, preset, sets)
    kinds = _check_ablation(ablation)
    if boot < 10:
        raise ConfigError(f"boot: need at least 10 bootstrap resamples (got {boot})")
    check_count("boot", boot, 10, MAX_BOOT)
    dev = resolve_device(device)
    from .experiments.e2_importance import run_e2

    with analysis_out(out, [ckpt], "E2", preset):
        s = run_e2(ckpt, out, preset, prompts, seed, dev, boot, ablations=kinds)
    for kind, k in s["by_ablation"].items():
        for c in k["concentration"]:
            click.echo(f"{kind} ablation, layer {c['layer']}: top head {c['top_head']} share {c['top_share']:.2f} "
                       f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}] (uniform {c['uniform_share']:.2f})")
    click.echo(f"E2 written to {out}")


@app.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@_analysis_options
@click.option("--keep", default=None, help='per-layer policy, 1-based layers, e.g. "1:all,2:top1,3:top1" '
                                          "(default: all heads in layer 1, top1 in every later layer)")
@click.option("--finetune", "finetune_steps", type=int, default=0, show_default=True,
              help="AdamW steps with the gates fixed after pruning (0 = no retraining)")
@ablation_option
def prune(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int], device: str,
          sets: tuple[str, ...], keep: Optional[str], finetune_steps: int, ablation: str) -> None:
    """E3: risk vs n of the full model, the pruned model and the control (layer 1 cut to one head too)."""
    _check_analysis_args(preset, prompts, seed)
    preset = _analysis_preset(ckpt, preset, sets)
    kinds = _check_ablation(ablation)
    if finetune_steps < 0:
        raise ConfigError(f"finetune: steps must be >= 0 (got {finetune_steps})")
    check_count("finetune", finetune_steps, 0, MAX_STEPS)
    dev = resolve_device(device)
    from .analysis.pruning import parse_policy
    from .experiments.e3_pruning import run_e3

    if keep is not None:
        parse_policy(keep)
    with analysis_out(out, [ckpt], "E3", preset):
        s = run_e3(ckpt, out, keep, preset, finetune_steps, prompts, seed, dev, ablations=kinds)
    for kind, k in s["by_ablation"].items():
        for name, r in k["risk_ratio_vs_full"].items():
            pr = k["probe_ratio_vs_full"][name]
            click.echo(f"{kind} ablation, {name}: risk / full = {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                       f"; last-layer probe risk / full = {pr['ratio']:.3f} [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]")
    click.echo(f"E3 written to {out}")


@app.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@_analysis_options
@click.option("--prune", "prune_policy", default=None,
              help='also probe the pruned model: a policy such as "1:all,2:top1,3:top1", or "default"')
@click.option("--compare", multiple=True, type=click.Path(path_type=Path),
              help="other checkpoints to probe on the same prompts (e.g. the single-head model); repeatable")
@ablation_option
def probe(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int], device: str,
          sets: tuple[str, ...], prune_policy: Optional[str], compare: tuple[Path, ...], ablation: str) -> None:
    """E4: ridge probes of <w*, x_q> from the residual stream after each layer, per context length."""
    _check_analysis_args(preset, prompts, seed)
    preset = _analysis_preset(ckpt, preset, sets)
    kinds = _check_ablation(ablation)
    dev = resolve_device(device)
    from .analysis.pruning import parse_policy
    from .experiments.e4_probes import run_e4, summary_models

    if prune_policy not in (None, "default"):
        parse_policy(prune_policy)
    with analysis_out(out, [ckpt, *compare], "E4", preset):
        s = run_e4(ckpt, out, prune_policy, list(compare), preset, prompts, seed, dev, ablations=kinds)
    for m, v in summary_models(s).items():
        click.echo(f"{m}: " + ", ".join(f"{l}={r:.3f}" for l, r in v["mean_probe_risk_norm"].items()))
    click.echo(f"E4 written to {out}")


@app.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@_analysis_options
@click.option("--single", type=click.Path(path_type=Path), default=None,
              help="single-head checkpoint of the same task, analysed on the same prompts")
@click.option("--no-construct", is_flag=True, help="skip E6c (the hand-built PtO transformer check)")
def mechanism(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
              device: str, sets: tuple[str, ...], single: Optional[Path], no_construct: bool) -> None:
    """E6: decode PtO's features from layer 1 (E6a), compare layers with PtO/GD steps (E6b), check E6c."""
    _check_analysis_args(preset, prompts, seed)
    preset = _analysis_preset(ckpt, preset, sets)
    dev = resolve_device(device)
    from .experiments.e6_mechanism import run_e6

    with analysis_out(out, [ckpt] + ([single] if single else []), "E6", preset):
        s = run_e6(ckpt, out, single, preset=preset, n_prompts=prompts, seed=seed, device=dev,
                   with_construct=not no_construct)
    for k, v in s["e6a_mean_r2"].items():
        if "/layer1/" in k:
            click.echo(f"E6a R^2 {k}: {v:.3f}")
    for v in s["e6b_verdict"]:
        if v["eta_fit"] == "match":
            click.echo(f"E6b {v['model']} {v['readout']} layer {v['layer']} {v['n_range']}: "
                       f"rel.err PtO {v['pto_rel_err']:.3f} vs GD {v['gd_rel_err']:.3f} "
                       f"(GD - PtO 95% CI [{v['diff_ci_low']:.3f}, {v['diff_ci_high']:.3f}]) -> {v['tracks']}")
    if s["e6c_max_abs_dev"] is not None:
        click.echo(f"E6c construct vs PtO: max abs deviation {s['e6c_max_abs_dev']:.2e}")
    click.echo(f"E6 written to {out}")


@app.command()
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
@executor_options
def reproduce(preset: str, out: Path, seeds: Optional[int], sigmas: Optional[str], stacked: Optional[bool],
              any_t: bool, device: str, sets: tuple[str, ...], threads: int, train_all: bool,
              jobs: Optional[int], not_learned: bool, executor: str, no_wait: bool) -> None:
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
    import torch

    from .reproduce import reproduce as run

    torch.set_num_threads(threads)
    if preset == "quick" and not (sets or seeds or levels):
        from .zoo import CONFIGS, ZOO_DIR, complete_seeds
        from .zoo_reproduce import reproduce_zoo

        if train_all or any(complete_seeds(c) for c in CONFIGS.values()):
            with writing(out, "reproduce"):
                report = reproduce_zoo(out, train=train_all, device=dev, any_t=any_t,
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
    import os

    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise ConfigError(f"threads: must be between 1 and {cores}, the CPU cores of this machine (got {threads})")


def check_sigmas(preset: Preset, levels: list[float]) -> list[float]:
    """Each noise level through the same validation as ``task.sigma`` (``--sigma``, ``--set``, presets),
    so ``--sigmas nan`` fails here, not as a scikit-learn traceback after minutes of training."""
    from .config import TaskConfig, validate

    for x in levels:
        try:
            validate(TaskConfig, {**preset.task.model_dump(), "sigma": x})
        except ConfigError as e:
            raise ConfigError(f"sigmas: {str(e).removeprefix('sigma: ')}") from None
    return levels


@app.command("train")
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
    from .training import TrainSpec, train

    TrainSpec.from_preset(p, heads)  # validates the head count before any work
    if resume and not (out / "meta.json").exists():
        raise ConfigError(f"resume: {out} holds no checkpoint to continue (run without --resume to start one)")
    with writing(out, "train"):
        r = train(p, heads, out, dev, resume=resume, progress=not quiet)
    last = r.history[-1] if r.history else {}
    click.echo(f"trained h={heads} to step {r.meta['step']} in {out}; "
               + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("r@")))


@app.command("eval")
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
    from .checkpoint import load_meta
    from .config import TaskConfig, validate
    from .headline import risk_lines
    from .experiments.evaluate import evaluate_checkpoint

    with analysis_out(out, [ckpt], "eval"):
        rows = evaluate_checkpoint(ckpt, out, dev, prompts)
    echo_lines(risk_lines(rows, validate(TaskConfig, load_meta(ckpt)["task"])))
    click.echo(f"evaluation written to {out}")


@app.command("sweep-heads")
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
    from .experiments.heads_sweep import run_e1

    from .headline import risk_lines
    from .io import read_csv

    with writing(out, "E1 heads sweep"):
        s = run_e1(p, out, dev, workers=workers, stacked=stacked, executor=ex)
    models = [f"transformer h={h}" for h in p.heads]
    echo_lines(risk_lines(read_csv(out / "e1_heads.csv"), p.task, models + ["pto", "gd", "lasso", "ridge", "bayes"]))
    click.echo(f"E1 written to {out} (training {s['train_wall_s']:.0f} s)")


def _int_list(name: str, text: str) -> list[int]:
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


@app.command("sweep-arch")
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
    Ls, ms, hs = _int_list("layers", layers), _int_list("mlp", mlps), _int_list("heads", heads)
    check_count("seeds", seeds, 1, MAX_SEEDS)
    check_cores("jobs", jobs)
    if min(Ls) < 1:
        raise ConfigError(f"layers: every depth must be >= 1 (got {layers!r})")
    if set(ms) - {0, 1}:
        raise ConfigError(f"mlp: must be 0 or 1 (got {mlps!r})")
    for h in hs:
        from .training import TrainSpec

        TrainSpec.from_preset(p, h)
    dev = resolve_device(device)
    from .experiments.arch_sweep import arch_table, run_arch_sweep

    if table and not (out / "sweep.json").exists():
        raise ConfigError(f"out: {out} holds no trained sweep (no sweep.json); run sweep-arch without --table first")
    with writing(out, "architecture sweep"):
        s = None if table else run_arch_sweep(p, out, Ls, [bool(m) for m in ms], hs, seeds, dev, stacked=stacked,
                                              jobs=jobs, executor=ex)
        rows = arch_table(p, out, dev)
    echo_lines(arch_lines(rows))
    if s is not None:
        click.echo(f"sweep of {s['models']} models written to {out} (training {s['train_wall_s']:.0f} s)")
    click.echo(f"table of {len(rows)} rows written to {out / 'table.csv'}")


def arch_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per architecture and seed: each head count's risk at n = d and 2d (the table's headline columns)."""
    import re

    lines = []
    for r in rows:
        heads = sorted({int(m.group(1)) for k in r if (m := re.fullmatch(r"h(\d+)_risk_nd", k))})
        cells = [f"h={h} " + ", ".join(f"n={key} {float(r[f'h{h}_risk_n{key}']):.3f}" for key in ("d", "2d")
                                       if r.get(f"h{h}_risk_n{key}", "") != "") for h in heads]
        lines.append(f"L={r['L']} mlp={r['mlp']} seed {r['seed']}: excess risk / s tau^2 " + "; ".join(cells))
    return lines


@app.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@_analysis_options
def emergence(ckpt: Path, preset: Optional[str], out: Path, prompts: Optional[int], seed: Optional[int],
              device: str, sets: tuple[str, ...]) -> None:
    """E7: head assessment and the pruning test on every training snapshot of CKPT (train.snapshots > 0)."""
    _check_analysis_args(preset, prompts, seed)
    preset = _analysis_preset(ckpt, preset, sets)
    dev = resolve_device(device)
    from .experiments.e7_emergence import run_e7
    from .io import read_json

    with analysis_out(out, [ckpt], "E7", preset):
        run_e7(ckpt, out, preset=preset, n_prompts=prompts, seed=seed, device=dev)
    t = read_json(out / "summary.json")["trend"]
    click.echo(f"E7 steps {t['from_step']} -> {t['to_step']}: top-head shares {t['first']['shares']} -> "
               f"{t['last']['shares']} (1b {t['claim_1b']}); pruned/full {t['first']['pruned_ratio']:.3g} -> "
               f"{t['last']['pruned_ratio']:.3g} (2a {t['claim_2a']})")
    click.echo(f"E7 written to {out}")


from .zoo_cli import zoo_group  # noqa: E402  (a sub-group in its own module)

app.add_command(zoo_group)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning every expected failure into one line on stderr (exit codes:
    :data:`EXIT_CODES`).

    Ctrl-C and SIGTERM unwind the command (locks released, workers terminated: ``icl_heads.workers``)
    and end in one line saying what a rerun does, exit 130 (SIGINT) or 143 (SIGTERM) -- at any moment,
    start-up included (``icl_heads.__main__`` catches one that lands while this module is imported).
    """
    interrupted: Optional[int] = None
    try:
        from .workers import JobsFailed, JobsSubmitted, install_term_handler, keep_freed_memory, restore_term_handler

        keep_freed_memory()
        previous = install_term_handler()
        try:
            app.main(args=argv, prog_name="icl-heads", standalone_mode=False)
        finally:
            restore_term_handler(previous)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        interrupted = 143 if _terminated(e) else 130
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code or 2)
    except (ConfigError, CheckpointError) as e:
        fail(str(e), 2)
    except OSError as e:  # the system, not the input: a full disk, a read-only or vanished folder
        if not _interrupt_in(e):
            fail(os_error_line(e), 1)
        interrupted = 143 if _terminated(e) else 130
    except JobsSubmitted as e:  # --no-wait: the jobs are queued; the same command without it collects them
        click.echo(f"submitted {len(e.job_ids)} jobs: {' '.join(e.job_ids)} (logs in {e.folder})")
        click.echo(f"collect the results with: {_collect_command(argv)}")
    except JobsFailed as e:
        fail(str(e), 1)
    except Exception as e:  # a Ctrl-C inside a lazy import leaves a half-initialised module behind: whatever
        if not _interrupt_in(e):  # fails next (an AttributeError of numpy, seen) is the interrupt's doing
            raise
        interrupted = 143 if _terminated(e) else 130
    if interrupted is not None:
        click.echo(f"interrupted: {_resume_hint(argv)}", err=True)
        sys.exit(interrupted)


def fail(message: str, code: int) -> None:
    """One line ``error: ...`` on stderr (only its first line: a message is never a paragraph), then exit."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


def os_error_line(e: OSError) -> str:
    """``<path>: <why>`` for an OSError (errno names the common ones plainly)."""
    import errno

    why = {errno.ENOSPC: "no space left on the device (disk full)", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}.get(e.errno or -1, e.strerror or str(e))
    where = e.filename if e.filename is not None else "output"
    return f"{where}: {why}"


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or during (cycle-safe)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _interrupt_in(e: BaseException) -> bool:
    return any(isinstance(x, KeyboardInterrupt) for x in _chain(e))


def _terminated(e: BaseException) -> bool:
    from .workers import Terminated

    return any(isinstance(x, Terminated) for x in _chain(e))


def _collect_command(argv: Optional[list[str]]) -> str:
    """The command line that waits for ``--no-wait``'s jobs and lands their results: the same, without it."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["icl-heads", *[a for a in args if a != "--no-wait"]])


def _resume_hint(argv: Optional[list[str]]) -> str:
    """What a rerun does, said only where it is true: ``train`` continues a checkpoint with ``--resume`` (if one
    was written), ``reproduce``, the sweeps and ``zoo train`` keep finished stages and models; an analysis keeps
    nothing of an interrupted run and starts again."""
    args = sys.argv[1:] if argv is None else list(argv)
    cmd = next((a for a in args if not a.startswith("-")), "")
    if cmd == "train":
        out = _option_value(args, "--out")
        if out is None or not (Path(out) / "meta.json").exists():
            return "no checkpoint was written yet; rerun the same command to start again"
        if "--resume" in args:
            return "rerun the same command to continue the checkpoint"
        return "rerun the same command with --resume to continue the checkpoint"
    if cmd in ("reproduce", "sweep-heads", "sweep-arch") or args[:2] == ["zoo", "train"]:
        return "rerun the same command to resume (finished work is kept)"
    if cmd in app.commands and cmd != "zoo":
        return "nothing of this run is kept; rerun the same command to start it again"
    return "nothing was started"


def _option_value(args: list[str], name: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


if __name__ == "__main__":
    main()
