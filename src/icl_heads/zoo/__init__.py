"""The model zoo: converged reference models shipped in the repository (``zoo/``, ``zoo/README.md``).

:mod:`.registry` what the zoo holds and where (configurations, recipes, paths; ``$ICL_HEADS_ZOO``),
:mod:`.convergence` the last-doubling test, :mod:`.export` models into the zoo and its checksums,
:mod:`.machine` the CPU a model was trained on, :mod:`.train` training what is missing (fixed-length
and accumulating recipes), :mod:`.cards` the model cards (``zoo/README.md``), :mod:`.reproduce` the main
job on the zoo (E1-E7 per configuration and the factor table). ``from icl_heads.zoo import ...`` gives
the first five's public names; cards and the main job are imported from their modules (they pull in
the estimators, the experiments and the report).
"""

from .convergence import CONVERGENCE_TOL, compare_models, convergence, model_errors, snapshot_errors
from .export import SUMS_FILE, add_snapshots, export, export_cooldown, read_sums, verify, write_sums
from .machine import CPU_CLOCK, cpu_kernels, cpu_seconds, cpu_vendor, machine
from .registry import (CONFIGS, STATE_DIR, ZOO_DIR, ZOO_ENV, ZooConfig, available, complete_seeds, cooldown_dir,
                       cooldown_preset, cooldown_steps, default_zoo_dir, get_config, listing, main_job_configs,
                       member_status, milestones, model_path, require_zoo, spec_of, stable_preset, state_path)
from .train import accumulate_zoo, train_zoo

__all__ = ["CONFIGS", "CONVERGENCE_TOL", "CPU_CLOCK", "STATE_DIR", "SUMS_FILE", "ZOO_DIR", "ZOO_ENV", "ZooConfig",
           "accumulate_zoo", "add_snapshots", "available", "compare_models", "complete_seeds", "convergence", "cooldown_dir",
           "cooldown_preset", "cooldown_steps", "cpu_kernels", "cpu_seconds", "cpu_vendor", "default_zoo_dir",
           "export", "export_cooldown", "get_config", "listing", "machine", "main_job_configs", "member_status",
           "milestones", "model_errors", "model_path", "read_sums", "require_zoo", "snapshot_errors", "spec_of", "stable_preset",
           "state_path", "train_zoo", "verify", "write_sums"]
