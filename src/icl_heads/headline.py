"""The few numbers a command prints when it ends: risk at n = d/2, d, 2d beside ridge and Bayes.

"written to DIR" alone made the user open a CSV to learn whether the run said anything
(issue 18); these lines are what one reads first.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .config import TaskConfig
from .training import marker_ns

REFERENCES = ("ridge", "lasso", "bayes")  # the baselines shown beside a model, where a command has them


def _n_names(task: TaskConfig) -> dict[int, str]:
    """``{n: "d" | "2d" | "d/2" | "n_max"}`` for the marker context lengths: a name only where n is that
    length (``--n-max 1`` with d = 5 labelled n = 1 "d/2", issue 26); one capped at ``n_max`` is called so."""
    names: dict[int, str] = {}
    for name, n in (("d", task.d), ("2d", 2 * task.d), ("d/2", max(task.d // 2, 1))):
        if n <= task.n_max:
            names.setdefault(n, name)
    for n in marker_ns(task):
        names.setdefault(n, "n_max")
    return names


def risk_lines(rows: Iterable[Mapping[str, Any]], task: TaskConfig, labels: Sequence[str] | None = None,
               key: str = "label") -> list[str]:
    """One line per label: normalised test risk at the marker n's (with the 95% CI where rows have one).

    ``rows``: dicts with ``key`` (the curve's name), ``n``, ``risk_norm`` and optionally ``ci_low``/``ci_high``;
    ``labels``: which curves and in what order (default: all, as they come).
    """
    ns, names = marker_ns(task), _n_names(task)
    table: dict[tuple[str, int], Mapping[str, Any]] = {(str(r[key]), int(r["n"])): r for r in rows}
    order = list(dict.fromkeys(lab for lab, _ in table)) if labels is None else [
        lab for lab in labels if any((lab, n) in table for n in ns)]
    width = max((len(lab) for lab in order), default=0)
    head = "  ".join(f"n={n} ({names[n]})".rjust(22) for n in ns)
    out = ["excess risk / E|w*|^2 on the test prompts (1 = predicting 0), 95% CI over prompts:",
           " " * (width + 4) + head]
    for lab in order:
        cells = [_cell(table.get((lab, n))) for n in ns]
        out.append(f"  {lab:<{width}}  " + "  ".join(c.rjust(22) for c in cells))
    return out


def _cell(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "-"
    v = float(r["risk_norm"])
    if "ci_low" in r and "ci_high" in r and r["ci_low"] not in ("", None):
        return f"{v:.3f} [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]"
    return f"{v:.3f}"
