"""One home for the claim rules: typed keys (:mod:`.keys`), per-seed rules and thresholds
(:mod:`.rules`), and the across-seed rule (:mod:`.across_seeds`). docs/report.md states each rule."""
