"""Classical in-context estimators for sparse linear regression, batched over prompts AND prefixes.

Every estimator maps ``x (B, N, d)``, ``y (B, N)`` to predictions ``(B, N)``: column ``k``
predicts ``y_k`` (i.e. ``<w*, x_k>``) from examples ``0..k-1`` only, so column 0 is context
length 0 (the same contract as the transformer, see :mod:`icl_heads.tasks`). Inputs may be
torch tensors or numpy arrays; work is done in float64 and float64 tensors are returned.

Plain functions (``from icl_heads.estimators import pto, gd, ...``)::

    zero(x, y)                                   -> 0 everywhere
    ols(x, y)                                    minimum-norm least squares (pinv of X_k)
    ridge(x, y, lam)                             argmin ||y - Xw||^2 + lam ||w||^2  (= sklearn Ridge(alpha=lam))
    lasso(x, y, alpha)                           argmin (1/2k)||y - Xw||^2 + alpha ||w||_1  (= sklearn Lasso(alpha))
    gd(x, y, T, eta, step="fixed", steps=None)   T GD steps from w=0 on (1/2k) sum (<w,x_i> - y_i)^2
    pto(x, y, T, eta, gamma=1, step="scale_free", steps=None)
                                                 preprocess-then-optimise (SPEC section 4)
    pto_groups(x, y, h, a, T, eta, step="scale_free", steps=None)
                                                 PtO with h contiguous coordinate groups, GD on [a x, f(x)]
    oracle_ls(x, y, support)                     least squares on the true support (support: (B, d) bool)
    bayes(x, y, s, sigma, tau=1)                 exact posterior mean under the task prior

Step rules of ``gd``/``pto``/``pto_groups`` (``eta`` is the step size, or ``c`` for scale_free):

* ``"fixed"``: step ``eta`` (what a linear-attention layer computes);
* ``"scale_free"``: step ``c / lambda_max`` of the (preprocessed) empirical covariance, ``c`` in (0, 2);
* ``"normalized"`` (``pto`` only): preprocess with ``(|r| / max_j |r_j|)^gamma`` and use step ``eta``.

``steps=[t0, t1, ...]`` returns a ``(len(steps), B, N)`` tensor with the predictions after each of
those numbers of steps, from one run (``T`` is then ignored). ``guard="off" | "reject" | "clip"``
decides what happens where a step is unstable (``step * lambda_max >= 2``): kept (default, may
diverge), NaN, or capped at ``GUARD_C / lambda_max``. Tuning rejects and test predictions clip, so
no tuned estimator diverges (:mod:`.tuning`).

Where things are (one module per family)::

    prefix.py            PrefixStats (cumulative Gram matrices), input checks, memory-bounded
                         prompt blocks, Spectrum (closed-form GD / ridge in the eigenbasis)
    closed_form.py       zero, ols, oracle_ls, ridge
    lasso_homotopy.py    lasso: batched homotopy (LARS-lasso) path + KKT check + CD fallback
    gradient_descent.py  gd, pto, pto_groups and their step rules
    bayes_posterior.py   bayes: exact posterior mean over all C(d, s) supports
    tuning.py            grids, FAMILIES, per-n tuning on validation prompts (with the
                         divergence guard for fixed steps), tuned_predictions, estimator_table

(The modules are not named after the functions they hold, so ``icl_heads.estimators.lasso`` stays
the function.) Every name below is re-exported here: ``from icl_heads.estimators import X`` works
for all of them.
"""

from __future__ import annotations

from .bayes_posterior import BAYES_MIN_SIGMA, bayes
from .closed_form import ols, oracle_ls, ridge, zero
from .gradient_descent import gd, group_slices, pto, pto_groups
from .lasso_homotopy import lasso
from .prefix import GUARD_C, GUARDS, STABLE_LIMIT, STEP_RULES, PrefixStats, Spectrum
from .tuning import (
    DEPTH_MATCHED,
    ESTIMATOR_NAMES,
    FAMILIES,
    GD_ETAS,
    GROUP_AS,
    LASSO_ALPHAS,
    PTO_FIXED_ETAS,
    RIDGE_LAMBDAS,
    SCALE_FREE_CS,
    Combo,
    Family,
    PtOGroups,
    Tuned,
    choose,
    depth_matched_predictions,
    estimator_table,
    eval_prompts,
    make_family,
    resolve_names,
    risk_rows,
    tune_and_predict,
    tune_grid,
    tuned_predictions,
    val_risk,
)

__all__ = [
    "BAYES_MIN_SIGMA", "DEPTH_MATCHED", "ESTIMATOR_NAMES", "GUARDS", "GUARD_C", "STABLE_LIMIT", "FAMILIES", "GD_ETAS", "GROUP_AS", "LASSO_ALPHAS", "PTO_FIXED_ETAS",
    "RIDGE_LAMBDAS", "SCALE_FREE_CS", "STEP_RULES", "Combo", "Family", "PrefixStats", "PtOGroups", "Spectrum",
    "Tuned", "bayes", "choose", "depth_matched_predictions", "estimator_table", "eval_prompts", "gd", "group_slices", "lasso", "make_family",
    "ols", "oracle_ls", "pto", "pto_groups", "resolve_names", "ridge", "risk_rows", "tune_and_predict", "tune_grid",
    "tuned_predictions", "val_risk", "zero",
]
