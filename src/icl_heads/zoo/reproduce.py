"""The main job on the zoo: E1-E7 on every configuration's models, one report per configuration,
and the factor table (configuration x claim) that says which factor produces the paper's pattern.

``OUT/<config>/`` is an ordinary ``reproduce`` folder of that configuration (its
``report.md``, ``verdicts.json``, seed folders); ``OUT/e5`` is shared (one task) and
copied into each configuration's folder, where its fingerprint lets ``reproduce``
reuse it. ``OUT/report.md`` holds the factor table and links the per-configuration
reports. With ``train=True`` every configuration's models are trained from scratch
into its folder with the configuration's recipe instead of read from the zoo.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..claims.across_seeds import Stat
from ..claims.trends import AWAY, TOWARD, UNDECIDED, claim_trends, summary_word
from ..config import ConfigError, ExecutorConfig
from ..experiments.algorithms import run_e5
from ..experiments.heads_sweep import seed_members
from ..io import atomic_write_text, read_csv, read_json, save_figure, write_json
from ..plotting import new_figure
from ..reproduce import E5_FIELDS, StageRunner, check_folder, reproduce, seed_preset, seed_stages
from ..runs import layout
from ..runs.layout import SEED_STAGES
from ..training import train_members
from ..training.executors import is_local, job_device, run_calls, with_folder
from .registry import (CONFIGS, NOT_LEARNED, ZOO_DIR, ZooConfig, available, complete_seeds, main_job_configs,
                       model_path)


def zoo_preset(config: ZooConfig, root: Path | None = None):
    """The configuration's preset with the head counts its first seed has as ``heads`` (E1's curve:
    the claims' head counts plus the extras, e.g. h = 2, that are in the zoo at ``root``)."""
    k0 = config.seeds[0]
    extra = {h for k, h in config.extra if k == k0 and (root is None or (k, h) in set(available(config.name, root)))}
    return config.preset(k0).model_copy(update={"heads": sorted(set(config.heads) | extra)})


def leading_seeds(config: ZooConfig, root: Path) -> int:
    """How many of the configuration's seeds, in order, are complete in the zoo (seed folders are indices)."""
    have, n = set(complete_seeds(config, root)), 0
    for k in config.seeds:
        if k not in have:
            break
        n += 1
    return n


def _pair_job(name: str, folder: Path, preset: Any, k: int, given: dict[int, Path], device: str, any_t: bool) -> None:
    """E1-E7 of one (configuration, seed) in a worker process (one torch thread), resumable by stage."""
    torch.set_num_threads(1)
    runner = StageRunner(folder, preset, [f"seed{k}/{s}" for s in SEED_STAGES],
                         log=lambda m: print(f"[zoo] {name} {m}", file=sys.stderr, flush=True))
    seed_stages(runner, folder / f"seed{k}", f"seed{k}", seed_preset(preset, k), device, first=k == 0, any_t=any_t,
                e5_csv=folder / "e5" / "e5_risk.csv" if k == 0 else None, given=given)


def analyse_pairs(out: Path, plan: Sequence[tuple[ZooConfig, int]], device: str, any_t: bool, jobs: int,
                  root: Path, executor: ExecutorConfig | None = None) -> None:
    """Every (configuration, seed)'s stages in ``jobs`` processes, E5 first (shared, serial); the
    per-configuration ``reproduce`` that follows finds them finished and only writes the report.

    The stages are independent across (configuration, seed) and each is deterministic, so the
    numbers equal a serial run's; a pair is the unit of work so 5 + 3 + 3 seeds keep 2 cores busy.
    ``workers.run_in_processes``, not a pool whose shutdown waits for every queued pair: SIGTERM and
    Ctrl-C end the running pairs (a rerun resumes them from their finished stages). ``executor``
    (``icl_heads.training.executors``): ``slurm`` runs one job per pair (job folder ``out/jobs``)."""
    shared = out / "e5"
    first = zoo_preset(plan[0][0], root)
    StageRunner(out, first, ["e5"]).run("e5", shared, lambda d: run_e5(first, d), fields=E5_FIELDS)
    jobs_args = []
    for c, seeds in plan:
        folder, preset = out / c.name, zoo_preset(c, root)
        folder.mkdir(parents=True, exist_ok=True)
        check_folder(folder, preset, seeds, [preset.task.sigma])
        if not (folder / "e5").exists():
            shutil.copytree(shared, folder / "e5")
        for k in range(seeds):
            given = {h: model_path(c.name, c.seeds[k], h, root) for h in seed_preset(preset, k).heads}
            jobs_args.append((c.name, folder, preset, k, given, job_device(device, executor), any_t))
    jobs_args.sort(key=lambda a: -pair_cost(a[2], a[3]))  # stable: configuration and seed order among equals
    run_calls(_pair_job, jobs_args, [f"{a[0]}/seed{a[3]}" for a in jobs_args], with_folder(executor, out / "jobs"),
              max(1, jobs))


# relative cost of one block's analysis: an MLP block (4D-wide hidden layer) costs 1.7 attention-only
# blocks, and seed 0 does 30% more (E6c and E6's any-T context) -- both from the per-pair stage times of
# the 12-pair main job on the 2-core VM (A 66-98 s, B 115-139 s, C 110-133 s, D 173 s).
MLP_BLOCK_COST, FIRST_SEED_COST = 1.7, 1.3


def pair_cost(preset: Any, k: int) -> float:
    """Estimated analysis time of one (configuration, seed), in attention-only layers.

    Why: the pairs are handed out longest first (LPT scheduling). In configuration order the three
    D pairs (L = 6) came last and one worker ran them while the other idled; longest first, the
    last pairs handed out are the short ones and the workers finish close together (simulated on
    the measured pair times: 892 s -> 828 s for the 14 pairs on 2 workers).
    """
    m = preset.model
    return m.n_layers * (MLP_BLOCK_COST if m.mlp else 1.0) * (FIRST_SEED_COST if k == 0 else 1.0)


def reproduce_zoo(out: Path, configs: Sequence[ZooConfig] | None = None, train: bool = False, device: str = "cpu",
                  root: Path = ZOO_DIR, any_t: bool = True, jobs: int = 1,
                  executor: ExecutorConfig | None = None, not_learned: bool = False) -> Path:
    """Run the main job over the zoo's configurations into ``out``; returns ``out/report.md``.

    ``configs``: default the main job's (:func:`~icl_heads.zoo.registry.main_job_configs`: every one but D,
    which ``reproduce --configs`` adds); the factor report names the configurations left out.

    A configuration whose models have not learned (:func:`model_state`, read from the zoo before any
    analysis) is *not testable* for every claim about trained models, so it is not analysed unless
    ``not_learned`` (``reproduce --not-learned``): its column in the factor report says so, with its state.

    ``jobs > 1`` (zoo models only): the (configuration, seed) stages run in that many processes
    first (:func:`analyse_pairs`); the reports are the same. ``executor`` (``debug``, ``slurm``):
    with ``train``, every configuration's models train first as one batch of jobs (:func:`train_all`);
    on the zoo's models, the (configuration, seed) analyses are the jobs."""
    out = Path(out)
    configs = main_job_configs() if configs is None else list(configs)
    mode = {"source": "trained" if train else "zoo", "configs": [c.name for c in configs]}
    mode_file = out / "zoo_run.json"
    if mode_file.exists() and read_json(mode_file).get("source") != mode["source"]:
        raise ConfigError(f"out: {out} holds a run with models {read_json(mode_file)['source']}; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(mode_file, mode)
    skip = {} if train or not_learned else {c.name: n for c in configs if (n := leading_seeds(c, root))
                                              and not model_state(c, n, root)["learned"]}
    plan = [(c, leading_seeds(c, root)) for c in configs if c.name not in skip] if not train else []
    plan = [(c, n) for c, n in plan if n]
    if train and not is_local(executor):
        train_all(out, configs, device, executor)
    if (jobs > 1 or not is_local(executor)) and plan:
        analyse_pairs(out, plan, device, any_t, jobs, root, executor)
    done: dict[str, dict[str, Any]] = {}
    for c in configs:
        seeds = len(c.seeds) if train else leading_seeds(c, root)
        if c.name in skip:
            print(f"[zoo] {c.name}: its models have not learned ({model_state(c, seeds, root)['word']}): not "
                  "testable, not analysed (--not-learned analyses it)", file=sys.stderr, flush=True)
            done[c.name] = {"seeds": 0, "not_learned": seeds}
            continue
        if seeds == 0:
            print(f"[zoo] {c.name}: no complete seed in {root / c.name} yet, skipped", file=sys.stderr, flush=True)
            done[c.name] = {"seeds": 0}
            continue
        folder = out / c.name
        shared = out / "e5"
        if shared.is_dir() and not (folder / "e5").exists():
            shutil.copytree(shared, folder / "e5")
        print(f"[zoo] {c.name}: {c.title}, {seeds} seeds", file=sys.stderr, flush=True)
        models = None if train else (lambda k, h, c=c: model_path(c.name, c.seeds[k], h, root))
        report = reproduce(zoo_preset(c, None if train else root), folder, seeds=seeds, device=device, models=models, any_t=any_t)
        if not shared.exists():
            shutil.copytree(folder / "e5", shared)
        done[c.name] = {"seeds": seeds, "report": str(report.relative_to(out))}
    if not any(v["seeds"] or v.get("not_learned") for v in done.values()):
        raise ConfigError(f"zoo: {root} holds no complete seed of {', '.join(mode['configs'])}; "
                          "train them (icl-heads zoo train) or pass --train")
    return write_factor_report(out, configs, done, root)


def train_all(out: Path, configs: Sequence[ZooConfig], device: str, executor: ExecutorConfig | None) -> None:
    """Every configuration's models (all seeds) as one batch of jobs, into the folders where each
    configuration's ``reproduce`` trains them (its train stage then finds them finished): on a cluster
    all of them queue at once instead of one configuration after another. Job folder ``out/jobs``."""
    members = []
    for c in configs:
        preset = zoo_preset(c, None)
        per_seed = [seed_preset(preset, k) for k in range(len(c.seeds))]
        members += seed_members(per_seed, [layout.stage_dir(out / c.name, "e1", k) for k in range(len(c.seeds))])
    train_members(members, device, stack_root=out / "stacks", executor=with_folder(executor, out / "jobs"))


def factor_rows(out: Path, configs: Sequence[ZooConfig], done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (claim, configuration): the verdict over seeds and its key statistic per seed."""
    rows = []
    for c in configs:
        if not done[c.name]["seeds"]:
            continue
        for v in read_json(out / c.name / "verdicts.json"):
            per = v.get("per_seed", [])
            stat = (v.get("stats") or [{}])[0]
            name = stat.get("name", "")
            rows.append({"claim": v["claim"], "config": c.name, "verdict": v["verdict"], "statistic": name,
                         "threshold": stat.get("threshold"), "above": stat.get("above"),
                         "mean": stat.get("value"), "ci": stat.get("ci"), "pi": stat.get("pi"),
                         "passes": stat.get("passes"), "scale": stat.get("scale"), "bounds": stat.get("bounds"),
                         "per_seed": [ps.get("stats", {}).get(name) for ps in per]})
    return rows


def _cell(r: dict[str, Any]) -> str:
    """``verdict: statistic (needs > t) seeds a / b / c; mean [CI], PI; k/K pass``."""
    if not r["per_seed"]:  # not about trained models (claim 3: the estimators)
        return f"**{r['verdict']}** (estimators, E5)"
    side = ">" if r.get("above") else "<"
    text = f"**{r['verdict']}**: {r['statistic']}"
    if r.get("threshold") is not None:
        text += f" (needs {side} {r['threshold']:g})"
    text += " seeds " + " / ".join("?" if x is None else f"{x:.3g}" for x in r["per_seed"])
    if len(r["per_seed"]) < 2:
        text += " (one seed: not decided over seeds)"
    elif r.get("ci"):
        text += f"; mean {r['mean']:.3g} [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
        if r.get("pi"):
            text += f", PI [{r['pi'][0]:.3g}, {r['pi'][1]:.3g}]"
    if r.get("passes") is not None:
        text += f"; {r['passes']}/{len(r['per_seed'])} pass"
    return text


# pairs of configurations that differ in exactly one factor
FACTORS = {("A", "B"): "adding the MLP (A -> B)", ("B", "C"): "interleaving the tokens (B -> C)",
           ("A", "D"): "doubling the depth (A -> D)", ("A", "E"): "interleaving the tokens (A -> E)",
           ("E", "C"): "adding the MLP to interleaved tokens (E -> C)"}
FORMAT_CONTRAST = ("A", "E")  # the token format alone (attention-only, L = 3)
# NOT_LEARNED (registry.py): a configuration has *not learned* when its h = 4 models' mean risk at n = d
# (test prompts, zoo meta) is above it: its claims about trained models are *not testable* (issue 23).
NOT_TESTABLE = "not testable"


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def model_state(config: ZooConfig, seeds: int, root: Path) -> dict[str, Any]:
    """The state of a configuration's analysed models, from their zoo meta: per h = 4 model its risk at n = d,
    steps and whether converged (the zoo's test), and the configuration's word: *not learned* (mean h = 4 risk
    at n = d above :data:`NOT_LEARNED`), *converged* (every model), *training at T + c* (an accumulating
    configuration whose models grow on: their cool-downs at T, the next milestone at 2T) or *capped at T*,
    with the last gain."""
    h = max(config.heads)
    models = []
    for k in config.seeds[:seeds]:
        meta = read_json(model_path(config.name, k, h, root) / "meta.json")
        z = meta.get("zoo", {})
        conv = z.get("convergence", {})
        d = str(min(config.preset(k).task.d, config.preset(k).task.n_max))
        at = conv.get("at", {}).get(d, {})
        stable = z.get("stable_steps")  # accumulating (wsd) models: the stable steps their cool-down branched at
        models.append({"seed": k, "steps": meta.get("step"), "risk_at_d": at.get("risk"),
                       "steps_text": f"{stable} + {z.get('cooldown_steps')}" if stable else str(meta.get("step")),
                       "stable_steps": stable, "gain_at_d": at.get("improvement"),
                       "converged": bool(conv.get("converged")),
                       "state": z.get("state", "converged" if conv.get("converged") else "capped")})
    risks = [m["risk_at_d"] for m in models if m["risk_at_d"] is not None]
    mean = sum(risks) / len(risks) if risks else float("nan")
    steps = max((m["steps"] or 0) for m in models) if models else 0
    gains = [m["gain_at_d"] for m in models if m["gain_at_d"] is not None]
    if risks and mean > NOT_LEARNED:
        word = f"not learned (h = {h} at n = d: {mean:.3f} > {NOT_LEARNED:g})"
    elif models and all(m["converged"] for m in models):
        word = f"converged (h = {h} at n = d: {mean:.3f})"
    elif any(m["state"] == "training" for m in models):
        lead = max(models, key=lambda m: m["stable_steps"] or 0)  # mid-milestone, the members furthest along
        word = (f"training, at {lead['steps_text']} steps (h = {h} at n = d: {mean:.3f}; next milestone "
                f"{2 * (lead['stable_steps'] or 0)}" + (f"; last gain there {min(gains):+.0%} to {max(gains):+.0%})"
                                                        if gains else ")"))
    else:
        word = (f"capped at {steps} steps (h = {h} at n = d: {mean:.3f}"
                + (f"; last gain there {min(gains):+.0%} to {max(gains):+.0%})" if gains else ")"))
    word += _length_mismatch(config, seeds, root, models)
    return {"word": word, "learned": not (risks and mean > NOT_LEARNED), "risk_at_d": mean, "models": models}


def _length_mismatch(config: ZooConfig, seeds: int, root: Path, models: list[dict[str, Any]]) -> str:
    """A warning when the single-head reference models stand at another training length than the largest-head
    ones (an accumulating configuration grown head count by head count, `zoo train --heads`): 1a, 2b and the
    fraction of the advantage lost then compare models trained for different lengths."""
    h1 = min(config.heads)
    other = []
    for k, m in zip(config.seeds[:seeds], models):
        path = model_path(config.name, k, h1, root) / "meta.json"
        if path.exists() and (step := read_json(path).get("step")) != m["steps"]:
            other.append(f"seed {k}: {step}")
    if not other:
        return ""
    return (f"; **h = {h1} at other lengths** ({', '.join(other)} steps): the head-count comparisons (1a, 2b, the "
            "fraction of the advantage lost) mix training lengths")


def factor_sentence(claim: str, verdicts: dict[str, str]) -> str:
    """One sentence per claim: where it reproduced, and which single-factor change moves the verdict
    (only between configurations that learned: a *not testable* one is named, never compared)."""
    untestable = [c for c, x in verdicts.items() if x == NOT_TESTABLE]
    verdicts = {c: x for c, x in verdicts.items() if x != NOT_TESTABLE}
    if not verdicts:
        return f"**{claim}**: not testable in {', '.join(untestable)} (no configuration learned)."
    by = {v: [c for c, x in verdicts.items() if x == v] for v in ("reproduced", "not reproduced", "inconclusive")}
    parts = [f"{v} in {', '.join(cs)}" for v, cs in by.items() if cs]
    moved = [f for (a, b), f in FACTORS.items() if a in verdicts and b in verdicts and verdicts[a] != verdicts[b]
             and "inconclusive" not in (verdicts[a], verdicts[b])]
    same = [f for (a, b), f in FACTORS.items() if a in verdicts and b in verdicts and verdicts[a] == verdicts[b]
            != "inconclusive"]  # both undecided says nothing about the factor
    if moved:
        tail = f"; {_join(moved)} {'changes' if len(moved) == 1 else 'change'} the verdict"
    elif same:
        tail = f"; {_join(same)} {'leaves' if len(same) == 1 else 'leave'} it unchanged"
    else:
        tail = "; no single-factor comparison is decided" if len(verdicts) > 1 else "; one configuration only"
    if untestable:
        tail += f"; not testable in {', '.join(untestable)} (not learned)"
    return f"**{claim}**: " + "; ".join(parts) + tail + "."


def config_trends(folder: Path, config: ZooConfig, seeds: int) -> dict[str, list[Any]] | None:
    """Claims 1b and 2a's trend verdicts (:mod:`icl_heads.claims.trends`) from the seeds' E7 claim rows;
    None where a seed has none (snapshots missing)."""
    paths = [layout.stage_dir(folder, "e7", k) / layout.E7_CLAIMS_CSV for k in range(seeds)]
    if not seeds or not all(p.exists() for p in paths):
        return None
    return claim_trends([read_csv(p) for p in paths], list(config.seeds[:seeds]))


def trend_cell(verdicts: Sequence[Any]) -> str:
    """A claim's trend in one cell: the word, then how many of its statistics move each way."""
    counts = {w: sum(v.verdict == w for v in verdicts) for w in (TOWARD, AWAY, UNDECIDED)}
    return (f"**{summary_word(verdicts)}** ({counts[TOWARD]} toward, {counts[AWAY]} away, {counts[UNDECIDED]} "
            f"undecided of {len(verdicts)} statistics)")


def trend_details(trends: dict[str, dict[str, list[Any]]]) -> list[str]:
    """Every trend statistic per configuration: per-seed slopes, the mean with its 95% CI, the verdict."""
    lines = ["| configuration | statistic | slope toward the paper per doubling, per seed | mean [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    for name, by_claim in trends.items():
        for claim, vs in by_claim.items():
            for v in vs:
                st = v.stats[0]
                per = " / ".join(f"{row['stats'].get(st.name, float('nan')):+.3f}" for row in v.per_seed)
                ci = st.ci or (float("nan"), float("nan"))
                lines.append(f"| {name} | {v.claim.removeprefix('trend ')} | {per} | {st.value:+.3f} "
                             f"[{ci[0]:+.3f}, {ci[1]:+.3f}] | {v.verdict} |")
    return lines


def format_sentences(trends: dict[str, dict[str, list[Any]]], cell: dict[tuple[str, str], dict[str, Any]],
                     claims: Sequence[str], states: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per claim on what the format contrast (A vs E) decides, by verdict and by trend."""
    a, e = FORMAT_CONTRAST
    if a not in states or e not in states:
        return [f"* The format contrast ({a} vs {e}) is not analysed: {e if e not in states else a} has no complete seed."]
    untestable = [c for c in (a, e) if not states[c]["learned"]]
    if untestable:
        said = ", ".join(f"{c} has not learned {states[c]['word'].removeprefix('not learned ')}" for c in untestable)
        return [f"* Not testable: {said}; every claim about trained models waits for its models to leave the plateau."]
    out = []
    for claim in claims:
        ra, re_ = cell.get((claim, a)), cell.get((claim, e))
        if ra is None or re_ is None or not ra["per_seed"]:
            continue
        va, ve = ra["verdict"], re_["verdict"]
        if NOT_TESTABLE in (va, ve):
            text = f"not testable ({', '.join(c for c, v in ((a, va), (e, ve)) if v == NOT_TESTABLE)} has not learned)"
        elif va == ve:
            text = (f"{va} in both: the token format alone does not move it" if va != "inconclusive"
                    else "inconclusive in both: nothing is decided")
        elif "inconclusive" in (va, ve):
            text = f"{va} with paired tokens, {ve} with interleaved ones: not decided"
        else:
            text = f"{va} with paired tokens, {ve} with interleaved ones: the format moves it"
        key = claim.split(".")[0]
        tr = [trends.get(c, {}).get(key) for c in (a, e)]
        if all(tr):
            text += f"; with training it {summary_word(tr[0])} in {a} and {summary_word(tr[1])} in {e}"
        out.append(f"* **{claim}** ({a} vs {e}): {text}.")
    return out


def factor_figure(rows: Sequence[dict[str, Any]], names: Sequence[str], states: dict[str, dict[str, Any]],
                  baselines: dict[str, float], path: Path) -> Path:
    """Left: configuration x claim, each cell the across-seed mean with its 95% CI on the claim's scale
    (the distance from the threshold in the statistic's own units: log ratio, logit share, or the value), the
    verdict as colour; right: the h = 4 models' risk at n = d per configuration beside ridge, lasso and Bayes."""
    claims = [c for c in dict.fromkeys(r["claim"] for r in rows) if any(r["per_seed"] for r in rows if r["claim"] == c)]
    colour = {"reproduced": "tab:green", "not reproduced": "tab:red", "inconclusive": "tab:orange",
              NOT_TESTABLE: "tab:gray"}
    fig, (ax, ax2) = new_figure(1, 2, figsize=(15, 0.45 * len(claims) + 2.5), gridspec_kw={"width_ratios": [3, 1]})
    for j, name in enumerate(names):
        for i, claim in enumerate(claims):
            r = next((r for r in rows if r["claim"] == claim and r["config"] == name), None)
            if r is None or r.get("mean") is None or not r.get("ci"):
                continue
            ref = Stat("", 0.0, r["threshold"], bool(r["above"]), r.get("scale") or "linear",
                       tuple(r["bounds"]) if r.get("bounds") else None)
            z = [float(ref.to_scale(v)) - float(ref.to_scale(r["threshold"])) for v in (r["mean"], *r["ci"])]
            sign = 1 if r["above"] else -1  # right of 0 = the claim's side
            y = i + (j - (len(names) - 1) / 2) * 0.8 / max(len(names), 1)
            lo, hi = sorted((sign * z[1], sign * z[2]))
            ax.errorbar([sign * z[0]], [y], xerr=[[sign * z[0] - lo], [hi - sign * z[0]]], fmt="o",
                        color=colour.get(r["verdict"], "k"), ms=4, capsize=2, label=name if i == 0 else None)
            ax.annotate(name, (hi, y), fontsize=6, xytext=(2, -2), textcoords="offset points")
    ax.axvline(0, color="k", lw=0.8)
    short = [c.split(".")[0] + (f" ({c[c.rindex('(') + 1:-1]})" if c.endswith(")") else "") for c in claims]
    ax.set_yticks(range(len(claims)), short, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean over seeds minus threshold, on the claim's scale (right: the claim's side); 95% CI")
    ax.set_title("claims x configurations (colour: verdict; grey: not testable)", fontsize=9)
    xs = list(range(len(names)))
    ax2.bar(xs, [states[n]["risk_at_d"] for n in names], color=["tab:gray" if not states[n]["learned"] else "tab:blue"
                                                                 for n in names])
    for b, style in zip(("ridge", "lasso", "bayes"), ("--", "-.", ":")):
        if b in baselines:
            ax2.axhline(baselines[b], color="k", ls=style, lw=1, label=f"{b} {baselines[b]:.3f}")
    ax2.axhline(NOT_LEARNED, color="tab:red", lw=0.8, label=f"not learned above {NOT_LEARNED:g}")
    ax2.set_xticks(xs, names)
    ax2.set_yscale("log")
    ax2.set_ylabel("largest-head model's risk at n = d (mean over seeds)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def e5_at_d(out: Path, d: int) -> dict[str, float]:
    """Ridge, lasso and Bayes risk at n = d from the shared E5 table."""
    path = out / "e5" / layout.E5_CSV
    if not path.exists():
        return {}
    return {r["estimator"]: float(r["risk_norm"]) for r in read_csv(path)
            if r["estimator"] in ("ridge", "lasso", "bayes") and int(float(r["n"])) == d}


def _seeds_text(d: dict[str, Any]) -> str:
    if d.get("not_learned"):
        return f"{d['not_learned']} seeds in the zoo, not analysed: not learned"
    return f"{d['seeds']} seed{'s' if d['seeds'] != 1 else ''}"


def claim_verdicts(claim: str, names: Sequence[str], cell: dict[tuple[str, str], dict[str, Any]],
                   done: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``configuration -> verdict`` of one claim; a configuration skipped as not learned is *not testable*
    for claims about trained models (the estimators' claim 3 does not depend on it)."""
    about_models = any(r["per_seed"] for r in rows if r["claim"] == claim)
    return {n: cell[(claim, n)]["verdict"] if (claim, n) in cell else NOT_TESTABLE for n in names
            if (claim, n) in cell or (done[n].get("not_learned") and about_models)}


def left_out_text(left_out: Sequence[ZooConfig]) -> str:
    """The sentence naming the zoo's configurations a run left out (and how to add them); empty if none."""
    if not left_out:
        return ""
    return (" Not in this run: " + "; ".join(f"**{c.name}** {c.title}" for c in left_out)
            + f" (`reproduce --configs {','.join(CONFIGS)}` analyses every configuration; the main job leaves "
            "these out to stay within 15 minutes on two cores: docs/performance.md).")


def write_factor_report(out: Path, configs: Sequence[ZooConfig], done: dict[str, dict[str, Any]],
                        root: Path = ZOO_DIR) -> Path:
    rows = factor_rows(out, configs, done)
    names = [c.name for c in configs if done[c.name]["seeds"] or done[c.name].get("not_learned")]
    by_name = {c.name: c for c in configs}
    states = {n: model_state(by_name[n], done[n]["seeds"] or done[n]["not_learned"], root) for n in names}
    for r in rows:  # a configuration that has not learned has no verdict about trained models
        r["state"] = states[r["config"]]["word"]
        if r["per_seed"] and not states[r["config"]]["learned"]:
            r["verdict_as_computed"], r["verdict"] = r["verdict"], NOT_TESTABLE
    trends = {n: t for n in names if (t := config_trends(out / n, by_name[n], done[n]["seeds"])) is not None}
    write_json(out / "factor_table.json", rows)
    write_json(out / "factor_trends.json", {n: {c: [v.to_json() for v in vs] for c, vs in t.items()}
                                            for n, t in trends.items()})
    write_json(out / "model_state.json", states)
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    cell = {(r["claim"], r["config"]): r for r in rows}
    d = min(configs[0].preset().task.d, configs[0].preset().task.n_max)
    base = e5_at_d(out, d)
    fig = factor_figure(rows, names, states, base, out / "factor_figure.png")
    lines = ["# icl-heads: the factor study on the zoo", "",
             f"![configuration x claim]({fig.name})", "",
             "Configurations (quick task, h = 4 analysed, h = 1 as the single-head reference): "
             + "; ".join(f"**{c.name}** {c.title} ({_seeds_text(done[c.name])})" for c in configs) + "."
             + left_out_text([c for c in CONFIGS.values() if c.name not in by_name]), "",
             "**State of the models** (zoo meta, test prompts; a configuration whose h = 4 models' mean risk at "
             f"n = d is above {NOT_LEARNED:g} has *not learned*, and its claims about trained models are *not "
             "testable*). Beside them on the same task at n = d: "
             + ", ".join(f"{k} {v:.4f}" for k, v in base.items()) + ".", "",
             "| configuration | state | largest-head model's risk at n = d, per seed | steps |", "|---|---|---|---|"]
    for n in names:
        ms = states[n]["models"]
        lines.append(f"| {n} | {states[n]['word']} | " + " / ".join(f"{m['risk_at_d']:.3f}" for m in ms) + " | "
                     + " / ".join(m["steps_text"] for m in ms) + " |")
    lines += ["", "Each cell: the verdict over seeds, the claim's key statistic (and its threshold) for every seed, "
              "the mean over seeds with its 95% interval and the prediction interval for a new seed (ratios on the "
              "log scale, shares on the logit scale; docs/report.md), and how many seeds pass. The rows *where "
              "training moves it* judge the slope of the claim's key statistics against log(step) over the late "
              "training snapshots (E7) over seeds: toward the paper's pattern, away, or undecided (rule: "
              "docs/report.md).", "",
              "| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for claim in claims:
        cells = []
        for n in names:
            r = cell.get((claim, n))
            about_models = any(x["per_seed"] for x in rows if x["claim"] == claim)
            if r is None and done[n].get("not_learned") and about_models:
                cells.append(f"**{NOT_TESTABLE}** (not learned: not analysed)")
                continue
            cells.append("–" if r is None else _cell(r))
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    for key, title in (("1b", "1b. where training moves it (E7 trends)"), ("2a", "2a. where training moves it (E7 trends)")):
        lines.append(f"| {title} | " + " | ".join(
            f"**{NOT_TESTABLE}**" if not states[n]["learned"] else trend_cell(trends[n][key]) if n in trends
            else "– (no snapshots)" for n in names) + " |")
    lines += ["", "What it decides, one sentence per claim:", ""]
    lines += [f"* {factor_sentence(claim, claim_verdicts(claim, names, cell, done, rows))}" for claim in claims]
    lines += ["", "What the format contrast decides (A: paired tokens, E: interleaved tokens; both attention-only, "
              "L = 3):", ""]
    lines += format_sentences(trends, cell, claims, states)
    if trends:
        lines += ["", "## Where training moves each claim, statistic by statistic", ""] + trend_details(trends)
    lines += ["", "Per configuration: " + ", ".join(f"[{n}]({done[n]['report']})" for n in names if "report" in done[n])
              + "." + "".join(f" {n}: not analysed (not learned; `reproduce --not-learned` analyses it)."
                            for n in names if "report" not in done[n])]
    missing = [c.name for c in configs if not done[c.name]["seeds"] and not done[c.name].get("not_learned")]
    if missing:
        lines += ["", f"Not analysed (no complete seed in the zoo yet): {', '.join(missing)}."]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
