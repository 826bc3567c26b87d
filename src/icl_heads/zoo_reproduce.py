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

from .config import ConfigError, ExecutorConfig
from .experiments.algorithms import run_e5
from .experiments.heads_sweep import seed_members
from .io import atomic_write_text, read_json, write_json
from .reproduce import E5_FIELDS, StageRunner, check_folder, reproduce, seed_preset, seed_stages
from .runs import layout
from .runs.layout import SEED_STAGES
from .training import train_members
from .training.executors import is_local, job_device, run_calls, with_folder
from .zoo import CONFIGS, ZOO_DIR, ZooConfig, available, complete_seeds, model_path


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
    import torch

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
                  executor: ExecutorConfig | None = None) -> Path:
    """Run the main job over the zoo's configurations into ``out``; returns ``out/report.md``.

    ``jobs > 1`` (zoo models only): the (configuration, seed) stages run in that many processes
    first (:func:`analyse_pairs`); the reports are the same. ``executor`` (``debug``, ``slurm``):
    with ``train``, every configuration's models train first as one batch of jobs (:func:`train_all`);
    on the zoo's models, the (configuration, seed) analyses are the jobs."""
    out = Path(out)
    configs = list(CONFIGS.values()) if configs is None else list(configs)
    mode = {"source": "trained" if train else "zoo", "configs": [c.name for c in configs]}
    mode_file = out / "zoo_run.json"
    if mode_file.exists() and read_json(mode_file).get("source") != mode["source"]:
        raise ConfigError(f"out: {out} holds a run with models {read_json(mode_file)['source']}; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(mode_file, mode)
    plan = [(c, leading_seeds(c, root)) for c in configs] if not train else []
    plan = [(c, n) for c, n in plan if n]
    if train and not is_local(executor):
        train_all(out, configs, device, executor)
    if (jobs > 1 or not is_local(executor)) and plan:
        analyse_pairs(out, plan, device, any_t, jobs, root, executor)
    done: dict[str, dict[str, Any]] = {}
    for c in configs:
        seeds = len(c.seeds) if train else leading_seeds(c, root)
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
    if not any(v["seeds"] for v in done.values()):
        raise ConfigError(f"zoo: {root} holds no complete seed of {', '.join(mode['configs'])}; "
                          "train them (icl-heads zoo train) or pass --train")
    return write_factor_report(out, configs, done)


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
                         "passes": stat.get("passes"),
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
           ("A", "D"): "doubling the depth (A -> D)"}


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def factor_sentence(claim: str, verdicts: dict[str, str]) -> str:
    """One sentence per claim: where it reproduced, and which single-factor change moves the verdict."""
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
    return f"**{claim}**: " + "; ".join(parts) + tail + "."


def write_factor_report(out: Path, configs: Sequence[ZooConfig], done: dict[str, dict[str, Any]]) -> Path:
    rows = factor_rows(out, configs, done)
    write_json(out / "factor_table.json", rows)
    names = [c.name for c in configs if done[c.name]["seeds"]]
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    cell = {(r["claim"], r["config"]): r for r in rows}
    lines = ["# icl-heads: the factor study on the zoo", "",
             "Configurations (quick task, h = 4 analysed, h = 1 as the single-head reference): "
             + "; ".join(f"**{c.name}** {c.title} ({done[c.name]['seeds']} seed{'s' if done[c.name]['seeds'] != 1 else ''})"
                        for c in configs) + ".", "",
             "Each cell: the verdict over seeds, the claim's key statistic (and its threshold) for every seed, "
             "the mean over seeds with its 95% interval and the prediction interval for a new seed (ratios on the "
             "log scale, shares on the logit scale; docs/report.md), and how many seeds pass.", "",
             "| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for claim in claims:
        cells = []
        for n in names:
            r = cell.get((claim, n))
            cells.append("–" if r is None else _cell(r))
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += ["", "What it decides, one sentence per claim:", ""]
    lines += [f"* {factor_sentence(claim, {n: cell[(claim, n)]['verdict'] for n in names if (claim, n) in cell})}"
              for claim in claims]
    lines += ["", "Per configuration: " + ", ".join(f"[{n}]({done[n]['report']})" for n in names) + "."]
    missing = [c.name for c in configs if not done[c.name]["seeds"]]
    if missing:
        lines += ["", f"Not analysed (no complete seed in the zoo yet): {', '.join(missing)}."]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
