"""``reproduce``: E5, E1 (training), E2, E3, E4, E6 end to end, then the report.

Each stage writes into its own folder and, when it has finished, a
``stage.json`` marker (wall time, config fingerprint). A rerun on the same
folder skips finished stages and resumes an interrupted training from its
checkpoint, so killing ``reproduce`` loses no finished work. A folder that
holds a run of a *different* config is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .analysis.pruning import default_policy
from .config import ConfigError, ExecutorConfig, Preset
from .experiments.algorithms import run_e5
from .experiments.e2_importance import run_e2
from .experiments.e3_pruning import run_e3
from .experiments.e4_probes import run_e4
from .experiments.e6_mechanism import run_e6
from .experiments.e7_emergence import run_e7
from .experiments.heads_sweep import E1_ESTIMATORS, model_dir, run_e1, train_seeds
from .io import environment, read_json, write_json
from .report import write_report
from .runs import layout
from .runs.layout import SEED_STAGES, sigma_dir, stage_names  # noqa: F401  (the names reproduce has always had)

# Share of the wall time per stage, measured on quick with 3 seeds (2 CPU cores); only used for the ETA.
_WEIGHTS = {"e5": 0.017, "train": 0.66, "e1": 0.002, "e2": 0.016, "e3": 0.022, "e4": 0.012, "e6": 0.037,
            "e7": 0.021, "report": 0.001}


def fingerprint(preset: Preset, fields: Sequence[str] | None = None) -> str:
    """Hash of the preset, or of only the ``fields`` a stage depends on (so E5 survives a train.steps change)."""
    dump = preset.model_dump()
    if fields is not None:
        dump = {k: dump[k] for k in fields}
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


E5_FIELDS = ("task", "sigmas", "eval", "seed")  # what E5 (estimators only) depends on


@dataclass
class StageRunner:
    """Runs named stages once, with progress, ETA and a manifest of wall times."""

    out: Path
    preset: Preset
    stages: list[str]
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
    wall: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def run(self, name: str, folder: Path, fn: Callable[[Path], Any], fields: Sequence[str] | None = None) -> bool:
        """Run ``fn(folder)`` unless ``folder/stage.json`` says it finished; return True if it ran.

        ``fields``: the preset fields the stage depends on (default all) for its fingerprint.
        """
        k = self.stages.index(name) + 1
        marker = folder / layout.STAGE_MARKER
        fp = fingerprint(self.preset, fields)
        if marker.exists() and read_json(marker).get("fingerprint") == fp:
            self.wall[name] = read_json(marker)["wall_s"]
            self.log(f"[{k}/{len(self.stages)}] {name}: done earlier ({self.wall[name]:.0f}s), reused")
            return False
        self.log(f"[{k}/{len(self.stages)}] {name}: running   elapsed {_hms(self.elapsed)}   ETA {self._eta(name)}")
        t = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        fn(folder)
        self.wall[name] = time.perf_counter() - t
        write_json(marker, {"stage": name, "wall_s": self.wall[name], "fingerprint": fp})
        self.log(f"[{k}/{len(self.stages)}] {name}: finished in {_hms(self.wall[name])}")
        return True

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _eta(self, name: str) -> str:
        """Time left from ``name`` on, and where the estimate comes from.

        A stage kind already run (``e2`` of seed 0 for seed 1's ``e2``) costs what it cost in this
        run on this machine; a kind not yet run is scaled from the measured ones by the stage shares
        measured on quick (``_WEIGHTS``). Shares alone were 6x off on smoke (7m39s said, 1m15s taken).
        """
        base = lambda s: s.split("/")[-1]  # noqa: E731
        ran = [s for s in self.stages[: self.stages.index(name)] if s in self.wall and self.wall[s] > 0]
        measured = {base(s): self.wall[s] for s in ran}  # the latest cost of each stage kind
        done_w, spent = sum(_WEIGHTS[base(s)] for s in ran), sum(self.wall[s] for s in ran)
        left = self.stages[self.stages.index(name):]
        if any(base(s) not in measured for s in left) and not (done_w > 0 and spent > 1):
            return "? (no stage measured yet)"
        total = sum(measured.get(base(s), _WEIGHTS[base(s)] * spent / max(done_w, 1e-12)) for s in left)
        n_meas = sum(base(s) in measured for s in left)
        return (f"{_hms(total)} ({n_meas} of {len(left)} stages left measured in this run on {machine()}; "
                "the rest scaled by quick's stage shares)")


def machine() -> str:
    """This machine in a few words, for the ETA: host, CPU cores and torch threads."""
    return f"{platform.node() or 'this host'}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


def seed_heads(preset: Preset, k: int) -> list[int]:
    """Head counts trained for seed index ``k``: all for the first seed, else the two the claims need.

    Every claim about trained models compares the largest-head model with the single-head one
    (1a, 2b) or analyses the largest-head model (1b, 2a, 2c, E7); the middle head counts only
    fill E1's curve, so they are trained for the first seed alone (saves 1/3 of quick's training).
    """
    return list(preset.heads) if k == 0 else sorted({min(preset.heads), max(preset.heads)})


ABLATIONS = ("zero", "mean", "resample")  # E2 and E3 measure heads all three ways (docs/analysis.md)


def check_folder(out: Path, preset: Preset, seeds: int, sigmas: Sequence[float]) -> None:
    """Refuse a folder that holds another config's run; record ours otherwise."""
    run_file = out / layout.RUN_FILE
    fp = fingerprint(preset)
    if run_file.exists():
        old = read_json(run_file)
        if old.get("fingerprint") != fp:
            raise ConfigError(f"out: {out} holds a run of another config ({old.get('preset')}); use a new --out")
    write_json(run_file, {"preset": preset.name, "fingerprint": fp, "seeds": seeds, "sigmas": list(sigmas)})


def reproduce(preset: Preset, out: Path, seeds: int | None = None, device: str = "cpu",
              sigmas: Sequence[float] | None = None, stacked: bool | None = None, any_t: bool = True,
              models: Callable[[int, int], Path] | None = None, executor: ExecutorConfig | None = None) -> Path:
    """Run every experiment for ``preset`` into ``out`` and write ``report.md``/``report.html``.

    ``seeds`` training seeds (default ``preset.seeds``); ``sigmas``: noise levels for the
    trained-model stages (default the preset's own; each other level trains its own models
    under ``sigma{value}/``); ``stacked``: train each noise level's models as one stacked model
    (default: on CUDA only, where it is faster; ``docs/training.md``); ``any_t=False`` skips E6's
    final-output-vs-any-T context (no verdict reads it; minutes on the paper preset's CPU side).
    ``models(k, h)``: the finished checkpoint of seed index ``k`` with ``h`` heads (the zoo's) to
    analyse instead of training (then there is no training stage and one noise level).
    ``executor``: where the models train (``icl_heads.training.executors``; ``slurm``: one job per model,
    or per stack, job folder ``out/[sigma{s}/]train/jobs``); the analysis runs here.
    """
    seeds = preset.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"seeds: must be >= 1 (got {seeds})")
    sigmas = [preset.task.sigma] if not sigmas else list(dict.fromkeys(float(x) for x in sigmas))
    if any(x < 0 for x in sigmas):
        raise ConfigError(f"sigmas: noise levels must be >= 0 (got {sigmas})")
    sigmas.sort(key=lambda x: x != preset.task.sigma)  # the preset's own level first
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_folder(out, preset, seeds, sigmas)
    if models is not None and len(sigmas) > 1:
        raise ConfigError("sigmas: the zoo's models are trained at the preset's sigma only; pass --train")
    runner = StageRunner(out, preset, stage_names(seeds, [sigma_dir(preset, x) for x in sigmas],
                                                  train=models is None))
    runner.run(layout.E5, layout.stage_dir(out, layout.E5), lambda d: run_e5(preset, d), fields=E5_FIELDS)
    for sigma in sigmas:
        sp = sigma_dir(preset, sigma)
        ps = preset if not sp else preset.model_copy(update={"task": preset.task.model_copy(update={"sigma": sigma})})
        per_seed = [seed_preset(ps, k) for k in range(seeds)]
        dirs = [layout.stage_dir(out, "e1", k, sp) for k in range(seeds)]
        if models is None:
            runner.run(f"{sp}{layout.TRAIN}", out / f"{sp}{layout.TRAIN}",
                       lambda d: train_seeds(per_seed, dirs, device, stacked, d / "stacks", executor))
        for k, pk in enumerate(per_seed):
            # E5 ran on the first seed's prompts at the preset's own sigma: E1 reuses its estimator rows there
            e5_csv = layout.stage_dir(out, layout.E5) / layout.E5_CSV if k == 0 and not sp else None
            given = None if models is None else {h: models(k, h) for h in pk.heads}
            seed_stages(runner, layout.seed_dir(out, k, sp), f"{sp}seed{k}", pk, device, first=k == 0, any_t=any_t,
                        e5_csv=e5_csv, given=given)
    runner.log(f"[{len(runner.stages)}/{len(runner.stages)}] report   elapsed {_hms(runner.elapsed)}")
    t = time.perf_counter()
    manifest = {"preset": preset.model_dump(), "seeds": [preset.seed + k for k in range(seeds)], "sigmas": sigmas,
                "heads_per_seed": {str(preset.seed + k): seed_heads(preset, k) for k in range(seeds)},
                "device": device, "stage_wall_s": runner.wall, "environment": environment(),
                "models": "trained in this run" if models is None else
                {f"seed{k}/h{h}": str(models(k, h)) for k in range(seeds) for h in seed_heads(preset, k)}}
    write_json(out / layout.MANIFEST, manifest)
    report = write_report(out, preset, seeds, sigmas)
    manifest["stage_wall_s"]["report"] = time.perf_counter() - t
    manifest["total_wall_s"] = runner.elapsed
    write_json(out / layout.MANIFEST, manifest)
    runner.log(f"done in {_hms(runner.elapsed)}: {report}")
    return report


def seed_preset(preset: Preset, k: int) -> Preset:
    """The preset of seed index ``k``: its seed and the head counts it trains (:func:`seed_heads`)."""
    return preset.model_copy(update={"seed": preset.seed + k, "heads": seed_heads(preset, k)})


def seed_stages(runner: StageRunner, sd: Path, prefix: str, pk: Preset, device: str, first: bool, any_t: bool,
                e5_csv: Path | None = None, given: dict[int, Path] | None = None) -> None:
    """E1-E4, E6 and E7 of one seed into ``sd`` (stages named ``{prefix}/e1`` ...), on the models
    ``given`` (``h -> checkpoint``) or the ones E1 trained. ``first``: the first seed also runs E6c and
    E6's any-T context (model-independent or verdict-free); ``e5_csv``: E1 reuses E5's estimator rows."""
    runner.run(f"{prefix}/e1", sd / "e1",
               lambda d: run_e1(pk, d, device, estimators=E1_ESTIMATORS if first else None, e5_csv=e5_csv,
                                models=given))
    where = (lambda h: given[h]) if given else (lambda h: model_dir(sd / "e1", h))
    multi, single = where(max(pk.heads)), where(min(pk.heads))
    common = dict(preset=pk, seed=pk.seed, device=device)
    runner.run(f"{prefix}/e2", sd / "e2", lambda d: run_e2(multi, d, ablations=ABLATIONS, **common))
    runner.run(f"{prefix}/e3", sd / "e3", lambda d: run_e3(multi, d, ablations=ABLATIONS, single_ckpt=single, **common))
    runner.run(f"{prefix}/e4", sd / "e4", lambda d: run_e4(multi, d, prune=default_policy(pk.model.n_layers),
                                                           compare=[single], ranking_from=sd / "e3", **common))
    runner.run(f"{prefix}/e6", sd / "e6", lambda d: run_e6(multi, d, single_ckpt=single, with_construct=first,
                                                           with_any_t=first and any_t, **common))
    runner.run(f"{prefix}/e7", sd / "e7", lambda d: run_e7(multi, d, single_ckpt=single, **common))


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
