"""What a command prints when it ends: the few numbers one reads first, one function per command.

"written to DIR" alone made the user open a CSV to learn whether the run said anything (issue 18);
these lines say it. Every function returns lines (tests read them without a command), :func:`echo_lines`
prints them. The context lengths and their names (n = d/2, d, 2d) are
:func:`icl_heads.training.marker_names`, the one place that rule is written.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import click

from ..config import TaskConfig
from ..training import marker_names

REFERENCES = ("ridge", "lasso", "bayes")  # the baselines shown beside a model, where a command has them


def echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def risk_lines(rows: Iterable[Mapping[str, Any]], task: TaskConfig, labels: Sequence[str] | None = None,
               key: str = "label") -> list[str]:
    """One line per label: normalised test risk at the marker n's (with the 95% CI where rows have one).

    ``rows``: dicts with ``key`` (the curve's name), ``n``, ``risk_norm`` and optionally ``ci_low``/``ci_high``;
    ``labels``: which curves and in what order (default: all, as they come).
    """
    names = marker_names(task)
    ns = list(names)
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


def arch_lines(rows: list[dict[str, Any]], heads: Sequence[int]) -> list[str]:
    """Per architecture and seed: each head count's risk at n = d and 2d (the table's headline columns
    ``h{h}_risk_nd`` / ``h{h}_risk_n2d``, named from the sweep's head counts, not parsed)."""
    lines = []
    for r in rows:
        cells = [f"h={h} " + ", ".join(f"n={key} {float(r[f'h{h}_risk_n{key}']):.3f}" for key in ("d", "2d")
                                       if r.get(f"h{h}_risk_n{key}", "") != "")
                 for h in sorted(heads) if f"h{h}_risk_nd" in r]
        lines.append(f"L={r['L']} mlp={r['mlp']} seed {r['seed']}: excess risk / s tau^2 " + "; ".join(cells))
    return lines


def e2_lines(summary: Mapping[str, Any]) -> list[str]:
    """Per ablation kind and layer: the top head's share of the layer's importance, with its CI."""
    return [f"{kind} ablation, layer {c['layer']}: top head {c['top_head']} share {c['top_share']:.2f} "
            f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}] (uniform {c['uniform_share']:.2f})"
            for kind, k in summary["by_ablation"].items() for c in k["concentration"]]


def e3_lines(summary: Mapping[str, Any]) -> list[str]:
    """Per ablation kind and model: risk and last-layer probe risk over the full model's, with CIs."""
    out = []
    for kind, k in summary["by_ablation"].items():
        for name, r in k["risk_ratio_vs_full"].items():
            pr = k["probe_ratio_vs_full"][name]
            out.append(f"{kind} ablation, {name}: risk / full = {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                       f"; last-layer probe risk / full = {pr['ratio']:.3f} [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]")
    return out


def e4_lines(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per probed model (``experiments.e4_probes.summary_models``): the mean probe risk after each layer."""
    return [f"{m}: " + ", ".join(f"{l}={r:.3f}" for l, r in v["mean_probe_risk_norm"].items())
            for m, v in models.items()]


def e6_lines(summary: Mapping[str, Any]) -> list[str]:
    """E6a's layer-1 R^2, E6b's matched-eta comparisons and E6c's deviation from PtO."""
    out = [f"E6a R^2 {k}: {v:.3f}" for k, v in summary["e6a_mean_r2"].items() if "/layer1/" in k]
    out += [f"E6b {v['model']} {v['readout']} layer {v['layer']} {v['n_range']}: "
            f"rel.err PtO {v['pto_rel_err']:.3f} vs GD {v['gd_rel_err']:.3f} "
            f"(GD - PtO 95% CI [{v['diff_ci_low']:.3f}, {v['diff_ci_high']:.3f}]) -> {v['tracks']}"
            for v in summary["e6b_verdict"] if v["eta_fit"] == "match"]
    if summary["e6c_max_abs_dev"] is not None:
        out.append(f"E6c construct vs PtO: max abs deviation {summary['e6c_max_abs_dev']:.2e}")
    return out


def e7_lines(trend: Mapping[str, Any]) -> list[str]:
    """The first and last snapshots' top-head shares and pruned/full ratios, with claims 1b and 2a's trend."""
    t = trend
    return [f"E7 steps {t['from_step']} -> {t['to_step']}: top-head shares {t['first']['shares']} -> "
            f"{t['last']['shares']} (1b {t['claim_1b']}); pruned/full {t['first']['pruned_ratio']:.3g} -> "
            f"{t['last']['pruned_ratio']:.3g} (2a {t['claim_2a']})"]


def zoo_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``zoo list``: one line per model, its risks at the marker n's."""
    out = []
    for r in rows:
        risks = " ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("r@"))
        out.append(f"{r['config']} seed{r['seed']} h{r['h']}  steps {r['steps']}  converged={r['converged']}  {risks}")
    return out
