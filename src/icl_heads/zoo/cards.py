"""``zoo/README.md``: one model card per configuration, every number read from the committed models.

A card gives the recipe (the preset overrides), steps, wall time and machine of each
model, the last-doubling convergence test, and the risk at n = d/2, d, 2d on the
test prompts beside ridge, lasso, PtO (T = L - 1 and tuned T) and Bayes on the
same prompts (seed 0's test prompts; the estimators are tuned per n on its
validation prompts, as in E5).
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_meta
from ..estimators import estimator_table
from ..io import atomic_write_text
from ..training import marker_ns
from .export import SUMS_FILE
from .registry import CONFIGS, ZooConfig, available, member_status, model_path

BASELINES = ("ridge", "lasso", "pto_depth", "pto", "bayes")


def baseline_risks(config: ZooConfig) -> dict[str, dict[int, float]]:
    """Normalised risk of the baselines at the marker n's on the configuration's seed-0 test prompts."""
    preset = config.preset(0)
    rows = estimator_table(preset, ["ridge", "lasso", "pto", "bayes"], depth_steps=preset.model.n_layers - 1)
    ns = marker_ns(preset.task)
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if int(r["n"]) in ns:
            out.setdefault(r["estimator"], {})[int(r["n"])] = float(r["risk_norm"])
    return out


def _gain(v: dict) -> str:
    return "" if v.get("improvement") is None else f" ({v['improvement']:+.1%})"


def _state(config: ZooConfig, seed: int, h: int, root: Path, z: dict) -> str:
    """converged, capped at T, or still training (accumulating configurations: cool-downs compared)."""
    state = member_status(config, seed, h, root)
    if state == "training":
        return f"training (next: {2 * z['stable_steps']})"
    if state == "converged":
        return "yes"
    return f"**no (capped at {z.get('stable_steps') or z.get('max_steps') or '?'})**" if z.get("schedule") == "wsd" \
        else "**no (cap)**"


def _model_rows(config: ZooConfig, root: Path, ns: list[int]) -> list[list[str]]:
    rows = []
    for seed, h in available(config.name, root):
        meta = load_meta(model_path(config.name, seed, h, root))
        z = meta["zoo"]
        conv = z["convergence"]
        risk = [f"{conv['at'][str(n)]['risk']:.4f}{_gain(conv['at'][str(n)])}" for n in ns]
        wall = f"{z['wall_s'] / 60:.1f} min" if z.get("wall_s") else "?"
        if z.get("cpu_s"):
            wall += f" ({z['cpu_s'] / 3600:.2f} CPU h)"
        steps = str(meta["step"]) if z.get("schedule") != "wsd" else f"{z['stable_steps']} + {z['cooldown_steps']}"
        rows.append([f"seed{seed}/h{h}", steps, wall, _state(config, seed, h, root, z), *risk])
    return rows


def card(config: ZooConfig, root: Path, baselines: dict[str, dict[int, float]] | None = None) -> str:
    preset = config.preset(0)
    t, m = preset.task, preset.model
    ns = marker_ns(t)
    lines = [f"## {config.name}: {config.title}", "",
             f"Task: quick (d={t.d}, s={t.s}, n_max={t.n_max}, sigma={t.sigma}). Model: D={m.d_model}, L={m.n_layers}, "
             f"{m.attention} attention, MLP {m.mlp}, {m.token_format} tokens, LayerNorm {m.layer_norm}.",
             f"Recipe (overrides of the quick preset): `{config.overrides}`; batch {preset.train.batch_size}, "
             + (f"AdamW, warm-up {preset.train.warmup_steps} steps then cosine to {preset.train.min_lr_frac} x lr."
                if not config.accumulates else
                f"AdamW, warm-up {preset.train.warmup_steps} steps then a constant lr (wsd); the stable run grows by "
                f"doublings from {preset.train.steps} steps up to {config.max_steps}, and at each a cool-down branch "
                f"(lr linearly to 0 over {config.cooldown_frac:.0%} of the steps so far) is exported. Steps read "
                "'stable + cool-down'; the percentage beside a risk compares this cool-down with the previous one "
                "(half the stable steps) on the same test prompts. Wall time is this model's path (the stable run to "
                "its branch, then the cool-down); CPU time is all this member's training so far, its earlier "
                "cool-downs and any stable steps past the branch included, so it can exceed the wall time."),
             f"Members: seeds {list(config.seeds)} x heads {list(config.heads)}"
             + (f", plus {list(config.extra)}" if config.extra else "") + "."
             + ("" if config.main_job else " The main job analyses it on request (`icl-heads reproduce --configs "
                f"{','.join(CONFIGS)}`)."), ""]
    machines = {load_meta(model_path(config.name, k, h, root))["zoo"]["machine"] for k, h in available(config.name, root)}
    if machines:
        lines += [f"Trained on: {', '.join(sorted(machines))} (one torch thread per model).", ""]
    head = ["model", "steps", "wall (CPU time)", "converged", *[f"r@{n} (gain over the last doubling)" for n in ns]]
    rows = _model_rows(config, root, ns)
    if not rows:
        return "\n".join(lines + ["No model of this configuration is in the zoo yet.", ""])
    if baselines:
        for b in BASELINES:
            if b in baselines:
                rows.append([f"*{b}*", "", "", "", *[f"{baselines[b].get(n, float('nan')):.4f}" for n in ns]])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""])


def write_cards(root: Path, with_baselines: bool = True) -> Path:
    """Write ``root/README.md`` from the models under ``root``."""
    parts = ["# The model zoo", "",
             "Reference models of the factor study (issues 14, 23): the quick task under the configurations below (A, B, C, E: "
             "the factor study -- A vs E is the token format alone; D: A's deeper variant, which the main job "
             "analyses on request), "
             "trained with the recipes below. Each model is `CONFIG/seed{k}/h{h}/` (safetensors + meta.json, no "
             "optimizer state); the h=4 models keep their log-spaced snapshots (E7), and so do the h=1 models "
             "trained since stop 25 (E7's fraction of the multi-head advantage lost, per step). "
             f"`{SUMS_FILE}` lists every file's SHA-256: `icl-heads zoo verify` checks them. "
             "A model is *converged* when its test-prompt risk at n = d and at n = 2d improved by less than 3% over "
             "the last doubling of steps (the percentage in brackets; 2000 test prompts) and its risk at n = d is at "
             "most 0.5 (a model still on the predict-zero plateau changes little between doublings without having "
             "learned anything, so it is never called converged). "
             "`icl-heads zoo train` trains what is missing; `icl-heads zoo cards` rewrites this file.", ""]
    seen: dict[str, dict[str, dict[int, float]]] = {}  # configurations on one task and depth share their baselines
    for config in CONFIGS.values():
        base = None
        if with_baselines and available(config.name, root):
            p = config.preset(0)
            key = p.task.model_dump_json() + f"/L={p.model.n_layers}/seed={p.seed}/n_test={p.eval.n_test}"
            base = seen[key] if key in seen else seen.setdefault(key, baseline_risks(config))
        parts.append(card(config, root, base))
    return atomic_write_text(Path(root) / "README.md", "\n".join(parts))
