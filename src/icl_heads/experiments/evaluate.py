"""``icl-heads eval``: risk vs n of one checkpoint on its run's test prompts (CSV, figure, provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, load_model
from ..claims.keys import ModelKey
from ..config import PRESET_NAMES, ConfigError, TaskConfig, get_preset
from ..evaluation import evaluate
from ..io import write_csv, write_provenance
from ..plotting import risk_vs_n
from ..tasks import fixed_prompts


def evaluate_checkpoint(ckpt: str | Path, out: str | Path, device: str = "cpu",
                        n_test: int | None = None) -> list[dict[str, Any]]:
    """``icl-heads eval``: risk vs n with 95% bands on the run's test prompts; CSV, PNG and config JSON.

    The test prompts are ``fixed_prompts(task, n_test, seed, "test")`` with the task
    and seed stored in the checkpoint, i.e. the prompts E1 and E5 use.
    """
    model, meta = load_model(ckpt, device)
    if "task" not in meta:
        raise CheckpointError(f"{Path(ckpt) / 'meta.json'}: no task config (not made by icl-heads train)")
    task, seed = TaskConfig.model_validate(meta["task"]), int(meta.get("seed", 0))
    if n_test is None:
        n_test = get_preset(meta["preset"]).eval.n_test if meta.get("preset") in PRESET_NAMES else 2000
    if n_test < 2:
        raise ConfigError(f"prompts: need at least 2 test prompts for a confidence band (got {n_test})")
    out = Path(out)
    label = ModelKey(model.cfg.n_heads).e1_label
    rows = [r for r in evaluate(model, fixed_prompts(task, n_test, seed, "test"), task).rows(label=label)]
    write_csv(out / "risk.csv", rows)
    risk_vs_n({label: rows}, out / "risk.png", f"{label}, step {meta.get('step')} (d={task.d}, s={task.s})")
    write_provenance(out, {"task": task, "model": model.cfg}, seed, experiment="eval", checkpoint=str(ckpt),
                     step=meta.get("step"), n_test=n_test)
    return rows

