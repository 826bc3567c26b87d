"""Every path and file name of a ``reproduce`` run folder, in one place.

``reproduce`` writes, the report and the claim rules read; all three take the names from here::

    OUT/
      run.json  manifest.json  verdicts.json  report.md  report.html  summary.png  e7_emergence.png
      e5/            e5_risk.csv  e5_risk.png  (E5: estimators only, shared by every seed)
      train/         stage marker of the training stage (models live under each seed's e1/models/)
      [sigma{s}/]    one sub-tree per extra noise level (none for the preset's own sigma)
        seed{k}/     one folder per seed index k = 0 .. seeds-1 (seed = preset.seed + k)
          e1/ e2/ e3/ e4/ e6/ e7/     one per stage, each with a stage.json marker

The file names inside a stage folder are those its runner in ``experiments/`` writes; the ones read
across modules (or added to a stage, such as E2's attention figure) are named below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..config import Preset

# top level
RUN_FILE = "run.json"  # preset name + fingerprint: refuses a folder of another config
MANIFEST = "manifest.json"
VERDICTS = "verdicts.json"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
SUMMARY_PNG = "summary.png"
E7_SUMMARY_PNG = "e7_emergence.png"
STAGE_MARKER = "stage.json"  # in every stage folder: fingerprint of what the stage depends on

# stages
E5 = "e5"
TRAIN = "train"
REPORT = "report"
SEED_STAGES = ("e1", "e2", "e3", "e4", "e6", "e7")

# files inside stage folders that other modules read
E1_CSV, E1_PNG = "e1_heads.csv", "e1_heads.png"
E2_CONCENTRATION, E2_PNG = "concentration.csv", "head_importance.png"
E2_CLAIM1B, E2_EFFECTIVE_HEADS = "claim1b.csv", "effective_heads.csv"
E2_PATTERNS_PNG, E2_PATTERNS_CSV = "attention_patterns.png", "attention_patterns.csv"  # softmax models only
# every stage folder's summary (E1-E4, E6, E7): one name and one shape -- ``experiment``, the run's
# settings, and, where a stage measures several ablation kinds (E2-E4), everything that depends on the
# kind under ``by_ablation: {kind: ...}`` and nothing kind-dependent outside it
SUMMARY = "summary.json"
E1_SUMMARY = E2_SUMMARY = E7_SUMMARY = SUMMARY
E3_SUMMARY, E3_PNG, E3_CLAIM2A = SUMMARY, "pruning.png", "claim2a.csv"
E4_CSV, E4_SUMMARY, E4_PNG = "probes.csv", SUMMARY, "probes.png"
E5_CSV, E5_PNG = "e5_risk.csv", "e5_risk.png"
E6_SUMMARY, E6A_PNG, E6B_VERDICT, E6C_CSV = SUMMARY, "e6a_r2.png", "e6b_verdict.csv", "e6c_construct.csv"
E6B_PNG_GLOB = "e6b_agreement_*.png"
E7_CSV = "emergence.csv"
E7_CLAIMS_CSV = "emergence_claims.csv"  # claims 1b and 2a per late snapshot and ablation kind (trends)


def sigma_dir(preset: Preset, sigma: float) -> str:
    """Sub-folder of a noise level: ``""`` for the preset's own sigma, else ``sigma{value}/``."""
    return "" if sigma == preset.task.sigma else f"sigma{sigma:g}/"


def seed_dir(out: str | Path, k: int, sigma_prefix: str = "") -> Path:
    """The folder of seed index ``k`` (seed ``preset.seed + k``) under ``out``."""
    return Path(out) / f"{sigma_prefix}seed{k}"


def stage_dir(out: str | Path, stage: str, k: int | None = None, sigma_prefix: str = "") -> Path:
    """The folder of ``stage``: ``out/e5`` for E5, else ``out/[sigma{s}/]seed{k}/{stage}``."""
    if k is None:
        return Path(out) / stage
    return seed_dir(out, k, sigma_prefix) / stage


def stage_name(stage: str, k: int | None = None, sigma_prefix: str = "") -> str:
    """The stage's name in progress lines and stage lists: ``e5``, ``train``, ``seed0/e2``, ``sigma0.5/seed1/e3``."""
    return stage if k is None else f"{sigma_prefix}seed{k}/{stage}"


def stage_names(seeds: int, sigma_prefixes: Sequence[str] = ("",), train: bool = True) -> list[str]:
    """Every stage of a run, in the order ``reproduce`` runs them."""
    names = [E5]
    for sp in sigma_prefixes:
        if train:
            names.append(f"{sp}{TRAIN}")
        for k in range(seeds):
            names += [stage_name(s, k, sp) for s in SEED_STAGES]
    return names + [REPORT]
