"""Training that accumulates (issue 23): the wsd schedule, extendable runs, cool-down branches, deadlines."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from icl_heads.checkpoint import load_model
from icl_heads.config import ConfigError, TrainConfig, get_preset
from icl_heads.training import curriculum, lr_at, train

torch.set_num_threads(1)


def tiny(steps: int, **train_over: object):
    over = {"train.steps": steps, "train.warmup_steps": 4, "train.eval_every": 8, "train.checkpoint_every": 8,
            "train.n_eval_prompts": 32, "train.batch_size": 16, "model.d_model": 16, "train.schedule": "wsd",
            "train.curriculum": True, "train.curriculum_ramp_steps": 20}
    over.update({f"train.{k}": v for k, v in train_over.items()})
    return get_preset("smoke", **over)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_wsd_is_constant_after_warmup_and_a_cooldown_decays_linearly_to_zero() -> None:
    stable = TrainConfig(steps=1000, batch_size=8, lr=1e-2, warmup_steps=100, schedule="wsd")
    assert lr_at(99, stable) == pytest.approx(1e-2)
    assert lr_at(500, stable) == lr_at(999, stable) == lr_at(10**6, stable) == 1e-2
    branch = stable.model_copy(update={"steps": 1200, "cooldown_from": 1000})
    assert lr_at(999, branch) == 1e-2
    assert lr_at(1000, branch) == pytest.approx(1e-2)
    assert lr_at(1100, branch) == pytest.approx(0.5e-2)
    assert lr_at(1199, branch) == pytest.approx(1e-2 / 200)


def test_an_absolute_ramp_does_not_depend_on_the_run_length() -> None:
    p16, p64 = (tiny(s).train for s in (16, 64))
    task = tiny(16).task
    assert [curriculum(t, p16, task) for t in range(30)] == [curriculum(t, p64, task) for t in range(30)]


def test_a_cooldown_needs_wsd_and_must_start_before_the_end() -> None:
    with pytest.raises(ValueError, match="cooldown_from"):
        TrainConfig(steps=100, batch_size=8, lr=1e-3, cooldown_from=50)
    with pytest.raises(ValueError, match="cooldown_from"):
        TrainConfig(steps=100, batch_size=8, lr=1e-3, cooldown_from=100, schedule="wsd")


def test_extending_a_wsd_run_equals_training_it_long_in_one_go(tmp_path: Path) -> None:
    whole = train(tiny(40), 2, tmp_path / "whole", progress=False)
    train(tiny(24), 2, tmp_path / "grown", progress=False)  # finished at 24 ...
    grown = train(tiny(40), 2, tmp_path / "grown", progress=False, resume=True)  # ... then extended to 40
    assert grown.meta["step"] == 40 and grown.meta["finished"]
    assert weights_equal(whole.model, grown.model)


def test_a_cooldown_branch_leaves_the_stable_run_untouched_and_is_resumable(tmp_path: Path) -> None:
    train(tiny(24), 2, tmp_path / "stable", progress=False)
    before = digest(tmp_path / "stable")
    branch = tiny(30, cooldown_from=24, snapshots=0)
    full = train(branch, 2, tmp_path / "cool", progress=False, init_from=tmp_path / "stable")
    assert digest(tmp_path / "stable") == before
    assert full.meta["finished"] and full.meta["step"] == 30
    # interrupted branch, resumed: the same weights
    train(branch, 2, tmp_path / "cut", progress=False, init_from=tmp_path / "stable", stop_at=27)
    again = train(branch, 2, tmp_path / "cut", progress=False, resume=True)
    assert weights_equal(full.model, again.model)
    # the stable run, extended after the branch, is what it would have been without the branch
    ext = train(tiny(40), 2, tmp_path / "stable", progress=False, resume=True)
    assert weights_equal(ext.model, train(tiny(40), 2, tmp_path / "ref", progress=False).model)
    # the branch really cooled: its last lr is ~0, not the stable lr
    assert full.meta["history"][-1]["lr"] < 0.2 * branch.train.lr


def test_a_cooldown_from_a_run_at_another_step_is_refused(tmp_path: Path) -> None:
    train(tiny(16), 2, tmp_path / "stable", progress=False)
    with pytest.raises(ConfigError, match="cooldown_from"):
        train(tiny(30, cooldown_from=24), 2, tmp_path / "cool", progress=False, init_from=tmp_path / "stable")


def test_a_deadline_stops_with_a_resumable_checkpoint_and_the_resume_is_identical(tmp_path: Path) -> None:
    cut = train(tiny(40), 2, tmp_path / "cut", progress=False, deadline=time.monotonic())  # stops after step 1
    assert not cut.meta["finished"] and cut.meta["step"] == 1
    done = train(tiny(40), 2, tmp_path / "cut", progress=False, resume=True)
    model, _ = load_model(tmp_path / "cut")
    assert weights_equal(done.model, train(tiny(40), 2, tmp_path / "ref", progress=False).model)
    assert weights_equal(model, done.model)


# --------------------------------------------------------------------------- the zoo trainer (zoo train --minutes)

from icl_heads.checkpoint import load_meta  # noqa: E402
from icl_heads.zoo import ZooConfig, accumulate_zoo, member_status, milestones, model_path  # noqa: E402
from icl_heads.zoo.train import _accumulate_member  # noqa: E402

GROW = ZooConfig("G", "tiny accumulating configuration",
                 {"model.d_model": 16, "train.steps": 16, "train.snapshots": 3, "train.eval_every": 8,
                  "train.checkpoint_every": 8, "train.n_eval_prompts": 32, "eval.n_test": 64, "eval.n_val": 64,
                  "train.batch_size": 16, "train.schedule": "wsd", "train.warmup_steps": 4},
                 seeds=(0,), heads=(2,), base="smoke", max_steps=32, cooldown_frac=0.25)


def test_milestones_double_up_to_the_cap() -> None:
    assert milestones(GROW) == [16, 32]


def test_the_zoo_trainer_exports_each_cooldown_with_its_comparison_and_caps(tmp_path: Path) -> None:
    out = accumulate_zoo([GROW], 10.0, 1, tmp_path / "zoo", tmp_path / "state")
    meta = load_meta(model_path("G", 0, 2, tmp_path / "zoo"))
    z = meta["zoo"]
    conv = z["convergence"]
    assert conv["from_step"] == 16 and conv["to_step"] == 32
    for row in conv["at"].values():  # the improvement is the cool-downs' paired comparison
        assert row["improvement"] == pytest.approx(1 - row["risk"] / row["risk_half"], abs=1e-6)  # float32 means
    # converged: < 3% better at n = d and 2d of the smoke task, and off the plateau (risk at n = d <= 0.5)
    assert conv["plateau"] == (conv["at"]["5"]["risk"] > 0.5)
    decided = all(conv["at"][n]["improvement"] < 0.03 for n in ("5", "10")) and not conv["plateau"]
    assert conv["converged"] == decided
    state = "converged" if decided else "capped"  # the cap is 32 steps: no further doubling either way
    assert out == [f"G/seed0/h2: {state}"]
    assert (z["stable_steps"], z["cooldown_steps"], meta["step"], z["state"]) == (32, 8, 40, state)
    # the state keeps the stable run (resumable) and the two latest cool-downs' weights
    member = tmp_path / "state" / "G" / "seed0" / "h2"
    assert sorted(p.name for p in member.iterdir() if p.is_dir()) == ["cool0000016", "cool0000032", "stable"]
    assert not (member / "cool0000032" / "state.safetensors").exists()
    assert (member / "stable" / "state.safetensors").exists()
    assert member_status(GROW, 0, 2, tmp_path / "zoo") == state


def test_the_zoo_trainer_trains_only_the_head_counts_asked_for(tmp_path: Path) -> None:
    """``zoo train --heads 2``: the h = 2 member grows; the h = 1 member waits (nothing trained or exported)."""
    from dataclasses import replace

    two = replace(GROW, heads=(1, 2), max_steps=16)
    out = accumulate_zoo([two], 10.0, 1, tmp_path / "zoo", tmp_path / "state", heads=(2,))
    assert out == ["G/seed0/h2: capped"] or out == ["G/seed0/h2: converged"]
    assert (model_path("G", 0, 2, tmp_path / "zoo") / "meta.json").exists()
    assert not model_path("G", 0, 1, tmp_path / "zoo").exists()
    assert not (tmp_path / "state" / "G" / "seed0" / "h1").exists()


def test_a_zoo_that_missed_an_export_gets_it_from_the_state_without_retraining(tmp_path: Path) -> None:
    """The state drops a cool-down's optimizer state once it is exported; a zoo folder that never got that
    export (trained into another folder, or restored from git) gets the same model and record from it."""
    import shutil

    state, first, other = tmp_path / "state", tmp_path / "zoo", tmp_path / "elsewhere"
    _accumulate_member(GROW, 0, 2, str(state), str(first), time.time() + 60, 1, upto=16)
    shutil.copytree(first, other)
    _accumulate_member(GROW, 0, 2, str(state), str(other), time.time() + 60, 1, upto=32)  # the 32 export goes there
    assert not (state / "G" / "seed0" / "h2" / "cool0000032" / "state.safetensors").exists()
    _accumulate_member(GROW, 0, 2, str(state), str(first), time.time() + 60, 1, upto=32)  # used to raise
    a, b = (load_model(model_path("G", 0, 2, root))[0] for root in (first, other))
    assert weights_equal(a, b)
    ma, mb = (load_meta(model_path("G", 0, 2, root))["zoo"] for root in (first, other))
    assert ma["stable_steps"] == 32 and ma["convergence"] == mb["convergence"]


def test_the_zoo_trainer_stopped_on_time_again_and_again_ends_with_the_same_weights(tmp_path: Path) -> None:
    accumulate_zoo([GROW], 10.0, 1, tmp_path / "whole", tmp_path / "whole-state")
    calls = 0
    while member_status(GROW, 0, 2, tmp_path / "cut") not in ("capped", "converged"):
        _accumulate_member(GROW, 0, 2, str(tmp_path / "cut-state"), str(tmp_path / "cut"), time.time() + 0.05, 1)
        calls += 1
        assert calls < 200
    assert calls > 2  # it really was cut
    a, _ = load_model(model_path("G", 0, 2, tmp_path / "whole"))
    b, _ = load_model(model_path("G", 0, 2, tmp_path / "cut"))
    assert weights_equal(a, b)
