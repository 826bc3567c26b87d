"""Re-export of :mod:`icl_heads.claims.across_seeds` (the across-seed rule lives there now)."""

from .claims.across_seeds import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, VERDICTS, Stat, Verdict,  # noqa: F401
                                  across_seeds, decide, power, power_table, summarise, t_and_prediction, t_interval)
