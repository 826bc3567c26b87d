"""Training: schedule, curriculum, checkpoints (round trip, corruption), bit-identical resume, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from icl_heads import cli
from icl_heads.checkpoint import CheckpointError, load_model, save_checkpoint
from icl_heads.config import ConfigError, TrainConfig, get_preset
from icl_heads.evaluation import evaluate
from icl_heads.tasks import fixed_prompts, generator
from icl_heads.training import TrainSpec, curriculum, is_finished, lr_at, train, train_prompts

torch.set_num_threads(1)


def tiny(steps: int = 24, **train_over: object):
    """A smoke preset shrunk to run in about a second."""
    over = {"train.steps": steps, "train.warmup_steps": 4, "train.eval_every": 8, "train.checkpoint_every": 8,
            "train.n_eval_prompts": 32, "train.batch_size": 16, "model.d_model": 16, "eval.n_test": 64, "eval.n_val": 64}
    over.update({f"train.{k}": v for k, v in train_over.items()})
    return get_preset("smoke", **over)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=1000, batch_size=8, lr=1e-2, warmup_steps=100, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-2)
    mid = 100 + 900 // 2  # cosine half-way: the mean of the peak and the floor
    assert lr_at(mid, cfg) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert lr_at(1000, cfg) == pytest.approx(1e-3)
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_curriculum_ramps_n_and_d() -> None:
    task = get_preset("quick").task
    cfg = TrainConfig(steps=1000, batch_size=8, lr=1e-3, curriculum=True, curriculum_d=True,
                      curriculum_start_frac=0.25, curriculum_steps_frac=0.5)
    seq = [curriculum(s, cfg, task) for s in range(1000)]
    assert seq[0] == (math.ceil(0.25 * task.n_max), math.ceil(0.25 * task.d))
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(seq, seq[1:]))
    assert seq[500] == (task.n_max, task.d) and seq[250] < (task.n_max, task.d)  # full size from 50% of the run
    assert curriculum(0, cfg.model_copy(update={"curriculum": False, "curriculum_d": False}), task) == (task.n_max, task.d)
    # curriculum over d: trailing coordinates are zero, labels still follow y = <w, x> + noise
    p = train_prompts(task, 64, generator(0, "train"), n=7, d=3)
    assert p.x.shape == (64, 8, task.d) and (p.x[..., 3:] == 0).all() and (p.w[:, 3:] == 0).all()
    torch.testing.assert_close(p.f, torch.einsum("bnd,bd->bn", p.x, p.w))
    assert ((p.w != 0).sum(1) == min(task.s, 3)).all()


def test_training_reduces_risk_and_logs(tmp_path: Path) -> None:
    p = get_preset("smoke", **{"train.steps": 200, "train.eval_every": 50, "train.n_eval_prompts": 64})
    spec = TrainSpec.from_preset(p, 2)
    val = fixed_prompts(p.task, 256, 5, "test")
    torch.manual_seed(0)
    from icl_heads.model import Transformer

    d = p.task.d
    before = evaluate(Transformer(spec.model), val, p.task).risk_norm[d:].mean()  # ~1: predicts ~0
    r = train(p, 2, tmp_path / "m", progress=False)
    after = evaluate(r.model, val, p.task).risk_norm[d:].mean()
    assert after < 0.7 * before
    rows = list(csv.DictReader(open(tmp_path / "m" / "train_log.csv")))
    assert [int(x["step"]) for x in rows] == [50, 100, 150, 200]
    assert r.meta["finished"] and r.meta["step"] == 200 and is_finished(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists()


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    r = train(tiny(steps=8), 2, tmp_path / "m", progress=False)
    model, meta = load_model(tmp_path / "m")
    assert weights_equal(model, r.model) and meta["step"] == 8
    model.train(r.model.training)  # the same pass: an evaluation pass computes the last block's query rows only
    x = torch.randn(3, 11, 5)
    y = torch.randn(3, 11)
    assert torch.equal(model(x, y), r.model(x, y))
    assert torch.equal(model.head_gates, r.model.head_gates)


def test_resume_after_interrupt_is_bit_identical(tmp_path: Path) -> None:
    p = tiny(steps=24)
    full = train(p, 2, tmp_path / "full", progress=False)
    part = train(p, 2, tmp_path / "cut", progress=False, stop_at=13)  # not a checkpoint multiple
    assert not part.meta["finished"] and part.meta["step"] == 13
    assert not weights_equal(part.model, full.model)
    resumed = train(p, 2, tmp_path / "cut", resume=True, progress=False)
    assert resumed.meta["finished"] and weights_equal(resumed.model, full.model)
    # and the comparison has power: another seed ends elsewhere
    other = train(get_preset("smoke", **{**_tiny_over(24), "seed": 1}), 2, tmp_path / "s1", progress=False)
    assert not weights_equal(other.model, full.model)


def test_attention_only_resume_is_bit_identical(tmp_path: Path) -> None:
    """The quick models (A, D) have no MLP: their unused ``ln_2`` gets no gradient and no optimizer
    state, which the resume check must accept (it refused every attention-only run)."""
    p = get_preset("smoke", **{**_tiny_over(24), "model.mlp": False})
    full = train(p, 2, tmp_path / "full", progress=False)
    train(p, 2, tmp_path / "cut", progress=False, stop_at=13)
    resumed = train(p, 2, tmp_path / "cut", resume=True, progress=False)
    assert resumed.meta["finished"] and weights_equal(resumed.model, full.model)


def test_resume_refuses_a_state_without_an_adam_moment(tmp_path: Path) -> None:
    """A state file (checksum matching) whose optimizer entry lacks ``exp_avg_sq``: one CheckpointError
    naming the file, not a KeyError from inside AdamW's step."""
    from safetensors.torch import load_file, save as st_save

    from icl_heads.io import sha256s, write_files_then_meta

    p = tiny(steps=8)
    train(p, 2, tmp_path / "m", progress=False, stop_at=4)
    tensors = load_file(tmp_path / "m" / "state.safetensors")
    name = next(k for k in tensors if k.endswith(".exp_avg_sq"))
    data = st_save({k: v for k, v in tensors.items() if k != name})
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    write_files_then_meta(tmp_path / "m", {"state.safetensors": data}, "meta.json",
                          {**meta, "sha256": {**meta["sha256"], **sha256s({"state.safetensors": data})}})
    with pytest.raises(CheckpointError, match="state.safetensors: optimizer/RNG state does not fit this model"):
        train(p, 2, tmp_path / "m", resume=True, progress=False)


def _tiny_over(steps: int) -> dict[str, object]:
    return {"train.steps": steps, "train.warmup_steps": 4, "train.eval_every": 8, "train.checkpoint_every": 8,
            "train.n_eval_prompts": 32, "train.batch_size": 16, "model.d_model": 16}


def test_resume_refuses_other_config_and_overwrite(tmp_path: Path) -> None:
    p = tiny(steps=8)
    train(p, 2, tmp_path / "m", progress=False)
    with pytest.raises(ConfigError, match="^out: .*--resume"):
        train(p, 2, tmp_path / "m", progress=False)
    with pytest.raises(ConfigError, match=r"^train\.lr: the checkpoint in .* was made with 0\.003, not 0\.001"):
        train(tiny(steps=8, lr=1e-3), 2, tmp_path / "m", resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"^model_config\.n_heads: .* made with 2, not 1"):
        train(p, 1, tmp_path / "m", resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"^train\.steps: .* at step 8 already \(got 4\); .*not shortened"):
        train(tiny(steps=4), 2, tmp_path / "m", resume=True, progress=False)


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    """``train.steps`` may grow on resume (issue 26): a finished 8-step run continues to 16 steps, is finished
    again, and its first 8 steps' history is the original one."""
    first = train(tiny(steps=8), 2, tmp_path / "m", progress=False)
    assert first.meta["finished"] and first.meta["step"] == 8
    more = train(tiny(steps=16), 2, tmp_path / "m", resume=True, progress=False)
    assert more.meta["finished"] and more.meta["step"] == 16 and more.meta["train"]["steps"] == 16
    assert more.meta["history"][0] == first.meta["history"][0]
    assert not weights_equal(first.model, more.model)


def test_a_diverged_run_stops_unfinished_and_keeps_its_last_finite_checkpoint(tmp_path: Path) -> None:
    """A loss that turns NaN/inf stops the run with one line (issue 26): no checkpoint of the diverged weights,
    nothing marked finished; a checkpoint written before the blow-up stays as it was."""
    with pytest.raises(ConfigError, match=r"^train: the loss became non-finite by step \d+ .*no checkpoint was written"):
        train(tiny(steps=16, lr=1e30, warmup_steps=1), 1, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "meta.json").exists()
    ok = tmp_path / "b"
    train(tiny(steps=16), 1, ok, progress=False, stop_at=8)
    before = (ok / "model.safetensors").read_bytes()
    with torch.no_grad():  # a model that already holds a NaN: the next checkpoint would save it
        from icl_heads.checkpoint import CheckpointError, load_model, save_checkpoint

        model, meta = load_model(ok)
        model.read_in.weight[0, 0] = float("nan")
        with pytest.raises(CheckpointError, match="read_in.weight holds 1 non-finite"):
            save_checkpoint(tmp_path / "c", model, meta)
    assert not (tmp_path / "c").exists() and (ok / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncate_model", "flip_model", "truncate_state", "meta_json", "no_meta"])
def test_damaged_checkpoint_gives_checkpoint_error(tmp_path: Path, damage: str) -> None:
    p = tiny(steps=8)
    train(p, 2, tmp_path / "m", progress=False, stop_at=4)
    ck = tmp_path / "m"
    if damage == "truncate_model":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip_model":
        data = bytearray((ck / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (ck / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_state":
        data = (ck / "state.safetensors").read_bytes()
        (ck / "state.safetensors").write_bytes(data[:100])
    elif damage == "meta_json":
        (ck / "meta.json").write_text('{"model_config": ')
    else:
        (ck / "meta.json").unlink()
    with pytest.raises(CheckpointError):
        if damage == "no_meta":
            load_model(ck)
        else:
            train(p, 2, ck, resume=True, progress=False)


def test_checkpoint_without_sha_but_garbage_is_still_caught(tmp_path: Path) -> None:
    """Even without a recorded digest, an unreadable tensor file is a CheckpointError, not a crash."""
    r = train(tiny(steps=4), 1, tmp_path / "m", progress=False)
    save_checkpoint(tmp_path / "n", r.model, {"step": 4})
    meta = (tmp_path / "n" / "meta.json").read_text().replace('"sha256"', '"unused"')
    (tmp_path / "n" / "meta.json").write_text(meta)
    (tmp_path / "n" / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "n")


@pytest.mark.slow  # end-to-end
def test_cli_train_eval_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """smoke preset, shortened: CLI train and eval, then E1 (run_e1) with three estimators."""
    out = tmp_path / "t"
    cli.main(["train", "--preset", "smoke", "--heads", "2", "--out", str(out), "--steps", "20", "--device", "cpu",
              "--quiet"])
    assert is_finished(out)
    cli.main(["eval", str(out / ""), "--out", str(tmp_path / "ev"), "--device", "cpu", "--prompts", "100"])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "risk.csv")))
    assert [int(r["n"]) for r in rows] == list(range(11))
    assert all(float(r["ci_low"]) <= float(r["risk_norm"]) <= float(r["ci_high"]) for r in rows)
    assert (tmp_path / "ev" / "risk.png").stat().st_size > 0 and (tmp_path / "ev" / "config.json").exists()

    e1 = tmp_path / "e1"
    from icl_heads.experiments.heads_sweep import run_e1, train_models

    small = get_preset("smoke", **{**_tiny_over(16), "eval.n_val": 64, "eval.n_test": 64})
    summary = run_e1(small, e1, "cpu", workers=1, estimators=("ridge", "lasso", "bayes"))
    assert set(summary["ratio_to_bayes"]) == {"transformer h=1", "transformer h=2"}
    rows = list(csv.DictReader(open(e1 / "e1_heads.csv")))
    labels = {r["label"] for r in rows}
    assert {"transformer h=1", "transformer h=2", "ridge", "lasso", "bayes"} <= labels
    for lab in labels:
        assert sorted(int(r["n"]) for r in rows if r["label"] == lab) == list(range(1, 11))
    assert (e1 / "e1_heads.png").exists() and (e1 / "summary.json").exists()
    # a finished model is reused, not retrained
    mtime = (e1 / "models" / "h1" / "model.safetensors").stat().st_mtime_ns
    info = train_models(small, e1, "cpu")
    assert info[1]["reused"] and (e1 / "models" / "h1" / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("args,field", [
    (["train", "--preset", "smoke", "--heads", "3", "--out", "X"], "heads"),
    (["train", "--preset", "smoke", "--heads", "2", "--out", "X", "--device", "tpu"], "device"),
    (["train", "--preset", "smoke", "--heads", "2", "--out", "X", "--steps", "0"], "train.steps"),
    (["sweep-heads", "--preset", "nope", "--out", "X"], "preset"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                          field: str) -> None:
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {field}") and "\n" not in err


def test_eval_of_non_checkpoint_is_checkpoint_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert e.value.code == 2 and "not a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("steps,k,want", [
    (8000, 8, [62, 125, 250, 500, 1000, 2000, 4000, 8000]),  # 8000 // 2**(7-i)
    (300, 4, [37, 75, 150, 300]),
    (24, 8, [1, 2, 3, 4, 5, 6, 12, 24]),  # 0, 0, 0, 1, 3, 6, 12, 24 pushed apart
    (5, 8, [1, 2, 3, 4, 5]),
    (10, 1, [10]),
    (10, 0, []),
])
def test_snapshot_steps_hand_computed(steps: int, k: int, want: list[int]) -> None:
    from icl_heads.training import snapshot_steps

    got = snapshot_steps(TrainConfig(steps=steps, batch_size=8, lr=1e-3, snapshots=k))
    assert got == want


def test_snapshot_steps_are_distinct_increasing_and_end_at_steps() -> None:
    from icl_heads.training import snapshot_steps

    for steps in (1, 2, 7, 9, 50, 129, 1000):
        for k in range(1, 12):
            got = snapshot_steps(TrainConfig(steps=steps, batch_size=8, lr=1e-3, snapshots=k))
            assert len(got) == min(k, steps) and got[-1] == steps and got[0] >= 1
            assert all(a < b for a, b in zip(got, got[1:]))


def _snapshot_files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / "snapshots").rglob("*")) if f.is_file()}


def test_snapshots_written_at_planned_steps_and_resume_identical(tmp_path: Path) -> None:
    from icl_heads.training import snapshot_dir, snapshot_steps

    p = tiny(steps=24, snapshots=5)
    plan = snapshot_steps(p.train)
    assert plan == [1, 3, 6, 12, 24]
    full = train(p, 2, tmp_path / "full", progress=False)
    dirs = sorted(d.name for d in (tmp_path / "full" / "snapshots").iterdir())
    assert dirs == [f"step{s:06d}" for s in plan]
    last, meta = load_model(snapshot_dir(tmp_path / "full", 24))
    assert weights_equal(last, full.model) and meta["step"] == 24 and meta["seed"] == p.seed
    assert meta["preset"] == "smoke" and meta["task"] == p.task.model_dump() and not is_finished(snapshot_dir(tmp_path / "full", 24))
    first, _ = load_model(snapshot_dir(tmp_path / "full", 1))
    assert not weights_equal(first, full.model)
    assert not (snapshot_dir(tmp_path / "full", 1) / "state.safetensors").exists()  # no optimizer state
    # interrupted at 7 (after the step-6 snapshot), resumed: the same bytes in every snapshot file
    train(p, 2, tmp_path / "cut", progress=False, stop_at=7)
    assert sorted(d.name for d in (tmp_path / "cut" / "snapshots").iterdir()) == [f"step{s:06d}" for s in plan[:3]]
    kept = (snapshot_dir(tmp_path / "cut", 3) / "model.safetensors").stat().st_mtime_ns
    train(p, 2, tmp_path / "cut", resume=True, progress=False)
    assert _snapshot_files(tmp_path / "cut") == _snapshot_files(tmp_path / "full")
    assert (snapshot_dir(tmp_path / "cut", 3) / "model.safetensors").stat().st_mtime_ns == kept
    cli.main(["eval", str(snapshot_dir(tmp_path / "cut", 6)), "--out", str(tmp_path / "ev"), "--device", "cpu",
              "--prompts", "20"])
    assert len(list(csv.DictReader(open(tmp_path / "ev" / "risk.csv")))) == p.task.n_max + 1


def test_cuda_fast_math_sets_tf32_only_inside_and_only_for_cuda() -> None:
    """The flag flip needs no GPU: TF32 ("high") inside the CUDA context, the previous value after."""
    from icl_heads.training import cuda_fast_math

    before = torch.get_float32_matmul_precision()
    with cuda_fast_math("cpu"):
        assert torch.get_float32_matmul_precision() == before
    with cuda_fast_math("cuda:0"):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == before
