"""``icl-heads zoo``: list, verify, train and describe the model zoo (``icl_heads.zoo``).

The zoo's folder is ``--root``, else ``$ICL_HEADS_ZOO``, else the source checkout's ``zoo/``
(:func:`icl_heads.zoo.registry.default_zoo_dir`); ``list``, ``verify`` and ``cards`` refuse a missing one."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Optional

import click

from ..config import ConfigError
from .options import (executor_options, make_executor, parse_ints, parse_list, parse_sets, resolve_device,
                      split_executor_sets)
from .output import echo_lines, zoo_lines


@click.group("zoo", help="The shipped reference models: list, verify, train, cards.")
def zoo_group() -> None:
    pass


def _root(root: Optional[Path]) -> Path:
    from ..zoo import ZOO_DIR

    return ZOO_DIR if root is None else root


def _existing_root(root: Optional[Path]) -> Path:
    """The zoo folder a command reads: one line naming it when it is missing (an installed package without
    ``$ICL_HEADS_ZOO`` looks in ``./zoo``)."""
    from ..zoo import require_zoo

    return require_zoo(_root(root))


root_option = click.option("--root", type=click.Path(path_type=Path), default=None,
                           help="zoo folder (default: $ICL_HEADS_ZOO, else the source checkout's zoo/)")


@zoo_group.command("list")
@root_option
def list_cmd(root: Optional[Path]) -> None:
    """One line per model: configuration, seed, heads, steps, converged, risk at n = d/2, d, 2d."""
    from ..zoo import listing

    rows = listing(_existing_root(root))
    if not rows:
        click.echo(f"the zoo in {_root(root)} holds no models yet")
    echo_lines(zoo_lines(rows))


@zoo_group.command("verify")
@root_option
def verify_cmd(root: Optional[Path]) -> None:
    """Check every zoo file against zoo/SHA256SUMS (a changed byte is one line, exit 2)."""
    from ..zoo import verify

    n = verify(_existing_root(root))
    click.echo(f"zoo ok: {n} files match {_root(root) / 'SHA256SUMS'}")


@zoo_group.command("train")
@click.option("--config", "configs", default="A,B,C", show_default=True,
              help="comma-separated configurations (the zoo's: zoo/README.md)")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/zoo-train"), show_default=True,
              help="resumable training folders (with optimizer state)")
@click.option("--jobs", type=int, default=2, show_default=True, help="training processes (one per core)")
@click.option("--commit/--no-commit", default=False, help="git-commit each model as it lands")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--stacked", is_flag=True, help="train all members as stacks (the GPU path)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override every configuration's recipe (dry runs; recorded in each model's meta); "
                   "executor.FIELD=VALUE sets the executor")
@click.option("--minutes", type=float, default=None,
              help="accumulating configurations (wsd, e.g. E): train this long, export cool-downs, then stop "
                   "cleanly; the state under --state resumes on the next call")
@click.option("--heads", "heads_opt", default=None, metavar="H[,H...]",
              help="accumulating configurations: train only these head counts (e.g. 4: the largest models "
                   "first); the others wait for a later call")
@click.option("--state", "state_root", type=click.Path(path_type=Path), default=None,
              help="resumable state of accumulating configurations (default: the repository's zoo_state/)")
@executor_options
@root_option
def train_cmd(configs: str, work: Path, jobs: int, commit: bool, device: str, stacked: bool,
              sets: tuple[str, ...], minutes: Optional[float], heads_opt: Optional[str], state_root: Optional[Path],
              executor: str, no_wait: bool, root: Optional[Path]) -> None:
    """Train every zoo model not yet in the zoo with its configuration's recipe (resumable).

    Accumulating configurations grow each model's stable run by doublings, take a cool-down at each and
    export it, until it converges or reaches its cap; with --minutes they stop cleanly on time, and with
    --commit what changed (models, SHA256SUMS, the resumable state) is committed once at the end."""
    from ..zoo import get_config, train_zoo

    sets, executor_sets = split_executor_sets(sets)
    ex = make_executor(executor, executor_sets, no_wait)
    extra = parse_sets(sets)
    chosen = [get_config(c) for c in dict.fromkeys(parse_list(configs, "config"))]
    chosen = [replace(c, overrides={**c.overrides, **extra}) for c in chosen] if extra else chosen
    for c in chosen:
        c.preset(0)  # validates the overrides before any work
    device = resolve_device(device)
    if not 1 <= jobs <= (os.cpu_count() or 1):
        raise ConfigError(f"jobs: must be between 1 and {os.cpu_count() or 1}, the CPU cores of this machine "
                          f"(got {jobs})")
    zroot = _root(root)

    def git_commit(dest: Path) -> None:
        rel = dest.relative_to(zroot.parent)
        r = subprocess.run(["git", "add", str(rel), str(zroot / "SHA256SUMS")], cwd=zroot.parent)
        if r.returncode == 0:
            subprocess.run(["git", "commit", "-q", "-m", f"zoo: {rel}", "--", str(rel), str(zroot / "SHA256SUMS")],
                           cwd=zroot.parent)

    if minutes is not None and not (0 < minutes < 10**6):
        raise ConfigError(f"minutes: must be in (0, 1e6) (got {minutes})")
    fixed = [c for c in chosen if not c.accumulates]
    growing = [c for c in chosen if c.accumulates]
    if minutes is not None and fixed:
        raise ConfigError(f"minutes: only accumulating configurations stop on time ({', '.join(c.name for c in fixed)} "
                          "train to a fixed length)")
    heads = None if heads_opt is None else tuple(parse_ints(heads_opt, "heads"))
    if heads is not None and not growing:
        raise ConfigError("heads: only accumulating configurations train a subset of their head counts")
    if heads is not None and not any(h in c.heads + tuple(h for _, h in c.extra) for c in growing for h in heads):
        raise ConfigError(f"heads: none of {heads_opt} is a head count of {', '.join(c.name for c in growing)}")
    if growing and executor != "local":
        raise ConfigError(f"executor: accumulating configurations ({', '.join(c.name for c in growing)}) train on "
                          "this machine's processes (--executor local); on a cluster, run `zoo train --minutes` "
                          "inside one job (docs/cluster.md)")
    if growing:
        from ..zoo import STATE_DIR, accumulate_zoo

        sroot = STATE_DIR if state_root is None else state_root
        for line in accumulate_zoo(growing, 10**6 if minutes is None else minutes, jobs, zroot, sroot, device,
                                   heads):
            click.echo(line)
        if commit:
            commit_paths(zroot.parent, [zroot, sroot], f"zoo train: {', '.join(c.name for c in growing)}")
    if fixed:
        done = train_zoo(fixed, work, jobs, zroot, git_commit if commit else None, device, stacked, executor=ex)
        click.echo(f"{len(done)} models exported into {zroot}")


def commit_paths(repo: Path, paths: list[Path], message: str) -> None:
    """One git commit of everything that changed under ``paths`` (nothing when nothing changed)."""
    rels = [str(Path(p).resolve().relative_to(Path(repo).resolve())) for p in paths]
    subprocess.run(["git", "add", "-A", "--", *rels], cwd=repo, check=False)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *rels], cwd=repo)
    if staged.returncode == 1:
        subprocess.run(["git", "commit", "-q", "-m", message, "--", *rels], cwd=repo, check=False)


@zoo_group.command("cards")
@root_option
def cards_cmd(root: Optional[Path]) -> None:
    """Write zoo/README.md: one model card per configuration, every number from the committed models."""
    from ..zoo.cards import write_cards

    path = write_cards(_existing_root(root))
    click.echo(f"model cards written to {path}")
