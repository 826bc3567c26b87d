"""The ``icl-heads`` command group: every command, one module per group of them (SPEC section 5).

:mod:`.estimators` E5; :mod:`.train` train, sweep-heads, sweep-arch; :mod:`.analysis` assess-heads, prune,
probe, mechanism, emergence, eval; :mod:`.reproduce` the main job; :mod:`.zoo` the ``zoo`` sub-group.
Shared options in :mod:`.options`, printed results in :mod:`.output`, failures in :mod:`.errors`.
"""

from __future__ import annotations

import click

from .. import __version__
from .analysis import assess_heads_cmd, emergence, eval_cmd, mechanism, probe, prune
from .errors import EXIT_CODES
from .estimators import estimators
from .reproduce import reproduce
from .train import sweep_arch, sweep_heads, train_cmd
from .zoo import zoo_group


@click.group(help="Trained transformers, attention heads and in-context sparse regression: experiments E1-E7 "
                  "(docs/science.md).\n\n" + EXIT_CODES.replace("\n", " "),
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="icl-heads", message="%(prog)s %(version)s")
def app() -> None:
    pass


for command in (estimators, assess_heads_cmd, prune, probe, mechanism, reproduce, train_cmd, eval_cmd, sweep_heads,
                sweep_arch, emergence, zoo_group):
    app.add_command(command)
