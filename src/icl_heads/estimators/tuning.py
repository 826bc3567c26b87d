"""Per-n hyper-parameter tuning on validation prompts: the grids, the estimator families
(:data:`FAMILIES`), and the tuned test predictions / tidy risk rows used by E5 and E1."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError, Preset, TaskConfig
from ..metrics import curve_from_errors
from ..tasks import Prompts, fixed_prompts
from .bayes_posterior import bayes
from .closed_form import _pinv_predict, _ridge_block, oracle_ls
from .gradient_descent import filters, gd_spectrum, groups_spectrum, pto_spectrum
from .lasso_homotopy import _lasso_block
from .prefix import Spectrum, Tensor, _by_chunks

RIDGE_LAMBDAS = [float(10.0**e) for e in np.arange(-4, 3.01, 0.5)]
LASSO_ALPHAS = [float(10.0**e) for e in np.arange(-4, 0.51, 0.25)]
GD_ETAS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
SCALE_FREE_CS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 1.9]
PTO_FIXED_ETAS = [float(10.0**e) for e in np.arange(-3, 1.01, 0.25)]
GROUP_AS = [0.0, 0.03, 0.1, 0.3, 1.0]

Combo = dict[str, Any]


class Family:
    """An estimator with a hyper-parameter grid. ``predict(x, y, w, combos)`` -> (len(combos), B, N).

    ``guard`` (``"off"``, ``"reject"``, ``"clip"``; see :meth:`.prefix.Spectrum.step_size`) only acts
    on the GD-like families, the only ones with a step that can be unstable: tuning scores settings
    with ``"reject"`` and predicts test prompts with ``"clip"``; ``"off"`` is the raw estimator.
    """

    name: str = ""
    description: str = ""

    def __init__(self, task: TaskConfig, T_grid: Sequence[int]) -> None:
        self.task = task
        self.T_grid = [int(t) for t in T_grid]

    def grid(self) -> list[Combo]:
        return [{}]

    def predict(self, x: Tensor, y: Tensor, w: Tensor, combos: Sequence[Combo], guard: str = "off") -> Tensor:
        raise NotImplementedError

    def predict_columns(self, x: Tensor, y: Tensor, w: Tensor, per_col: Sequence[Combo],
                        guard: str = "off") -> Tensor:
        """Predictions (B, N) where column k uses hyper-parameters ``per_col[k]``."""
        keys = [json.dumps(c, sort_keys=True) for c in per_col]
        uniq = list(dict.fromkeys(keys))
        preds = self.predict(x, y, w, [json.loads(u) for u in uniq], guard=guard)
        idx = torch.tensor([uniq.index(k) for k in keys])
        return preds[idx, :, torch.arange(len(keys))].T


class _Zero(Family):
    name, description = "zero", "predicts 0"

    def predict(self, x, y, w, combos, guard="off"):
        return torch.zeros(len(combos), *y.shape, dtype=y.dtype)


class _OLS(Family):
    name, description = "ols", "minimum-norm least squares"

    def predict(self, x, y, w, combos, guard="off"):
        return _pinv_predict(x, y)[None].expand(len(combos), -1, -1)


class _Oracle(Family):
    name, description = "oracle_ls", "least squares on the true support (oracle)"

    def predict(self, x, y, w, combos, guard="off"):
        return oracle_ls(x, y, w)[None].expand(len(combos), -1, -1)


class _Bayes(Family):
    name, description = "bayes", "exact posterior mean (Bayes-optimal floor)"

    def predict(self, x, y, w, combos, guard="off"):
        t = self.task
        return bayes(x, y, t.s, t.sigma, t.tau)[None].expand(len(combos), -1, -1)


class _Ridge(Family):
    name, description = "ridge", "ridge, lambda tuned per n"

    def grid(self):
        return [{"lambda": l} for l in RIDGE_LAMBDAS]

    def predict(self, x, y, w, combos, guard="off"):
        return _by_chunks(lambda a, b: _ridge_block(a, b, [c["lambda"] for c in combos]), x, y)


class _Lasso(Family):
    name, description = "lasso", "lasso (sklearn scaling), alpha tuned per n"

    def grid(self):
        return [{"alpha": a} for a in LASSO_ALPHAS]

    def predict(self, x, y, w, combos, guard="off"):
        al = torch.tensor([c["alpha"] for c in combos], dtype=torch.float64)[:, None].expand(-1, y.shape[1])
        return _by_chunks(lambda a, b: _lasso_block(a, b, al, 1e-10, 20000), x, y)

    def predict_columns(self, x, y, w, per_col, guard="off"):
        al = torch.tensor([c["alpha"] for c in per_col], dtype=torch.float64)[None]
        return _by_chunks(lambda a, b: _lasso_block(a, b, al, 1e-10, 20000), x, y)[0]


class _GDLike(Family):
    """Shared grid logic: combos are (step rule, eta or c, T); one eigh serves the whole grid."""

    rules: dict[str, Sequence[float]] = {}

    def grid(self):
        out = []
        for rule, etas in self.rules.items():
            key = "c" if rule == "scale_free" else "eta"
            out += [{"step": rule, key: e, "T": t} for e in etas for t in self.T_grid]
        return out

    def spectrum(self, x: Tensor, y: Tensor, rule: str, cols: Sequence[int] | None) -> Spectrum:
        """The quadratic the step rule ``rule`` descends on, for one block of prompts."""
        raise NotImplementedError

    def problem(self, rule: str) -> Any:
        """Rules with the same key descend on the same quadratic (so share one eigendecomposition)."""
        return None

    def predict(self, x, y, w, combos, cols: Sequence[int] | None = None, guard: str = "off"):
        """(len(combos), B, K) predictions; ``cols`` restricts to those context lengths (K of them).

        One pass over prompt blocks serves every step rule; rules on the same quadratic share its
        spectrum (E6 asks for fixed and scale-free steps together).
        """
        K = y.shape[1] if cols is None else len(cols)
        out = torch.empty(len(combos), y.shape[0], K, dtype=y.dtype)
        plan = {}  # rule -> (combo indices, step sizes, step counts)
        for rule in dict.fromkeys(c["step"] for c in combos):
            sel = [i for i, c in enumerate(combos) if c["step"] == rule]
            plan[rule] = (sel, list(dict.fromkeys(combos[i].get("c", combos[i].get("eta")) for i in sel)),
                          list(dict.fromkeys(combos[i]["T"] for i in sel)))

        def block(a: Tensor, b: Tensor) -> Tensor:
            spectra: dict[Any, Spectrum] = {}
            parts = []
            for rule, (_, etas, steps) in plan.items():
                key = self.problem(rule)
                if key not in spectra:
                    spectra[key] = self.spectrum(a, b, rule, cols)
                parts.append(filters(spectra[key], rule, etas, steps, guard).flatten(0, 1))  # (E * S, B, K)
            return torch.cat(parts)

        p = _by_chunks(block, x, y, m=self.width(x.shape[2]))
        start = 0
        for rule, (sel, etas, steps) in plan.items():
            for i in sel:
                c = combos[i]
                out[i] = p[start + etas.index(c.get("c", c.get("eta"))) * len(steps) + steps.index(c["T"])]
            start += len(etas) * len(steps)
        return out

    def width(self, d: int) -> int:
        return d


class _GD(_GDLike):
    name, description = "gd", "GD from 0, best of fixed/scale-free step and T per n"
    rules = {"fixed": GD_ETAS, "scale_free": SCALE_FREE_CS}

    def spectrum(self, x, y, rule, cols):
        return gd_spectrum(x, y, cols)


class _PtO(_GDLike):
    name, description = "pto", "PtO, scale-free step, c and T tuned per n"
    rules = {"scale_free": SCALE_FREE_CS}
    gamma = 1.0

    def spectrum(self, x, y, rule, cols):
        return pto_spectrum(x, y, self.gamma, rule == "normalized", cols)

    def problem(self, rule):
        return rule == "normalized"


class _PtONormalized(_PtO):
    name, description = "pto_normalized", "PtO, r/max|r| preprocessing, fixed eta"
    rules = {"normalized": GD_ETAS}


class _PtOFixed(_PtO):
    name, description = "pto_fixed", "PtO, raw |r| preprocessing, fixed eta (linear-attention form)"
    rules = {"fixed": PTO_FIXED_ETAS}


class PtOGroups(_GDLike):
    """PtO with ``h`` groups (a, c, T tuned); not in the default table, used by E5's groups sweep."""

    rules = {"scale_free": SCALE_FREE_CS}

    def __init__(self, task: TaskConfig, T_grid: Sequence[int], h: int) -> None:
        super().__init__(task, T_grid)
        self.h = h
        self.name = f"pto_groups_h{h}"
        self.description = f"PtO with {h} groups"

    def grid(self):
        base = super().grid()
        return [dict(c, a=a) for a in GROUP_AS for c in base]

    def predict(self, x, y, w, combos, cols=None, guard="off"):
        K = y.shape[1] if cols is None else len(cols)
        out = torch.empty(len(combos), y.shape[0], K, dtype=y.dtype)
        for a in dict.fromkeys(c["a"] for c in combos):
            sel = [i for i, c in enumerate(combos) if c["a"] == a]
            self._a = a
            out[sel] = super().predict(x, y, w, [{k: v for k, v in combos[i].items() if k != "a"} for i in sel], cols, guard)
        return out

    def spectrum(self, x, y, rule, cols):
        return groups_spectrum(x, y, self.h, self._a, cols)

    def width(self, d):
        return d + self.h


FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (_Zero, _OLS, _Ridge, _Lasso, _GD, _PtO, _PtONormalized, _PtOFixed, _Oracle, _Bayes)
}
ESTIMATOR_NAMES = tuple(FAMILIES)


def resolve_names(names: Sequence[str] | None) -> list[str]:
    """Validate estimator names (default: all), keeping the canonical order."""
    if names is None:
        return list(ESTIMATOR_NAMES)
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in FAMILIES:
            raise ConfigError(f"estimator: unknown {n!r} (choose from {', '.join(ESTIMATOR_NAMES)})")
    if not names:
        raise ConfigError("estimator: empty list of estimators")
    return [n for n in ESTIMATOR_NAMES if n in names]


def make_family(name: str, preset: Preset) -> Family:
    resolve_names([name])
    return FAMILIES[name](preset.task, preset.eval.pto_steps)


def val_risk(family: Family, val: Prompts, combos: Sequence[Combo], cols: Sequence[int] | None = None,
             guard: str = "reject") -> Tensor:
    """Validation excess risk (len(combos), K); non-finite (diverged) entries become +inf.

    With ``guard="reject"`` a step setting that is unstable (``step * lambda_max >= 2``) on *any*
    validation prompt at a context length gets infinite risk there, so tuning never picks it.
    ``cols`` (GD-like families only) restricts the work to those context lengths.
    """
    if cols is None:
        pred, f = family.predict(val.x, val.y, val.w, combos, guard=guard), val.f
    else:
        pred, f = family.predict(val.x, val.y, val.w, combos, cols, guard=guard), val.f[:, list(cols)]
    risk = ((pred - f[None]) ** 2).mean(1)
    return torch.where(torch.isfinite(risk), risk, torch.full_like(risk, math.inf))


def choose(combos: Sequence[Combo], risk: Tensor, allowed: Sequence[bool] | None = None) -> list[Combo]:
    """Per column of ``risk`` (len(combos), K), the allowed combo with the lowest risk (first one on ties)."""
    if allowed is not None:
        mask = torch.as_tensor(list(allowed), dtype=torch.bool)
        risk = torch.where(mask[:, None], risk, torch.full_like(risk, math.inf))
    return [combos[int(i)] for i in risk.argmin(0)]


def tune_grid(family: Family, val: Prompts, combos: Sequence[Combo] | None = None) -> list[Combo]:
    """Per context length, the combo with the lowest validation risk (first one on ties)."""
    combos = family.grid() if combos is None else list(combos)
    return choose(combos, val_risk(family, val, combos))


@dataclass
class Tuned:
    """Test predictions (B, N) of one tuned estimator and the hyper-parameters chosen per column.

    ``clipped[k]``: test prompts where column k's tuned step was unstable and the guard capped it.
    """

    name: str
    pred: Tensor
    hparams: list[Combo]
    clipped: list[int] = field(default_factory=list)


def eval_prompts(preset: Preset) -> tuple[Prompts, Prompts]:
    """Validation and test prompts: ``fixed_prompts(task, n_val, seed, "val")`` and ``(…, n_test, seed, "test")``."""
    t, e = preset.task, preset.eval
    return fixed_prompts(t, e.n_val, preset.seed, "val"), fixed_prompts(t, e.n_test, preset.seed, "test")


def tuned_predictions(preset: Preset, names: Sequence[str] | None = None,
                      prompts: tuple[Prompts, Prompts] | None = None) -> dict[str, Tuned]:
    """Tune every named estimator per n on the validation prompts; predict the test prompts."""
    names = resolve_names(names)
    val, test = eval_prompts(preset) if prompts is None else prompts
    return {n: tune_and_predict(make_family(n, preset), val, test) for n in names}


def tune_and_predict(fam: Family, val: Prompts, test: Prompts, name: str | None = None) -> Tuned:
    """Tune ``fam`` per n on ``val`` (unstable steps rejected), predict ``test`` (unstable steps clipped)."""
    hp = tune_grid(fam, val) if len(fam.grid()) > 1 else [{}] * test.y.shape[1]
    pred = fam.predict_columns(test.x, test.y, test.w, hp, guard="clip")
    clipped = [0] * len(hp)
    if isinstance(fam, _GDLike):
        raw = fam.predict_columns(test.x, test.y, test.w, hp, guard="reject")
        clipped = [int(c) for c in torch.isnan(raw).sum(0)]
    return Tuned(name or fam.name, pred, hp, clipped)


DEPTH_MATCHED = ("gd", "pto")


def depth_matched_predictions(preset: Preset, T: int, prompts: tuple[Prompts, Prompts] | None = None
                              ) -> dict[str, Tuned]:
    """GD and PtO with exactly ``T`` steps (``gd_depth``, ``pto_depth``), the step tuned per n as usual.

    An L-layer transformer can run at most ``T = L - 1`` optimisation steps after its preprocessing
    layer, so these are the depth-matched baselines of E1 (``gd``/``pto`` tune T up to hundreds).
    """
    if T < 1:
        raise ConfigError(f"T: depth-matched baselines need at least one step (got {T}; n_layers must be >= 2)")
    val, test = eval_prompts(preset) if prompts is None else prompts
    return {f"{n}_depth": tune_and_predict(FAMILIES[n](preset.task, [T]), val, test, f"{n}_depth")
            for n in DEPTH_MATCHED}


def risk_rows(tuned: Tuned, f: Tensor, task: TaskConfig, n_min: int = 1, **labels: Any) -> list[dict[str, Any]]:
    """Tidy rows ``estimator, n, risk, risk_norm, ci_low, ci_high, hparams`` for n >= n_min."""
    err = ((tuned.pred - f) ** 2).numpy()
    rows = curve_from_errors(err, task).rows(estimator=tuned.name, **labels)
    for r in rows:
        r["hparams"] = json.dumps(tuned.hparams[r["n"]], sort_keys=True)
    return [r for r in rows if r["n"] >= n_min]


def estimator_table(preset: Preset, names: Sequence[str] | None = None,
                    depth_steps: int | None = None) -> list[dict[str, Any]]:
    """Rows of every tuned estimator on the preset's test prompts (the prompts E1 evaluates models on).

    ``depth_steps``: also the rows of :func:`depth_matched_predictions` with that many steps
    (then ``names=[]`` gives those rows only).
    """
    prompts = eval_prompts(preset)
    tuned = tuned_predictions(preset, names, prompts) if names is None or len(names) else {}
    if depth_steps is not None:
        tuned.update(depth_matched_predictions(preset, depth_steps, prompts))
    rows: list[dict[str, Any]] = []
    for t in tuned.values():
        rows += risk_rows(t, prompts[1].f, preset.task)
    return rows
