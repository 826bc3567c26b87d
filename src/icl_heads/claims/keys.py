"""Typed keys that select a claim's rows: which model, which read-out, which ablation kind.

Rules never spell a label string ("transformer h=4", "h=4 full", "h4"): they build a
:class:`ModelKey` and ask it for the label each experiment writes, so the producers
(E1, E4, E6) and the rules share one spelling. :func:`select` raises
:class:`ClaimDataError` when a key finds nothing, so a label that misses is an error
naming the file, never an empty list that turns into NaN and a silent "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

# Claims about trained models are decided in the in-context regime the paper plots: context
# lengths n >= d/2 (below that the context says little about w*, and every model is near the
# zero predictor, so those n dilute any difference between heads).
IN_CONTEXT_FRACTION = 0.5


def in_context_n_min(d: int) -> int:
    """The smallest context length of the in-context regime, ``ceil(d/2)`` (at least 1)."""
    return max(1, math.ceil(IN_CONTEXT_FRACTION * d))


class ClaimDataError(LookupError):
    """A claim's selection found no rows (or a file lacks what a rule needs)."""


class Variant(str, Enum):
    """A trained model as analysed: all heads (``full``) or later layers cut to their top head."""

    FULL = "full"
    PRUNED = "pruned"


class Readout(str, Enum):
    """How a (pruned) model's prediction is read: its own read-out, or a ridge probe after the
    last layer on the residual stream before (``probe``) or after (``probe_ln``) the final LayerNorm."""

    MODEL = "model"
    PROBE = "probe"
    PROBE_LN = "probe_ln"


class AblationKind(str, Enum):
    """What a gated-off head outputs (``analysis.ablation``)."""

    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


@dataclass(frozen=True)
class ModelKey:
    """One analysed model: its head count and variant; ``ablation`` only for pruned models."""

    heads: int
    variant: Variant = Variant.FULL
    ablation: AblationKind = AblationKind.ZERO

    def __str__(self) -> str:
        extra = f" ({self.ablation.value})" if self.variant is Variant.PRUNED and self.ablation is not AblationKind.ZERO else ""
        return f"h={self.heads} {self.variant.value}{extra}"

    @property
    def e1_label(self) -> str:
        """Column ``label`` of ``e1_heads.csv`` (only full models are trained)."""
        return f"transformer h={self.heads}"

    @property
    def e4_label(self) -> str:
        """Column ``model`` of ``e4/probes.csv``: ``h=H full``, ``h=H pruned`` (+ `` (kind)``)."""
        return str(self)

    @property
    def e6_label(self) -> str:
        """Column ``model`` of the E6 CSVs."""
        return f"h{self.heads}"


def select(rows: Iterable[Mapping[str, Any]], source: Path | str, what: str, **where: Any) -> list[dict[str, Any]]:
    """Rows whose columns equal ``where`` (enum values compared by value); raise if none match."""
    want = {k: (v.value if isinstance(v, Enum) else str(v)) for k, v in where.items()}
    out = [dict(r) for r in rows if all(str(r.get(k)) == v for k, v in want.items())]
    if not out:
        raise ClaimDataError(f"no rows for {what} in {source}")
    return out
