"""``icl-heads zoo``: list, verify, train and describe the model zoo (``icl_heads.zoo``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

import click

from .cli_options import executor_options
from .config import ConfigError


@click.group("zoo", help="The shipped reference models: list, verify, train, cards.")
def zoo_group() -> None:
    pass


def _root(root: Optional[Path]) -> Path:
    from .zoo import ZOO_DIR

    return ZOO_DIR if root is None else root


root_option = click.option("--root", type=click.Path(path_type=Path), default=None,
                           help="zoo folder (default: the repository's zoo/)")


@zoo_group.command("list")
@root_option
def list_cmd(root: Optional[Path]) -> None:
    """One line per model: configuration, seed, heads, steps, converged, risk at n = d/2, d, 2d."""
    from .zoo import listing

    rows = listing(_root(root))
    if not rows:
        click.echo(f"the zoo in {_root(root)} holds no models yet")
    for r in rows:
        risks = " ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("r@"))
        click.echo(f"{r['config']} seed{r['seed']} h{r['h']}  steps {r['steps']}  converged={r['converged']}  {risks}")


@zoo_group.command("verify")
@root_option
def verify_cmd(root: Optional[Path]) -> None:
    """Check every zoo file against zoo/SHA256SUMS (a changed byte is one line, exit 2)."""
    from .zoo import verify

    n = verify(_root(root))
    click.echo(f"zoo ok: {n} files match {_root(root) / 'SHA256SUMS'}")


@zoo_group.command("train")
@click.option("--config", "configs", default="A,B,C", show_default=True, help="comma-separated configurations")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/zoo-train"), show_default=True,
              help="resumable training folders (with optimizer state)")
@click.option("--jobs", type=int, default=2, show_default=True, help="training processes (one per core)")
@click.option("--commit/--no-commit", default=False, help="git-commit each model as it lands")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--stacked", is_flag=True, help="train all members as stacks (the GPU path)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override every configuration's recipe (dry runs; recorded in each model's meta); "
                   "executor.FIELD=VALUE sets the executor")
@executor_options
@root_option
def train_cmd(configs: str, work: Path, jobs: int, commit: bool, device: str, stacked: bool,
              sets: tuple[str, ...], executor: str, no_wait: bool, root: Optional[Path]) -> None:
    """Train every zoo model not yet in the zoo with its configuration's recipe (resumable)."""
    from dataclasses import replace

    from .cli_options import make_executor, parse_sets, resolve_device, split_executor_sets
    from .zoo import get_config, train_zoo

    sets, executor_sets = split_executor_sets(sets)
    ex = make_executor(executor, executor_sets, no_wait)
    extra = parse_sets(sets)
    chosen = [get_config(c.strip()) for c in configs.split(",") if c.strip()]
    chosen = [replace(c, overrides={**c.overrides, **extra}) for c in chosen] if extra else chosen
    for c in chosen:
        c.preset(0)  # validates the overrides before any work
    device = resolve_device(device)
    if jobs < 1:
        raise ConfigError(f"jobs: must be >= 1 (got {jobs})")
    zroot = _root(root)

    def git_commit(dest: Path) -> None:
        rel = dest.relative_to(zroot.parent)
        r = subprocess.run(["git", "add", str(rel), str(zroot / "SHA256SUMS")], cwd=zroot.parent)
        if r.returncode == 0:
            subprocess.run(["git", "commit", "-q", "-m", f"zoo: {rel}", "--", str(rel), str(zroot / "SHA256SUMS")],
                           cwd=zroot.parent)

    done = train_zoo(chosen, work, jobs, zroot, git_commit if commit else None, device, stacked, executor=ex)
    click.echo(f"{len(done)} models exported into {zroot}")


@zoo_group.command("cards")
@root_option
def cards_cmd(root: Optional[Path]) -> None:
    """Write zoo/README.md: one model card per configuration, every number from the committed models."""
    from .zoo_cards import write_cards

    path = write_cards(_root(root))
    click.echo(f"model cards written to {path}")
