"""Head importance (E2): which attention heads a trained model needs, as pure functions on a loaded model.

* :func:`assess_heads` gates every head off in turn ("ablate") and, separately, keeps only
  one head of a layer ("keep"), and records the per-prompt squared error at every context
  length. Importance of head ``(l, k)`` = excess risk with the head ablated minus the base risk.
  A gated-off head outputs zero (``ablation="zero"``, the paper's masking), its mean over
  reference prompts (``"mean"``) or a paired reference prompt's output (``"resample"``); see
  :mod:`.ablation`. :func:`assess_heads_kinds` runs several kinds sharing the base pass.
  All ``2 L h`` gate settings run as batched forward passes with per-prompt gates ``(B, L, h)``
  (prompts x ablations in one batch, chunked), all through the model's hook points. Settings that
  only touch layer ``l`` share the residual stream entering layer ``l`` (``hook_resid_pre``, cached
  once): gates of layer ``l`` cannot change earlier layers, so starting there (``start_at_layer``)
  is exact, and it saves the work of layers ``< l``; layer ``l``'s attention runs once and a hook at
  its ``hook_z`` fans the head outputs out to the settings.
* :meth:`HeadImportance.concentration` is the per-layer concentration score: the share of the
  top head in the layer's total (positive) importance, ``1/h`` when all heads matter equally
  and 1 when one head carries everything, with a paired bootstrap CI over prompts.
* Claim 1b is judged from :meth:`HeadImportance.claim1b_stats` (effective heads, keep-top ratio) by
  :mod:`icl_heads.claims.rules`; the top-head shares stay as a secondary view.

No file is read or written here: :mod:`icl_heads.experiments.e2_importance` is the runner (CLI,
``reproduce``) that loads a checkpoint and writes the run folder. Pruning is :mod:`.pruning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
import torch

from ..config import ConfigError, TaskConfig
from ..evaluation import predict
from ..metrics import boot_counts, curve_from_errors, squared_errors
from ..model import HookPoint, Transformer, act_name, gate_heads, head_hooks
from ..model.hooks import Hooks, at_rows, rowwise
from ..tasks import Prompts
from .ablation import Ablation, make_ablation

ABLATE, KEEP = "ablate", "keep"
Keep = Union[bool, Literal["top"]]  # which keep-only settings to run: all, none, or each layer's top head


@dataclass
class HeadImportance:
    """Per-prompt squared errors of the base model and of every single-head gate change.

    ``base_err`` is ``(P, N)``; ``ablate_err[l, k]`` (head ``k`` of layer ``l`` gated off) and
    ``keep_err[l, k]`` (only head ``k`` kept in layer ``l``) are ``(L, h, P, N)``. Indices are
    0-based here; CSVs and figures use 1-based layers and heads, as the paper does.
    Scores average over context lengths ``n >= n_min`` (n = 0 has no context to use).
    ``ablation`` names what a gated-off head outputs (zero, mean or resample).
    """

    base_err: np.ndarray
    ablate_err: np.ndarray
    keep_err: np.ndarray
    base_gates: np.ndarray
    norm: float
    n_min: int = 1
    ablation: str = "zero"

    @property
    def shape(self) -> tuple[int, int]:
        return self.ablate_err.shape[0], self.ablate_err.shape[1]

    @property
    def n_prompts(self) -> int:
        return self.base_err.shape[0]

    def delta(self, kind: str = ABLATE) -> np.ndarray:
        """Per-prompt excess-risk change ``(L, h, P, N)`` (not normalised)."""
        return self._err(kind) - self.base_err

    def per_prompt_score(self, kind: str = ABLATE) -> np.ndarray:
        """``(L, h, P)``: normalised risk change averaged over ``n >= n_min``, per prompt."""
        return self.delta(kind)[..., self.n_min:].mean(-1) / self.norm

    def score(self, kind: str = ABLATE) -> np.ndarray:
        """``(L, h)`` importance: mean normalised excess-risk increase over prompts and n."""
        return self.per_prompt_score(kind).mean(-1)

    def ranking(self, layer: int) -> list[int]:
        """Heads of 0-based ``layer``, most important first (ties: lower index first)."""
        s = self.score(ABLATE)[layer]
        return sorted(range(s.size), key=lambda k: (-s[k], k))

    def concentration(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict[str, Any]]:
        """Per layer: top head, its share of the layer's positive importance, bootstrap CI, stability.

        The bootstrap resamples prompts (the same resample for every head and layer, since the
        share couples heads) and recomputes the share; ``top_head_stability`` is the fraction of
        resamples whose top head is the full-sample top head; ``share_minus_layer1`` (with its
        paired CI) compares the layer's concentration with layer 1's.
        """
        L, h = self.shape
        data = self.per_prompt_score(ABLATE).reshape(L * h, -1)
        counts = boot_counts(self.n_prompts, n_boot, seed)
        boot = (data @ counts.T / self.n_prompts).reshape(L, h, n_boot)  # (L, h, B)
        point = self.score(ABLATE)
        share, boot_share = top_share(point), top_share(np.moveaxis(boot, -1, 0))  # (L,), (B, L)
        a = (1 - level) / 2
        rows = []
        for l in range(L):
            top = self.ranking(l)[0]
            bs = boot_share[:, l]
            lo, hi = (np.nanquantile(bs, [a, 1 - a]) if np.isfinite(bs).any() else (np.nan, np.nan))
            gap = bs - boot_share[:, 0]  # paired: same resample for both layers
            glo, ghi = (np.nanquantile(gap, [a, 1 - a]) if np.isfinite(gap).any() else (np.nan, np.nan))
            rows.append(dict(ablation=self.ablation, layer=l + 1, n_heads=h, top_head=top + 1, top_importance=float(point[l, top]),
                             total_importance=float(np.clip(point[l], 0, None).sum()),
                             top_share=float(share[l]), ci_low=float(lo), ci_high=float(hi),
                             top_head_stability=float((boot[l].argmax(0) == top).mean()),
                             uniform_share=1 / h, share_minus_layer1=float(share[l] - share[0]),
                             share_minus_layer1_ci_low=float(glo), share_minus_layer1_ci_high=float(ghi)))
        return rows

    def claim1b_stats(self, n_from: int, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Claim 1b's statistics over context lengths ``n >= n_from``, with paired bootstrap CIs over prompts.

        Per layer (first list): the effective number of heads ``N_eff = 1 / sum_k p_k^2`` of the
        importance shares ``p_k`` (1 = one head, h = all equal) and the *keep-top ratio*: the risk
        with only the layer's top head kept, divided by the model's risk (1 = the top head alone is
        sufficient). Per model (second list): the within-model contrasts the rule thresholds,
        ``N_eff(1) - max_{l>1} N_eff(l)``, ``keep_top(1) / max_{l>1} keep_top(l)`` and
        ``max_{l>1} keep_top(l)``. One prompt resample serves every layer and statistic (paired).
        The top head is ranked by importance over the same n.
        """
        L, h = self.shape
        P = self.n_prompts
        base, abl = _pooled(self.base_err, n_from), _pooled(self.ablate_err, n_from)  # (P,), (L, h, P)
        keep = _pooled(self.keep_err, n_from)
        counts = boot_counts(P, n_boot, seed)
        stats = {}
        for name, w in (("point", np.ones((1, P))), ("boot", counts)):
            stats[name] = (w @ base / P, abl @ w.T / P, keep @ w.T / P)  # (B,), (L, h, B), (L, h, B)
        top = self.top_heads(n_from)
        out = {}
        for name, (b, a, k) in stats.items():
            neff = effective_heads(np.moveaxis(a - b, -1, 0))  # (B, L)
            ratio = k[np.arange(L), top] / b  # (L, B)
            out[name] = (neff, ratio.T)  # (B, L) each
        a_lo, a_hi = (1 - level) / 2, (1 + level) / 2
        ci = lambda v: [float(x) for x in np.nanquantile(v, [a_lo, a_hi])] if np.isfinite(v).any() else [np.nan] * 2  # noqa: E731
        layers = []
        for l in range(L):
            layers.append(dict(ablation=self.ablation, layer=l + 1, n_heads=h, n_from=n_from, top_head=int(top[l]) + 1,
                               n_eff=float(out["point"][0][0, l]), **_ci_cols("n_eff", ci(out["boot"][0][:, l])),
                               keep_top_ratio=float(out["point"][1][0, l]),
                               **_ci_cols("keep_top_ratio", ci(out["boot"][1][:, l]))))
        model = []
        if L > 1:
            for name in ("point", "boot"):
                neff, ratio = out[name]
                out[name] = dict(neff_contrast=neff[:, 0] - neff[:, 1:].max(1),
                                 keep_top_contrast=ratio[:, 0] / ratio[:, 1:].max(1),
                                 later_keep_top=ratio[:, 1:].max(1))
            for stat in out["point"]:
                lo, hi = ci(out["boot"][stat])
                model.append(dict(ablation=self.ablation, statistic=stat, value=float(out["point"][stat][0]),
                                  ci_low=lo, ci_high=hi, n_from=n_from, n_heads=h, n_layers=L))
        return layers, model

    def top_heads(self, n_from: int) -> np.ndarray:
        """``(L,)`` each layer's top head by ablation importance pooled over ``n >= n_from`` (ties: lower
        index): the head whose keep-only risk claim 1b's keep-top ratio reads, and the only keep-only
        setting :func:`assess_heads_kinds` runs with ``keep="top"``."""
        P = self.n_prompts
        w = np.ones((1, P))
        b0 = w @ _pooled(self.base_err, n_from) / P  # (1,): the same products claim1b_stats' point estimate takes
        a0 = _pooled(self.ablate_err, n_from) @ w.T / P  # (L, h, 1)
        return np.argmax(a0[..., 0] - b0[0], axis=1)

    def effective_heads_by_n(self) -> list[dict[str, Any]]:
        """Per (layer, n): N_eff of the importance shares at that n and the keep-top ratio (top head by the
        importance at that n), point estimates; the per-n view beside :meth:`claim1b_stats`' pooled one."""
        L, h = self.shape
        base, abl, keep = self.base_err.mean(0), self.ablate_err.mean(-2), self.keep_err.mean(-2)  # (N,), (L, h, N)
        imp = np.moveaxis(abl - base, -1, 0)  # (N, L, h)
        neff = effective_heads(imp)  # (N, L)
        top = imp.argmax(-1)  # (N, L)
        rows = []
        for n in range(self.n_min, base.size):
            for l in range(L):
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = keep[l, top[n, l], n] / base[n]
                rows.append(dict(ablation=self.ablation, layer=l + 1, n=n, n_heads=h, n_eff=float(neff[n, l]),
                                 top_head=int(top[n, l]) + 1, keep_top_ratio=float(ratio)))
        return rows

    def rows_by_n(self, task: TaskConfig) -> list[dict[str, Any]]:
        """Tidy rows per (layer, head, n): base, ablated and keep-only risk, deltas with 95% CIs."""
        L, h = self.shape
        base = curve_from_errors(self.base_err, task)
        rows = []
        for l in range(L):
            for k in range(h):
                ab = curve_from_errors(self.ablate_err[l, k], task)
                kp = curve_from_errors(self.keep_err[l, k], task)
                dab = curve_from_errors(self.delta(ABLATE)[l, k], task)
                dkp = curve_from_errors(self.delta(KEEP)[l, k], task)
                for i, n in enumerate(base.n):
                    rows.append(dict(
                        ablation=self.ablation, layer=l + 1, head=k + 1, n=int(n), base_risk=base.risk[i], ablate_risk=ab.risk[i],
                        delta_risk=dab.risk[i], delta_risk_norm=dab.risk[i] / dab.norm,
                        delta_ci_low=dab.ci_low[i] / dab.norm, delta_ci_high=dab.ci_high[i] / dab.norm,
                        keep_risk=kp.risk[i], keep_delta_risk_norm=dkp.risk[i] / dkp.norm,
                        keep_delta_ci_low=dkp.ci_low[i] / dkp.norm, keep_delta_ci_high=dkp.ci_high[i] / dkp.norm))
        return rows

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows per (layer, head), averaged over n >= n_min, with rank and per-layer share."""
        L, h = self.shape
        rows = []
        for kind_name, kind in (("", ABLATE), ("keep_", KEEP)):
            pp = self.per_prompt_score(kind)
            mean, half = pp.mean(-1), 1.959963984540054 * pp.std(-1, ddof=1) / np.sqrt(self.n_prompts)
            for l in range(L):
                for k in range(h):
                    if not kind_name:
                        rows.append(dict(ablation=self.ablation, layer=l + 1, head=k + 1))
                    r = rows[l * h + k]
                    r[f"{kind_name}importance"] = float(mean[l, k])
                    r[f"{kind_name}ci_low"] = float(mean[l, k] - half[l, k])
                    r[f"{kind_name}ci_high"] = float(mean[l, k] + half[l, k])
        share = per_layer_share(self.score(ABLATE))
        for l in range(L):
            order = self.ranking(l)
            for k in range(h):
                rows[l * h + k].update(rank_in_layer=order.index(k) + 1, share_in_layer=float(share[l, k]),
                                       n_min=self.n_min)
        return rows

    def _err(self, kind: str) -> np.ndarray:
        if kind == ABLATE:
            return self.ablate_err
        if kind == KEEP:
            return self.keep_err
        raise ValueError(f"kind must be {ABLATE!r} or {KEEP!r} (got {kind!r})")


def per_layer_share(score: np.ndarray) -> np.ndarray:
    """Importance normalised per layer: positive part divided by the layer's positive total."""
    pos = np.clip(score, 0, None)
    tot = pos.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, pos / tot, np.nan)


def _ci_cols(name: str, ci: list[float]) -> dict[str, float]:
    return {f"{name}_ci_low": ci[0], f"{name}_ci_high": ci[1]}


def effective_heads(score: np.ndarray) -> np.ndarray:
    """Effective number of heads ``1 / sum_k p_k^2`` of each layer's importance shares (last axis = heads).

    1 when one head carries all the (positive) importance, h when all heads carry the same; NaN
    when no head has positive importance. It counts heads, unlike the top-head share, which
    lets (0.55, 0.15, 0.15, 0.15) pass as "one head" although N_eff = 2.7 of 4.
    """
    p = per_layer_share(score)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 / (p ** 2).sum(-1)


def _pooled(err: np.ndarray, n_from: int) -> np.ndarray:
    """Per-prompt mean over context lengths ``n >= n_from`` (last axis)."""
    return err[..., n_from:].mean(-1)


def top_share(score: np.ndarray) -> np.ndarray:
    """Share of the top head in each layer's positive importance (last axis = heads; NaN if none)."""
    return per_layer_share(score).max(-1)


def gate_settings(base: torch.Tensor, layer: int) -> torch.Tensor:
    """The ``2h`` gate sets for ``layer``: ``h`` single-head ablations, then ``h`` keep-only sets."""
    L, h = base.shape
    eye = torch.eye(h, dtype=base.dtype, device=base.device)
    g = base.expand(2 * h, L, h).clone()
    g[:h, layer] = base[layer] * (1 - eye)
    g[h:, layer] = base[layer] * eye
    return g


def assess_heads(model: Transformer, prompts: Prompts, task: TaskConfig, gates: torch.Tensor | None = None,
                 batch_rows: int = 2048, n_min: int = 1, ablation: str | Ablation = "zero",
                 reference: Prompts | None = None, seed: int = 0, keep: Keep = True) -> HeadImportance:
    """E2 on a loaded model: errors of the base model and of all ``2 L h`` single-layer gate changes.

    ``gates`` (``(L, h)``, default the model's own) is the base setting that ablations start
    from. ``batch_rows`` bounds the rows of one forward pass (prompts x gate settings).
    ``ablation``: ``"zero"``, ``"mean"`` or ``"resample"`` (values from ``reference`` prompts,
    donors paired with ``seed``), or a ready :class:`.ablation.Ablation`.
    """
    abl = ablation if isinstance(ablation, Ablation) else make_ablation(model, ablation, reference, seed)
    return assess_heads_kinds(model, prompts, task, [abl], gates, batch_rows, n_min, keep)[abl.kind]


@torch.no_grad()
def assess_heads_kinds(model: Transformer, prompts: Prompts, task: TaskConfig, ablations: Sequence[Ablation],
                       gates: torch.Tensor | None = None, batch_rows: int = 2048,
                       n_min: int = 1, keep: Keep = True) -> dict[str, HeadImportance]:
    """:func:`assess_heads` for several ablation kinds; the base pass (and the residual stream
    entering each layer) is computed once when the base gates are all 1, as it is then the same.
    A full-mask model (E6c's constructions) predicts one query per pass: it is run once per
    context length on the prompts' prefixes (:func:`prefix_prompts`), so the errors are ``(P, N)`` too.
    ``keep=False`` skips the keep-only settings (half the passes) where only the ablation ranking is
    read (E3's ranking, E7's view); ``keep_err`` is then NaN. ``keep="top"`` runs one keep-only setting per
    layer, its top head's (:meth:`HeadImportance.top_heads` over ``n >= n_min``), after the ablations: all
    that :meth:`HeadImportance.claim1b_stats` reads (E7's trend statistics); the other heads' ``keep_err`` is NaN."""
    _check_prompts(model, prompts)
    if model.cfg.mask == "full":
        return _assess_per_prefix(model, prompts, task, ablations, gates, batch_rows, n_min, keep)
    return _assess(model, prompts, task, ablations, gates, batch_rows, n_min, keep)


@torch.no_grad()
def _assess(model: Transformer, prompts: Prompts, task: TaskConfig, ablations: Sequence[Ablation],
            gates: torch.Tensor | None, batch_rows: int, n_min: int, keep: Keep = True) -> dict[str, HeadImportance]:
    """The batched passes of :func:`assess_heads_kinds` (one query per context length, or one in all)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    L, h = model.cfg.n_layers, model.cfg.n_heads
    base_gates = (model.head_gates if gates is None else gates).detach().to(dev, torch.float32)
    if base_gates.shape != (L, h):
        raise ConfigError(f"gates: expected shape ({L}, {h}) (got {tuple(base_gates.shape)})")
    P, N = prompts.f.shape
    preds = torch.full((len(ablations), 1 + 2 * L * h, P, N), float("nan"), dtype=torch.float64)
    A = 2 * h if keep is True else h  # gate settings per layer: h single-head ablations (then h keep-only)
    _fill(model, prompts, ablations, base_gates, preds, lambda a, l: range(A), batch_rows)
    result = _importances(preds, prompts, task, ablations, base_gates, n_min)
    if keep == "top":  # then the one keep-only setting per layer that claim 1b reads: its top head's
        tops = [result[abl.kind].top_heads(n_min) for abl in ablations]
        _fill(model, prompts, ablations, base_gates, preds, lambda a, l: range(h + tops[a][l], h + tops[a][l] + 1),
              batch_rows, base=False)
        result = _importances(preds, prompts, task, ablations, base_gates, n_min)
    model.train(was_training)
    return result


def _fill(model: Transformer, prompts: Prompts, ablations: Sequence[Ablation], base_gates: torch.Tensor,
          preds: torch.Tensor, which: Callable[[int, int], range], batch_rows: int, base: bool = True) -> None:
    """Predictions of the gate settings ``which(a, l)`` (a contiguous range of :func:`gate_settings` indices)
    of every ablation ``a`` and layer ``l`` into ``preds`` ``(K, 1 + 2Lh, P, N)`` (row 0: the base pass,
    written when ``base``), by chunks of prompts."""
    dev = base_gates.device
    L, h = base_gates.shape
    P, N = prompts.f.shape
    shared_base = bool((base_gates == 1).all())  # no head is off in the base: values do not matter there
    chunk = max(1, batch_rows // (2 * h))
    entering = [act_name("resid_pre", l) for l in range(L)]  # the residual stream entering each layer
    settings = [gate_settings(base_gates, l) for l in range(L)]  # each (2h, L, h)
    for i in range(0, P, chunk):
        p = prompts.slice(i, i + chunk).to(dev, torch.float32)
        b = p.batch
        shared = _cached(model, p, [], entering) if shared_base else None
        for a, abl in enumerate(ablations):
            pred, cache = shared or _cached(model, p, abl.hooks(base_gates, start=i), entering)
            if base:
                preds[a, 0, i:i + b] = pred.double().cpu()
            vals = abl.values(b, i)  # None, (L, T, h, dh) or (b, L, T, h, dh)
            vals = None if vals is None else vals.to(dev, torch.float32)
            for l in range(L):
                r = which(a, l)
                out = _run_settings(model, cache[entering[l]], l, settings[l][r.start:r.stop], vals)
                preds[a, 1 + 2 * l * h + r.start: 1 + 2 * l * h + r.stop, i:i + b] = out.view(len(r), b, N).double().cpu()


def _importances(preds: torch.Tensor, prompts: Prompts, task: TaskConfig, ablations: Sequence[Ablation],
                 base_gates: torch.Tensor, n_min: int) -> dict[str, HeadImportance]:
    """One :class:`HeadImportance` per ablation kind from the predictions ``(K, 1 + 2Lh, P, N)``."""
    L, h = base_gates.shape
    P, N = prompts.f.shape
    result = {}
    for a, abl in enumerate(ablations):
        err = np.stack([squared_errors(pr, prompts.f) for pr in preds[a]])  # (1 + 2Lh, P, N)
        per_layer = err[1:].reshape(L, 2, h, P, N)
        result[abl.kind] = HeadImportance(err[0], per_layer[:, 0], per_layer[:, 1], base_gates.cpu().numpy(),
                                          task.s * task.tau ** 2, n_min, abl.kind)
    return result


def prefix_prompts(prompts: Prompts, n: int) -> Prompts:
    """The first ``n + 1`` examples with the target of the last only: what a full-mask model predicts from ``n``."""
    return Prompts(prompts.x[:, :n + 1], prompts.y[:, :n + 1], prompts.w, prompts.f[:, n:n + 1])


def prefix_errors(model: Transformer, prompts: Prompts, gates: torch.Tensor | None = None) -> np.ndarray:
    """Per-prompt squared errors ``(P, N)`` at every context length, for prefix- and full-mask models alike."""
    if model.cfg.mask != "full":
        return squared_errors(predict(model, prompts, head_gates=gates), prompts.f)
    subs = [prefix_prompts(prompts, n) for n in range(prompts.f.shape[1])]
    return np.concatenate([squared_errors(predict(model, p, head_gates=gates), p.f) for p in subs], axis=-1)


def _assess_per_prefix(model: Transformer, prompts: Prompts, task: TaskConfig, ablations: Sequence[Ablation],
                       gates: torch.Tensor | None, batch_rows: int, n_min: int,
                       keep: Keep = True) -> dict[str, HeadImportance]:
    """:func:`assess_heads_kinds` for a full-mask model: one pass per context length, errors stacked along n."""
    per_n = []
    for n in range(prompts.f.shape[1]):
        sub = prefix_prompts(prompts, n)
        _check_prompts(model, sub)
        per_n.append(_assess(model, sub, task, ablations, gates, batch_rows, n_min, keep))
    out = {}
    for kind, first in per_n[0].items():
        cat = lambda attr: np.concatenate([r[kind].__dict__[attr] for r in per_n], axis=-1)  # noqa: E731
        out[kind] = HeadImportance(cat("base_err"), cat("ablate_err"), cat("keep_err"), first.base_gates,
                                   first.norm, n_min, kind)
    return out


def _cached(model: Transformer, p: Prompts, hooks: Hooks, names: list[str]) -> tuple[torch.Tensor, dict]:
    """Predictions and the activations ``names`` of one pass with ``hooks``."""
    with model.hooks(hooks):
        return model.run_with_cache(p.x, p.y, names_filter=names, return_cache_object=False)


def _run_settings(model: Transformer, resid: torch.Tensor, layer: int, settings: torch.Tensor,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions ``(A * b, Q)`` of ``A`` gate settings ``(A, L, h)`` that differ from layer ``layer`` on,
    from the residual stream ``resid (b, T, D)`` entering it (setting-major rows).

    One pass from ``layer`` (``start_at_layer``): its attention runs once on the ``b`` prompts and a hook
    at its ``hook_z`` fans the head outputs out to the ``A`` settings (``gate_heads`` per row), so only
    the gating, the output projection and what follows run per setting; the layers above gate their
    heads per row through :func:`~icl_heads.model.head_hooks`. ``values``: head values for all layers,
    ``(L, T, h, dh)`` or per prompt ``(b, L, T, h, dh)``."""
    A, b = settings.shape[0], resid.shape[0]
    g = settings.repeat_interleave(b, dim=0)  # (A*b, L, h), setting-major like the fan-out
    if values is not None and values.dim() == 5:  # per prompt: setting-major too
        values = values.repeat(A, 1, 1, 1, 1)
    v0 = None if values is None else values[..., layer, :, :, :]

    @rowwise
    def fan_out(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (b, T, h, dh) -> (A*b, T, h, dh)
        return gate_heads(z.repeat(A, 1, 1, 1), g[:, layer], at_rows(v0, hook.rows))

    hooks = [(act_name("z", layer), fan_out)] + head_hooks(g, values, layers=range(layer + 1, model.cfg.n_layers))
    return model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)


def _check_prompts(model: Transformer, prompts: Prompts) -> None:
    if prompts.x.shape[-1] != model.cfg.n_dims:
        raise ConfigError(f"task.d: prompts have d={prompts.x.shape[-1]} but the model expects {model.cfg.n_dims}")
    if prompts.x.shape[1] > model.cfg.n_max + 1:
        raise ConfigError(f"task.n_max: prompts have {prompts.x.shape[1] - 1} context examples, "
                          f"the model at most {model.cfg.n_max}")


