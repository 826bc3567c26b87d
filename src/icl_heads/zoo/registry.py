"""What the zoo holds and where: the configurations and their recipes (:data:`CONFIGS`), the zoo's folder
(:data:`ZOO_DIR`), each model's path, and the accumulating (wsd) recipes' milestones and cool-down presets.

A *configuration* is the ``quick`` task with one architecture and its training recipe: ``A`` paired tokens,
attention-only (the quick model); ``B`` paired tokens with MLP (GPT-2 blocks); ``C`` interleaved tokens with
MLP (Garg et al.'s format); ``D`` A at twice the depth; ``E`` interleaved tokens, attention-only, trained by
accumulation. Each model lives in ``<zoo>/<config>/seed{k}/h{h}/``.

Where the zoo is (:func:`default_zoo_dir`): ``$ICL_HEADS_ZOO`` when set; else the ``zoo/`` folder of the
source checkout the package runs from (``pip install -e .``, the README's setup); else ``./zoo`` in the
current folder (an installed wheel carries no models). Commands name the folder with ``--root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import META_FILE, load_meta
from ..config import ConfigError, ModelConfig, Preset, TaskConfig, TrainConfig, get_preset
from ..training import TrainSpec

NOT_LEARNED = 0.5  # risk at n = d above this (zero predictor: 1): on the predict-zero plateau, never "converged"
ZOO_ENV = "ICL_HEADS_ZOO"  # the zoo's folder, overriding the default (an installed package, a copy elsewhere)


def default_zoo_dir() -> Path:
    """``$ICL_HEADS_ZOO``; else the source checkout's ``zoo/`` (this file is ``src/icl_heads/zoo/registry.py``
    in it, beside ``pyproject.toml``); else ``./zoo``. Why: ``parents[3]`` of an installed wheel's module is
    ``lib/python3.X``, so the checkout's path alone would point into the interpreter's folder."""
    env = os.environ.get(ZOO_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "icl_heads").is_dir():
        return checkout / "zoo"
    return Path.cwd() / "zoo"


ZOO_DIR = default_zoo_dir()
STATE_DIR = ZOO_DIR.parent / "zoo_state"  # resumable stable runs and last cool-downs of accumulating configurations


def require_zoo(root: Path) -> Path:
    """``root`` if it is a folder, else one line naming it and how to point at the zoo (exit 2 in the CLI)."""
    if not Path(root).is_dir():
        raise ConfigError(f"root: no zoo folder at {root} (pass --root DIR or set {ZOO_ENV}=DIR; docs/training.md)")
    return Path(root)


@dataclass(frozen=True)
class ZooConfig:
    """One configuration of the factor study: preset overrides (architecture + recipe) and what to train."""

    name: str
    title: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    heads: tuple[int, ...]
    extra: tuple[tuple[int, int], ...] = ()  # (seed, h) trained besides seeds x heads (E1's h=2 curve)
    base: str = "quick"  # the preset the overrides apply to (tests use smoke)
    max_steps: int = 0  # > 0: the recipe accumulates (wsd): stable run doubled from train.steps up to this cap
    cooldown_frac: float = 0.2  # a cool-down branch at stable step T runs round(frac * T) steps
    main_job: bool = True  # analysed by default by the main job (False: on request, `reproduce --configs`)

    @property
    def accumulates(self) -> bool:
        return self.max_steps > 0

    def keeps_snapshots(self, h: int) -> bool:
        """The zoo keeps training snapshots for the claims' pair of head counts: the largest (E7's head
        pattern over training) and the smallest (the fraction of the multi-head advantage lost, per step)."""
        return h in (max(self.heads), min(self.heads))

    def preset(self, seed: int = 0) -> Preset:
        return get_preset(self.base, **{**self.overrides, "seed": seed})

    def members(self) -> list[tuple[int, int]]:
        """Every ``(seed, h)`` of the configuration, seed by seed (so seeds complete in order); within a
        seed the head counts the claims need first, largest (slowest) first, then the extras."""
        pairs = {(k, h) for k in self.seeds for h in self.heads} | set(self.extra)
        return sorted(pairs, key=lambda kh: (kh[0], kh[1] not in self.heads, -kh[1]))


_SNAP = {"train.snapshots": 8, "train.eval_every": 1000, "train.checkpoint_every": 1000}
# the accumulating recipe of A, E and C: warm-up, then a constant lr with cool-down branches at 16k, 32k, 64k, ...
# stable steps; the curriculum over n and the active coordinates ramps from n = 5, d = 3 (C: n = 2, d = 1) over
# the first 8k steps
_WSD = {"train.steps": 16000, "train.lr": 1e-3, "train.schedule": "wsd", "train.curriculum": True,
        "train.curriculum_d": True, "train.curriculum_ramp_steps": 8000}
CONFIGS: dict[str, ZooConfig] = {c.name: c for c in (
    # the quick model, trained by E's recipe (accumulating wsd at 1e-3, the n-and-d curriculum) so that the
    # format contrast A vs E differs in the token format alone (issue 23; stop 26's screen: E's recipe costs A
    # 1-7% at n = d against its former cosine recipe at 4e-3 after 16k steps, docs/training.md)
    ZooConfig("A", "paired tokens, attention-only, L = 3",
              {"model.mlp": False, **_WSD, **_SNAP},
              seeds=(0, 1, 2, 3, 4), heads=(1, 4), extra=((0, 2),), max_steps=256000),
    ZooConfig("B", "paired tokens, MLP (GPT-2 blocks), L = 3",
              {"model.mlp": True, "train.steps": 16000, "train.lr": 1e-3, **_SNAP},
              seeds=(0, 1, 2), heads=(1, 4)),
    # the format contrast with MLP (B vs C): E's accumulating recipe, but the curriculum starts from n = 2 and
    # one active coordinate (`curriculum_start_frac` 0.1) -- stop 28's screen: from E's start (n = 5, d = 3) C
    # stayed on the plateau (0.82 at n = d after 20k steps), from this start it left it by 12k (docs/training.md).
    # Analysed on request (`reproduce --configs A,B,C,E`): its pairs are the costliest of L = 3 (MLP blocks,
    # prompts twice as long), and five of them would take the main job past 15 minutes on two cores
    ZooConfig("C", "interleaved tokens, MLP (Garg et al.), L = 3",
              {"model.mlp": True, "model.token_format": "interleaved", **_WSD, "train.curriculum_start_frac": 0.1,
               **_SNAP},
              seeds=(0, 1, 2, 3, 4), heads=(1, 4), max_steps=256000, main_job=False),
    # the deeper variant (issue 14, 2.): is depth what keeps A above ridge at n >= d? Twice A's layers,
    # half its lr (the L = 6 trial: 0.143 at n = d after 8k steps, against A's 0.165), twice its steps.
    # Analysed on request (`reproduce --configs ...,D`): its pairs cost 2.2x A's (twice the layers, each ablated
    # under three kinds), a third of the main job's CPU for 3 of 16 pairs, which kept it over 15 minutes on two
    # cores (docs/performance.md, stop 26); the SPEC's quick preset names depth as the optional factor
    ZooConfig("D", "paired tokens, attention-only, L = 6",
              {"model.mlp": False, "model.n_layers": 6, "train.steps": 32000, "train.lr": 2e-3, **_SNAP},
              seeds=(0, 1, 2), heads=(1, 4), main_job=False),
    # the format contrast with A (issue 23): interleaved tokens, attention-only; the recipe accumulates (wsd,
    # cool-down branches at 16k, 32k, 64k, ... steps). Its curriculum over n and the active coordinates (from
    # n = 5, d = 3 over 8k steps) took the two seeds that a d-only curriculum left on the predict-zero plateau
    # for 32k steps off it by 6k (recipe screen, stop 25: docs/training.md)
    ZooConfig("E", "interleaved tokens, attention-only, L = 3",
              {"model.mlp": False, "model.token_format": "interleaved", **_WSD, **_SNAP},
              seeds=(0, 1, 2, 3, 4), heads=(1, 4), max_steps=256000),
)}


def main_job_configs() -> list[ZooConfig]:
    """The configurations the main job analyses by default (``reproduce --configs`` names others)."""
    return [c for c in CONFIGS.values() if c.main_job]


def get_config(name: str, field: str = "config") -> ZooConfig:
    if name not in CONFIGS:
        raise ConfigError(f"{field}: unknown zoo configuration {name!r} (choose from {', '.join(CONFIGS)})")
    return CONFIGS[name]


def model_path(config: str, seed: int, h: int, root: Path = ZOO_DIR) -> Path:
    return Path(root) / config / f"seed{seed}" / f"h{h}"


def available(config: str, root: Path = ZOO_DIR) -> list[tuple[int, int]]:
    """The ``(seed, h)`` of ``config`` present in the zoo."""
    base = Path(root) / config
    out = []
    for meta in sorted(base.glob(f"seed*/h*/{META_FILE}")):
        out.append((int(meta.parent.parent.name[4:]), int(meta.parent.name[1:])))
    return out


def complete_seeds(config: ZooConfig, root: Path = ZOO_DIR) -> list[int]:
    """Seeds of ``config`` whose every head count the claims need is in the zoo."""
    have = set(available(config.name, root))
    return [k for k in config.seeds if all((k, h) in have for h in config.heads)]



def listing(root: Path = ZOO_DIR) -> list[dict[str, Any]]:
    """One row per zoo model: configuration, seed, h, steps, converged, risk at n = d/2, d, 2d."""
    rows = []
    for name in CONFIGS:
        for seed, h in available(name, root):
            meta = load_meta(model_path(name, seed, h, root))
            conv = meta.get("zoo", {}).get("convergence", {})
            row = {"config": name, "seed": seed, "h": h, "steps": meta.get("step"), "converged": conv.get("converged")}
            row.update({f"r@{n}": v["risk"] for n, v in conv.get("at", {}).items()})
            rows.append(row)
    return rows


def spec_of(path: Path) -> Any:
    """The :class:`~icl_heads.training.TrainSpec` recorded in a zoo model's meta (to retrain it).

    Bit-identical retraining also needs the recorded torch thread count (``meta["zoo"]["threads"]``,
    1 for every zoo model): CPU matmuls split their sums differently with more threads."""
    meta = load_meta(path)
    return TrainSpec(TaskConfig.model_validate(meta["task"]), ModelConfig.model_validate(meta["model_config"]),
                     TrainConfig.model_validate(meta["train"]), int(meta["seed"]), meta.get("preset"))



# --------------------------------------------------------------------------- accumulating recipes (wsd)

def milestones(config: ZooConfig) -> list[int]:
    """Stable steps at which an accumulating configuration takes a cool-down: ``train.steps`` doubled
    up to ``max_steps``."""
    t, out = config.preset(0).train.steps, []
    while t <= config.max_steps:
        out.append(t)
        t *= 2
    return out


def cooldown_steps(config: ZooConfig, t: int) -> int:
    return max(1, round(config.cooldown_frac * t))


def stable_preset(config: ZooConfig, seed: int, t: int) -> Preset:
    return get_preset(config.base, **{**config.overrides, "seed": seed, "train.steps": t})


def cooldown_preset(config: ZooConfig, seed: int, t: int) -> Preset:
    """The cool-down branch at stable step ``t``: lr from its value to ~0 over ``cooldown_frac * t`` steps."""
    return get_preset(config.base, **{**config.overrides, "seed": seed, "train.steps": t + cooldown_steps(config, t),
                                      "train.cooldown_from": t, "train.snapshots": 0})


def state_path(config: str, seed: int, h: int, state_root: Path = STATE_DIR) -> Path:
    return Path(state_root) / config / f"seed{seed}" / f"h{h}"


def cooldown_dir(member: Path, t: int) -> Path:
    return member / f"cool{t:07d}"


def on_plateau(convergence: dict[str, Any], task: TaskConfig) -> bool:
    """Whether a convergence record's risk at n = d (``convergence["at"]``) is above :data:`NOT_LEARNED`."""
    return convergence.get("at", {}).get(str(min(task.d, task.n_max)), {}).get("risk", 0.0) > NOT_LEARNED


def member_status(config: ZooConfig, seed: int, h: int, root: Path = ZOO_DIR) -> str:
    """``missing``, ``training`` (exported, not converged, below the cap), ``converged`` or ``capped``; a model
    on the predict-zero plateau (risk at n = d above :data:`NOT_LEARNED`) is never ``converged``."""
    path = model_path(config.name, seed, h, root)
    if not (path / META_FILE).exists():
        return "missing"
    zoo = load_meta(path).get("zoo", {})
    conv = zoo.get("convergence", {})
    state = str(zoo.get("state") or ("converged" if conv.get("converged") else "capped"))  # fixed-length runs: no state
    if state == "converged" and on_plateau(conv, config.preset(seed).task):
        # exported before the plateau rule (convergence.compare_models): on the plateau, so not converged
        growing = zoo.get("schedule") == "wsd" and 2 * int(zoo.get("stable_steps", 0)) <= config.max_steps
        return "training" if growing else "capped"
    return state
