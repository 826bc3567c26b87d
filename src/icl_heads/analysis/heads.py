"""Head importance (E2) and head pruning (E3): which attention heads a trained model needs.

* :func:`assess_heads` gates every head off in turn ("ablate") and, separately, keeps only
  one head of a layer ("keep"), and records the per-prompt squared error at every context
  length. Importance of head ``(l, k)`` = excess risk with the head ablated minus the base risk.
  A gated-off head outputs zero (``ablation="zero"``, the paper's masking), its mean over
  reference prompts (``"mean"``) or a paired reference prompt's output (``"resample"``); see
  :mod:`.ablation`. :func:`assess_heads_kinds` runs several kinds sharing the base pass.
  All ``2 L h`` gate settings run as batched forward passes with per-prompt gates ``(B, L, h)``
  (prompts x ablations in one batch, chunked). Settings that only touch layer ``l`` share the
  residual stream entering layer ``l``, which is computed once: gates of layer ``l`` cannot
  change earlier layers, so this is exact, and it saves the work of layers ``< l``.
* :meth:`HeadImportance.concentration` is the per-layer concentration score: the share of the
  top head in the layer's total (positive) importance, ``1/h`` when all heads matter equally
  and 1 when one head carries everything, with a paired bootstrap CI over prompts.
* :func:`parse_policy` / :func:`prune_gates` turn a policy such as ``"1:all,2:top1,3:top1"``
  (1-based layers, as in the paper) into gates; :func:`run_e3` compares full, pruned and the
  control (layer 1 pruned to its top head too), optionally after a short fine-tune with the
  gates fixed (:func:`finetune`).

``run_e2`` / ``run_e3`` are what the CLI and ``reproduce`` call; the rest works on a loaded
model in a notebook.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoint import load_meta, load_model
from ..claims.keys import in_context_n_min
from ..config import ConfigError, Preset, TaskConfig, get_preset, validate
from ..evaluation import predict
from ..io import write_csv, write_json, write_provenance
from ..metrics import curve_from_errors, squared_errors
from ..model import Transformer
from ..tasks import Prompts, fixed_prompts
from ..training import fine_tune
from .ablation import REFERENCE_STREAM, Ablation, make_ablation, make_ablations, parse_ablations

ABLATE, KEEP = "ablate", "keep"


# --------------------------------------------------------------------------- E2: importance

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
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(self.n_prompts, np.full(self.n_prompts, 1 / self.n_prompts), size=n_boot)
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
        cut = lambda e: e[..., n_from:].mean(-1)  # noqa: E731  per-prompt mean over n >= n_from
        base, abl, keep = cut(self.base_err), cut(self.ablate_err), cut(self.keep_err)  # (P,), (L, h, P) x2
        counts = np.random.default_rng(seed).multinomial(P, np.full(P, 1 / P), size=n_boot)
        stats = {}
        for name, w in (("point", np.ones((1, P))), ("boot", counts)):
            stats[name] = (w @ base / P, abl @ w.T / P, keep @ w.T / P)  # (B,), (L, h, B), (L, h, B)
        b0, a0, _ = stats["point"]
        top = np.argmax(a0[..., 0] - b0[0], axis=1)  # (L,) ties: lower index
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
                 reference: Prompts | None = None, seed: int = 0, keep: bool = True) -> HeadImportance:
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
                       n_min: int = 1, keep: bool = True) -> dict[str, HeadImportance]:
    """:func:`assess_heads` for several ablation kinds; the base pass (and the residual stream
    entering each layer) is computed once when the base gates are all 1, as it is then the same.
    A full-mask model (E6c's constructions) predicts one query per pass: it is run once per
    context length on the prompts' prefixes (:func:`prefix_prompts`), so the errors are ``(P, N)`` too.
    ``keep=False`` skips the keep-only settings (half the passes) where only the ablation ranking is
    read (E3's ranking, E7); ``keep_err`` is then NaN."""
    _check_prompts(model, prompts)
    if model.cfg.mask == "full":
        return _assess_per_prefix(model, prompts, task, ablations, gates, batch_rows, n_min, keep)
    return _assess(model, prompts, task, ablations, gates, batch_rows, n_min, keep)


@torch.no_grad()
def _assess(model: Transformer, prompts: Prompts, task: TaskConfig, ablations: Sequence[Ablation],
            gates: torch.Tensor | None, batch_rows: int, n_min: int, keep: bool = True) -> dict[str, HeadImportance]:
    """The batched passes of :func:`assess_heads_kinds` (one query per context length, or one in all)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    L, h = model.cfg.n_layers, model.cfg.n_heads
    base_gates = (model.head_gates if gates is None else gates).detach().to(dev, torch.float32)
    if base_gates.shape != (L, h):
        raise ConfigError(f"gates: expected shape ({L}, {h}) (got {tuple(base_gates.shape)})")
    A = 2 * h if keep else h  # gate settings per layer: h single-head ablations (then h keep-only)
    settings = [gate_settings(base_gates, l)[:A] for l in range(L)]  # each (A, L, h)
    shared_base = bool((base_gates == 1).all())  # no head is off in the base: values do not matter there
    P, N = prompts.f.shape
    n_examples = prompts.x.shape[1]
    K = len(ablations)
    preds = torch.full((K, 1 + 2 * L * h, P, N), float("nan"), dtype=torch.float64)
    chunk = max(1, batch_rows // (2 * h))
    for i in range(0, P, chunk):
        p = prompts.slice(i, i + chunk).to(dev, torch.float32)
        b = p.batch
        shared = model.run_with_cache(p.x, p.y, base_gates) if shared_base else None
        for a, abl in enumerate(ablations):
            vals = abl.values(b, i)  # None, (L, T, h, dh) or (b, L, T, h, dh)
            vals = None if vals is None else vals.to(dev, torch.float32)
            pred, cache = shared or model.run_with_cache(p.x, p.y, base_gates, vals)
            preds[a, 0, i:i + b] = pred.double().cpu()
            for l in range(L):
                h_in = cache["embed"] if l == 0 else cache[f"blocks.{l - 1}.resid_post"]
                v = None if vals is None else vals[..., l:, :, :, :]
                out = _run_settings(model, h_in, l, settings[l], n_examples, v).view(A, b, N).double().cpu()
                preds[a, 1 + 2 * l * h: 1 + 2 * l * h + A, i:i + b] = out
    model.train(was_training)
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
                       keep: bool = True) -> dict[str, HeadImportance]:
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


def _run_settings(model: Transformer, h_in: torch.Tensor, layer: int, settings: torch.Tensor, n_examples: int,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions ``(A * b, Q)`` of ``A`` gate settings ``(A, L, h)`` that differ from layer ``layer`` on,
    from the residual stream ``h_in (b, T, D)`` entering it (setting-major rows).

    The heads of ``layer`` see the same input under every setting, so they run once; only their
    gating, the output projection and the layers above run per setting. ``values``: head values for
    layers ``layer..L-1`` (``(L - layer, T, h, dh)`` or per prompt ``(b, L - layer, T, h, dh)``)."""
    _, mask = model.layout(n_examples, h_in.device)
    A, b = settings.shape[0], h_in.shape[0]
    rep = lambda t: t.unsqueeze(0).expand(A, *t.shape).reshape(A * b, *t.shape[1:])  # noqa: E731
    g = settings.repeat_interleave(b, dim=0)  # (A*b, L, h), setting-major like rep
    if values is not None and values.dim() == 5:  # per prompt: setting-major like rep
        values = values.repeat(A, 1, 1, 1, 1)
    block = model.blocks[layer]
    raw = block.attn.heads(block.ln_1(h_in), mask)  # (b, T, h, dh), once for all A settings
    v0 = None if values is None else values[..., 0, :, :, :]
    h = block.finish(rep(h_in) + block.attn.combine(rep(raw), g[:, layer, :], values=v0))
    return _run_from(model, h, layer + 1, g, n_examples, None if values is None else values[..., 1:, :, :, :])


def _run_from(model: Transformer, h: torch.Tensor, layer: int, gates: torch.Tensor, n_examples: int,
              values: torch.Tensor | None = None) -> torch.Tensor:
    """Layers ``layer..L-1`` and the read-out from the residual stream ``h`` entering ``layer``.

    ``values`` holds head values for layers ``layer..L-1`` only (``(..., L - layer, T, h, dh)``)."""
    return model.forward_from(h, layer, gates, values)  # the model's start_at_layer


def _check_prompts(model: Transformer, prompts: Prompts) -> None:
    if prompts.x.shape[-1] != model.cfg.n_dims:
        raise ConfigError(f"task.d: prompts have d={prompts.x.shape[-1]} but the model expects {model.cfg.n_dims}")
    if prompts.x.shape[1] > model.cfg.n_max + 1:
        raise ConfigError(f"task.n_max: prompts have {prompts.x.shape[1] - 1} context examples, "
                          f"the model at most {model.cfg.n_max}")


# --------------------------------------------------------------------------- E3: pruning

_SPEC = re.compile(r"^(all|top([1-9][0-9]*))$")


def parse_policy(text: str) -> dict[int, str]:
    """Parse ``"1:all,2:top1,3:top1"`` into ``{1: "all", 2: "top1", 3: "top1"}`` (1-based layers).

    Each item is ``LAYER:all`` or ``LAYER:topK``; layers must be distinct positive integers.
    Whether they match a model is checked by :func:`prune_gates`.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"keep: empty policy (got {text!r}); expected e.g. '1:all,2:top1,3:top1'")
    policy: dict[int, str] = {}
    for item in text.split(","):
        layer, sep, spec = item.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not _SPEC.match(spec.strip()):
            raise ConfigError(f"keep: each item must be LAYER:all or LAYER:topK with LAYER >= 1 (got {item.strip()!r})")
        l = int(layer)
        if l < 1:
            raise ConfigError(f"keep: layers are 1-based (got {l})")
        if l in policy:
            raise ConfigError(f"keep: layer {l} listed twice")
        policy[l] = spec.strip()
    return policy


def default_policy(n_layers: int) -> str:
    """SPEC E3: all heads in layer 1, the most important head in every later layer."""
    return ",".join(["1:all"] + [f"{l}:top1" for l in range(2, n_layers + 1)])


def control_policy(policy: str) -> str:
    """The control: the same policy with layer 1 cut to its most important head."""
    p = parse_policy(policy)
    p[1] = "top1"
    return ",".join(f"{l}:{s}" for l, s in sorted(p.items()))


def prune_gates(importance: HeadImportance, policy: str) -> torch.Tensor:
    """Gates ``(L, h)`` keeping, per layer, all heads or the top-K heads by ablation importance.

    Every layer of the model must appear exactly once in ``policy`` (strict on purpose: a
    policy written for a 3-layer model is an error on a 4-layer one, not a silent default).
    """
    p = parse_policy(policy)
    L, h = importance.shape
    if set(p) != set(range(1, L + 1)):
        raise ConfigError(f"keep: policy must list every layer 1..{L} exactly once (got layers {sorted(p)})")
    gates = torch.zeros(L, h)
    for l, spec in p.items():
        if spec == "all":
            gates[l - 1] = 1.0
            continue
        k = int(spec[3:])
        if k > h:
            raise ConfigError(f"keep: layer {l} asks for top{k} but the model has {h} heads")
        gates[l - 1, importance.ranking(l - 1)[:k]] = 1.0
    return gates * torch.as_tensor(importance.base_gates, dtype=gates.dtype)


def finetune(model: Transformer, gates: torch.Tensor, task: TaskConfig, steps: int, batch_size: int = 64,
             lr: float = 1e-4, seed: int = 0, grad_clip: float = 1.0, ablation: Ablation | None = None) -> Transformer:
    """A copy of ``model`` trained ``steps`` AdamW steps with ``gates`` fixed (fresh "train" prompts).

    Minimal on purpose (constant LR, MSE on every query position as in training): it answers
    "does a short fine-tune recover what pruning lost?", not "what is the best pruned model?".
    With a mean or resample ``ablation`` the gated-off heads output the original model's mean
    (fixed) or a random reference prompt's output (drawn per prompt and step) while training.
    """
    if steps < 0:
        raise ConfigError(f"finetune: steps must be >= 0 (got {steps})")
    tuned = copy.deepcopy(model)
    dev = next(tuned.parameters()).device
    tuned.head_gates.copy_(gates.to(dev))
    if steps == 0:
        return tuned
    fine_tune(tuned, task, steps, batch_size, lr, seed, grad_clip,  # the training loop, constant lr
              None if ablation is None else (lambda gen: ablation.sample(batch_size, gen)))
    return tuned


def paired_ratio(num_err: np.ndarray, den_err: np.ndarray, n_min: int = 1, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Ratio of risks averaged over ``n >= n_min`` with a paired percentile bootstrap CI over prompts."""
    a, b = num_err[:, n_min:].mean(-1), den_err[:, n_min:].mean(-1)
    P = a.size
    counts = np.random.default_rng(seed).multinomial(P, np.full(P, 1 / P), size=n_boot)
    boot = (counts @ a) / (counts @ b)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return dict(ratio=float(a.mean() / b.mean()), ci_low=float(lo), ci_high=float(hi))


def claim2a_stats(errs: dict[str, np.ndarray], n_from: int, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95, **labels: Any) -> list[dict[str, Any]]:
    """Claim 2a's statistics per context length ``n >= n_from`` and pooled over those n.

    ``errs`` holds per-prompt squared errors ``(P, N)`` on the same test prompts for ``full``,
    ``pruned``, ``control`` and, optionally, ``single`` (the same seed's h = 1 model). Statistics:
    ``pruned_over_full``, ``control_over_pruned``, and with ``single``: ``single_over_full`` (the
    multi-head advantage) and ``fraction_lost = (pruned - full) / (single - full)``, the share of
    that advantage pruning gives back (0: none, 1: all of it). One prompt resample serves every
    model, n and statistic (paired percentile bootstrap). Rows: ``n`` is an integer or ``"pooled"``.
    """
    P, N = errs["full"].shape
    counts = np.random.default_rng(seed).multinomial(P, np.full(P, 1 / P), size=n_boot)
    cols = {"pooled": lambda e: e[:, n_from:].mean(-1, keepdims=True)}
    rows: list[dict[str, Any]] = []
    for n_key, cut in [("pooled", cols["pooled"])] + [(n, (lambda e, n=n: e[:, n:n + 1])) for n in range(n_from, N)]:
        m = {k: (cut(e).mean(0), counts @ cut(e) / P) for k, e in errs.items()}  # point (1,), boot (B, 1)
        for stat, fn in _2A_STATS.items():
            if stat in ("single_over_full", "fraction_lost") and "single" not in m:
                continue
            point, boot = fn(*(m[k][0] for k in ("full", "pruned", "control", "single") if k in m)), \
                fn(*(m[k][1] for k in ("full", "pruned", "control", "single") if k in m))
            with np.errstate(invalid="ignore"):
                lo, hi = (np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2]) if np.isfinite(boot).any()
                          else (np.nan, np.nan))
            rows.append(dict(**labels, n=n_key, statistic=stat, value=float(point[0]), ci_low=float(lo),
                             ci_high=float(hi), n_from=n_from))
    return rows


def _frac(full: np.ndarray, pruned: np.ndarray, control: np.ndarray, single: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pruned - full) / (single - full)


_2A_STATS = {
    "pruned_over_full": lambda full, pruned, *rest: pruned / full,
    "control_over_pruned": lambda full, pruned, control, *rest: control / pruned,
    "single_over_full": lambda full, pruned, control, single: single / full,
    "fraction_lost": _frac,
}


# --------------------------------------------------------------------------- runners (CLI, reproduce)

def resolve_preset(ckpt: str | Path, preset: Preset | str | None) -> Preset:
    """The preset to sample prompts from: the one given, else the one named in ``meta.json``.

    Training records the preset's name and the exact task it trained on; the recorded task
    wins over the named preset's, so a model trained with task overrides is analysed on its task.
    """
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        return get_preset(preset)
    meta = load_meta(ckpt)
    rec = meta.get("preset")
    if isinstance(rec, dict):
        return validate(Preset, rec)
    if not isinstance(rec, str):
        raise ConfigError(f"preset: {ckpt} records no preset in meta.json; pass --preset")
    pre = get_preset(rec)
    if isinstance(meta.get("task"), dict):
        pre = pre.model_copy(update={"task": validate(TaskConfig, meta["task"])})
    return pre


def load_for_analysis(ckpt: str | Path, preset: Preset | str | None = None,
                      device: str = "cpu") -> tuple[Transformer, dict[str, Any], Preset]:
    """Load a checkpoint and the preset whose task it was trained on; check they fit together."""
    pre = resolve_preset(ckpt, preset)
    model, meta = load_model(ckpt, device)
    if pre.task.d != model.cfg.n_dims or pre.task.n_max > model.cfg.n_max:
        raise ConfigError(f"preset: task d={pre.task.d}, n_max={pre.task.n_max} does not fit checkpoint {ckpt} "
                          f"(n_dims={model.cfg.n_dims}, n_max={model.cfg.n_max})")
    model.eval()
    return model, meta, pre


def model_label(model: Transformer) -> str:
    return f"h={model.cfg.n_heads}"


def claim1_verdict(rows: list[dict[str, Any]], conc: list[dict[str, Any]]) -> dict[str, Any]:
    """SPEC claim 1 as three checks with 95% CIs (needs h > 1):

    * every layer-1 head matters: its importance CI is above 0 (a weak, statistical "matters");
    * one head dominates every later layer: its share of the layer's importance has CI above 1/2;
    * every later layer is more concentrated than layer 1: the paired CI of the share gap is above 0.
    """
    l1 = [r for r in rows if r["layer"] == 1]
    later = [c for c in conc if c["layer"] > 1]
    all_l1 = all(r["ci_low"] > 0 for r in l1)
    dominant = bool(later) and all(c["ci_low"] > 0.5 for c in later)
    conc_later = bool(later) and all(c["share_minus_layer1_ci_low"] > 0 for c in later)
    return dict(all_layer1_heads_matter=all_l1, one_head_dominates_later_layers=dominant,
                later_layers_more_concentrated=conc_later,
                reproduces=all_l1 and dominant and conc_later and len(l1) > 1,
                layer1_importance_ci_low=[r["ci_low"] for r in l1],
                top_share=[c["top_share"] for c in conc],
                rule="all layer-1 head importances have 95% CI > 0; every later layer's top-head share has "
                     "95% CI > 1/2; and for every later layer the paired bootstrap 95% CI of (top share - "
                     "layer-1 top share) is > 0; needs h > 1")


def run_e2(ckpt: str | Path, out: str | Path, preset: Preset | str | None = None, n_prompts: int | None = None,
           seed: int | None = None, device: str = "cpu", n_boot: int = 1000,
           ablations: str | Sequence[str] = ("zero",)) -> dict[str, Any]:
    """E2 for one checkpoint: CSVs, heat-map figure, concentration with CIs, summary JSON.

    Several ``ablations`` share the base pass and go into the same CSVs (column ``ablation``);
    ``summary.json`` holds the first kind at top level and every kind under ``by_ablation``.
    """
    out = Path(out)
    kinds = parse_ablations(ablations)
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_test
    prompts = fixed_prompts(pre.task, n, seed, "test")
    abls = make_ablations(model, kinds, pre.task, n, seed)
    imps = assess_heads_kinds(model, prompts, pre.task, list(abls.values()))
    by_kind, rows, rows_n, concs, eff, c1b, eff_n = {}, [], [], [], [], [], []
    n_from = in_context_n_min(pre.task.d)
    for kind, imp in imps.items():
        conc = imp.concentration(n_boot=n_boot, seed=seed)
        r = imp.rows()
        rows, rows_n, concs = rows + r, rows_n + imp.rows_by_n(pre.task), concs + conc
        layer_rows, model_rows = imp.claim1b_stats(n_from, n_boot, seed)
        eff, c1b, eff_n = eff + layer_rows, c1b + model_rows, eff_n + imp.effective_heads_by_n()
        base = curve_from_errors(imp.base_err, pre.task)
        by_kind[kind] = dict(claim1=claim1_verdict(r, conc), base_risk_norm_mean=float(base.risk_norm[imp.n_min:].mean()),
                             importance=imp.score(ABLATE).tolist(), keep_importance=imp.score(KEEP).tolist(),
                             concentration=conc)
    write_csv(out / "head_importance.csv", rows)
    write_csv(out / "head_importance_by_n.csv", rows_n)
    write_csv(out / "concentration.csv", concs)
    write_csv(out / "effective_heads.csv", eff)
    write_csv(out / "effective_heads_by_n.csv", eff_n)
    plot_effective_heads(eff_n, out / "effective_heads.png", n_from,
                         title=f"E2 effective heads per n, {model_label(model)} ({ckpt})")
    if c1b:
        write_csv(out / "claim1b.csv", c1b)
    plot_importance(imps, out / "head_importance.png", title=f"E2 head importance, {model_label(model)} ({ckpt})")
    summary = dict(**by_kind[kinds[0]], checkpoint=str(ckpt), n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads,
                   n_prompts=prompts.batch, n_min=1, ablations=list(kinds), reference_stream=REFERENCE_STREAM,
                   by_ablation=by_kind)
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E2", checkpoint=str(ckpt), n_prompts=prompts.batch,
                     n_boot=n_boot, stream="test", ablations=list(kinds), reference_stream=REFERENCE_STREAM)
    return summary


def run_e3(ckpt: str | Path, out: str | Path, policy: str | None = None, preset: Preset | str | None = None,
           finetune_steps: int = 0, n_prompts: int | None = None, seed: int | None = None,
           device: str = "cpu", n_boot: int = 1000, ablations: str | Sequence[str] = ("zero",),
           single_ckpt: str | Path | None = None) -> dict[str, Any]:
    """E3: heads ranked on "val" prompts, full vs pruned vs control compared on "test" prompts.

    Judged by each model's own read-out (``risk_ratio_vs_full``) and by a ridge probe after
    the last layer fitted per model and gating on "probe" prompts (``probe_ratio_vs_full``),
    before and after the final LayerNorm. ``claim2a.csv`` holds claim 2a's statistics per n in
    the in-context regime and pooled (:func:`claim2a_stats`); with ``single_ckpt`` (the same
    seed's h = 1 model, scored on the same prompts) also the fraction of the multi-head advantage
    that pruning loses.
    For every kind in ``ablations`` heads are ranked and pruned heads ablated that way;
    ``summary.json`` holds the first kind at top level and every kind under ``by_ablation``.
    """
    from ..plotting import risk_vs_n
    from .probes import final_readouts

    out = Path(out)
    kinds = parse_ablations(ablations)
    if policy is not None:
        parse_policy(policy)  # fail before loading anything
    model, meta, pre = load_for_analysis(ckpt, preset, device)
    policy = policy or default_policy(model.cfg.n_layers)
    control = control_policy(policy)
    seed = pre.seed if seed is None else seed
    n = n_prompts or pre.eval.n_test
    test, fit = fixed_prompts(pre.task, n, seed, "test"), fixed_prompts(pre.task, n, seed, "probe")
    abls = make_ablations(model, kinds, pre.task, n, seed)
    # heads ranked by importance in the in-context regime n >= d/2 (small n would dominate the mean)
    imps = assess_heads_kinds(model, fixed_prompts(pre.task, n, seed, "val"), pre.task, list(abls.values()),
                              n_min=in_context_n_min(pre.task.d), keep=False)
    norm = pre.task.s * pre.task.tau ** 2
    n_min = 1
    full_gates = imps[kinds[0]].base_gates
    full = final_readouts(model, fit, test, torch.as_tensor(full_gates))  # own read-out, probes before/after LN
    full_err, full_probe, full_probe_ln = full["model"], full["probe"], full["probe_ln"]
    single = _single_errors(single_ckpt, pre, fit, test, device)
    n_from = in_context_n_min(pre.task.d)
    claim_rows: list[dict[str, Any]] = []
    rows = curve_from_errors(full_err, pre.task).rows(model="full", ablation="none", n_heads=model.cfg.n_heads, policy="")
    curves = {"full": rows[:]}
    by_kind = {}
    for kind, abl in abls.items():
        gates = {"pruned": prune_gates(imps[kind], policy).numpy(), "control": prune_gates(imps[kind], control).numpy()}
        models = {name: model for name in gates}
        if finetune_steps:
            for name in ("pruned", "control"):
                models[f"{name}+ft"] = finetune(model, torch.as_tensor(gates[name]), pre.task, finetune_steps,
                                                pre.train.batch_size, lr=pre.train.lr * 0.1, seed=seed, ablation=abl)
                gates[f"{name}+ft"] = gates[name]
        test_v, fit_v = abl.values(n), abl.repaired(seed + 1).values(n)
        errs, probe, probe_ln = {"full": full_err}, {"full": full_probe}, {"full": full_probe_ln}
        for name, g in gates.items():
            gt = torch.as_tensor(g)
            reads = final_readouts(models[name], fit, test, gt, fit_v, test_v)
            errs[name], probe[name], probe_ln[name] = reads["model"], reads["probe"], reads["probe_ln"]
            label = name if len(kinds) == 1 else f"{name} [{kind}]"
            c = curve_from_errors(errs[name], pre.task).rows(
                model=name, ablation=kind, n_heads=model.cfg.n_heads,
                policy={"pruned": policy, "control": control}[name.removesuffix("+ft")])
            rows += c
            curves[label] = c
        for readout, e in (("model", errs), ("probe", probe), ("probe_ln", probe_ln)):
            four = {k: e[k] for k in ("full", "pruned", "control")} | ({"single": single[readout]} if single else {})
            claim_rows += claim2a_stats(four, n_from, n_boot, seed, ablation=kind, readout=readout)
        ratios = {k: paired_ratio(e, full_err, n_min, n_boot, seed) for k, e in errs.items() if k != "full"}
        pratios = {k: paired_ratio(e, full_probe, n_min, n_boot, seed) for k, e in probe.items() if k != "full"}
        by_kind[kind] = dict(
            gates={"full": np.asarray(full_gates).tolist(), **{k: np.asarray(v).tolist() for k, v in gates.items()}},
            kept_heads={k: [[i + 1 for i in np.flatnonzero(row)] for row in np.asarray(v)]
                        for k, v in {"full": full_gates, **gates}.items()},
            risk_ratio_vs_full=ratios, probe_ratio_vs_full=pratios,
            probe_ratio=pratios["pruned"]["ratio"],
            probe_ratio_ci=[pratios["pruned"]["ci_low"], pratios["pruned"]["ci_high"]],
            risk_norm_mean={k: float(v[:, n_min:].mean() / norm) for k, v in errs.items()},
            probe_risk_norm_mean={k: float(v[:, n_min:].mean() / norm) for k, v in probe.items()})
    write_csv(out / "pruning.csv", rows)
    write_csv(out / "claim2a.csv", claim_rows)
    risk_vs_n(curves, out / "pruning.png", f"E3 pruning, {model_label(model)}: full vs {policy} vs control {control}"
              + ("" if kinds == ("zero",) else f" ({', '.join(kinds)} ablation)"))
    summary = dict(checkpoint=str(ckpt), policy=policy, control=control, finetune_steps=finetune_steps,
                   **by_kind[kinds[0]], n_prompts=n, n_min=n_min, ablations=list(kinds),
                   reference_stream=REFERENCE_STREAM, probe="one RidgeCV per n on the residual stream after the last "
                   "layer, standardised features, fitted per model and gating on 'probe', scored on 'test'",
                   single_checkpoint=None if single_ckpt is None else str(single_ckpt), claim2a_n_from=n_from,
                   by_ablation=by_kind)
    write_json(out / "summary.json", summary)
    write_provenance(out, pre, seed, experiment="E3", checkpoint=str(ckpt), policy=policy, control=control,
                     finetune_steps=finetune_steps, rank_stream="val", eval_stream="test", probe_fit_stream="probe",
                     ablations=list(kinds), reference_stream=REFERENCE_STREAM)
    return summary


def _single_errors(ckpt: str | Path | None, pre: Preset, fit: Prompts, test: Prompts,
                   device: str) -> dict[str, np.ndarray] | None:
    """The single-head model's errors on the same test prompts: own read-out, probes before/after the final LN."""
    from .probes import final_readouts

    if ckpt is None:
        return None
    m, _, _ = load_for_analysis(ckpt, pre, device)
    return final_readouts(m, fit, test)


def plot_importance(imps: HeadImportance | dict[str, HeadImportance], path: str | Path, title: str) -> Path:
    """Heat-maps (layers x heads): raw importance, normalised per layer, and keep-only risk change;
    one column per ablation kind, so the kinds sit side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    if isinstance(imps, HeadImportance):
        imps = {imps.ablation: imps}
    first = next(iter(imps.values()))
    L, h = first.shape
    K = len(imps)
    fig, axes = plt.subplots(3, K, figsize=(1.5 + (2.5 + 0.9 * h) * K, 3 * (1.2 + 0.8 * L)), squeeze=False)
    for j, (kind, imp) in enumerate(imps.items()):
        panels = [("importance: risk increase when ablated", imp.score(ABLATE), "magma"),
                  ("normalised per layer (share of positive total)", per_layer_share(imp.score(ABLATE)), "magma"),
                  ("keep only this head in its layer: risk increase", imp.score(KEEP), "viridis")]
        for ax, (name, val, cmap) in zip(axes[:, j], panels):
            _heatmap(fig, ax, val, cmap, f"{kind} ablation\n{name}")
    fig.suptitle(title + f" (normalised excess risk, mean over n >= {first.n_min})", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_effective_heads(rows: list[dict[str, Any]], path: str | Path, n_from: int, title: str) -> Path:
    """N_eff (left) and keep-top ratio (right) vs n, one line per layer, one row of panels per ablation kind;
    a dotted line marks n = d/2, where the claims' regime starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    kinds = list(dict.fromkeys(r["ablation"] for r in rows))
    fig, axes = plt.subplots(len(kinds), 2, figsize=(9, 3 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        sel = [r for r in rows if r["ablation"] == kind]
        for layer in sorted({r["layer"] for r in sel}):
            rs = sorted((r for r in sel if r["layer"] == layer), key=lambda r: r["n"])
            for ax, col in zip(axes[i], ("n_eff", "keep_top_ratio")):
                ax.plot([r["n"] for r in rs], [r[col] for r in rs], "o-", ms=3, label=f"layer {layer}")
        for ax, name in zip(axes[i], ("effective number of heads", "keep-top ratio (top head alone / model)")):
            ax.axvline(n_from, ls=":", color="k", lw=0.8)
            ax.set_title(f"{kind} ablation: {name}", fontsize=9)
            ax.set_xlabel("context length n")
            ax.grid(True, alpha=0.3)
        axes[i, 1].set_yscale("log")
        axes[i, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _heatmap(fig: Any, ax: Any, val: np.ndarray, cmap: str, title: str) -> None:
    L, h = val.shape
    im = ax.imshow(val, cmap=cmap, aspect="auto")
    lo, hi = (np.nanmin(val), np.nanmax(val)) if np.isfinite(val).any() else (0.0, 0.0)
    for l in range(L):
        for k in range(h):
            bright = np.isfinite(val[l, k]) and val[l, k] > lo + 0.6 * (hi - lo)
            ax.text(k, l, f"{val[l, k]:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_xticks(range(h), [str(k + 1) for k in range(h)])
    ax.set_yticks(range(L), [str(l + 1) for l in range(L)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
