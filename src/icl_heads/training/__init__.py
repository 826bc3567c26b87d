"""Training: one loop for one model or a stack of models (:mod:`.loop`), its schedule
(:mod:`.schedule`), what to train (:mod:`.spec`), the resumable state (:mod:`.state`) and many
models at once (:mod:`.parallel`). ``from icl_heads.training import train, ...`` is the public path."""

from .loop import (Batch, One, Stack, clip_per_member, cuda_fast_math, fine_tune, init_stack, is_finished,
                   optimizer_for, run_steps, save_snapshot, stack_step, train, train_stack, train_step)
from .parallel import train_members, train_separately
from .schedule import (EVAL_STREAM, curriculum, lr_at, marker_names, marker_ns, snapshot_dir, snapshot_steps,
                       train_prompts)
from .spec import (Member, TrainResult, TrainSpec, arch_key, group_stacks, members_for, resolve_spec, run_meta,
                   stack_dir_for)
from .state import make_optimizer, param_groups

__all__ = ["Batch", "EVAL_STREAM", "Member", "One", "Stack", "TrainResult", "TrainSpec", "arch_key", "clip_per_member",
           "cuda_fast_math", "curriculum", "fine_tune", "group_stacks", "init_stack", "is_finished", "lr_at",
           "make_optimizer", "marker_names", "marker_ns", "members_for", "optimizer_for", "param_groups",
           "resolve_spec", "run_meta",
           "run_steps", "save_snapshot", "snapshot_dir", "snapshot_steps", "stack_dir_for", "stack_step", "train",
           "train_members", "train_separately", "train_prompts", "train_stack", "train_step"]
