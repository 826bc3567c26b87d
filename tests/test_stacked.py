"""Stacked training: a stack step equals each member's own step; resume; checkpoints; grouping."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icl_heads import cli
from icl_heads.checkpoint import load_model
from icl_heads.config import ConfigError, get_preset
from icl_heads.evaluation import evaluate
from icl_heads.model import Transformer
from icl_heads.model.stacked import StackedTransformer
from icl_heads.training import (Member, clip_per_member, group_stacks, members_for, stack_dir_for, train_members,
                                train_stack)
from icl_heads.tasks import fixed_prompts, generator, sample_prompts, stream_seed
from icl_heads.training import TrainSpec, is_finished, snapshot_steps, train

torch.set_num_threads(1)

TINY = {"train.steps": 24, "train.warmup_steps": 4, "train.eval_every": 8, "train.checkpoint_every": 8,
        "train.n_eval_prompts": 32, "train.batch_size": 16, "model.d_model": 16}


def tiny(**over: object):
    return get_preset("smoke", **{**TINY, **over})


def state_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stacked_forward_and_loss_equal_each_member() -> None:
    """Members with head counts 1, 2, 4 (and two seeds) in one stack; different prompts per member."""
    p = tiny()
    members = members_for(p, [1, 2, 4], [0, 3], lambda s, h: Path(f"s{s}h{h}"))
    models = []
    for m in members:
        torch.manual_seed(stream_seed(m.spec.seed, "init"))
        models.append(Transformer(m.spec.model))
    stack = StackedTransformer(models)
    assert [g[0] for g in stack.groups] == [1, 2, 4, 1, 2, 4]
    prompts = [sample_prompts(p.task, 8, generator(i, "train")) for i in range(len(members))]
    x, y = torch.stack([q.x for q in prompts]), torch.stack([q.y for q in prompts])
    pred = stack(x, y)
    assert pred.shape == (6, 8, p.task.n_max + 1)
    losses = (pred - y).pow(2).mean(dim=(1, 2))
    for i, (m, q) in enumerate(zip(models, prompts)):
        torch.testing.assert_close(pred[i], m(q.x, q.y))
        torch.testing.assert_close(losses[i], F.mse_loss(m(q.x, q.y), q.y))


def test_per_member_clipping_matches_clip_grad_norm() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    stacked = [torch.stack([a.weight, b.weight]).detach().requires_grad_(), torch.stack([a.bias, b.bias]).detach().requires_grad_()]
    ga, gb = [torch.randn(2, 3), torch.randn(2)], [10 * torch.randn(2, 3), 10 * torch.randn(2)]
    stacked[0].grad, stacked[1].grad = torch.stack([ga[0], gb[0]]), torch.stack([ga[1], gb[1]])
    a.weight.grad, a.bias.grad, b.weight.grad, b.bias.grad = ga[0].clone(), ga[1].clone(), gb[0].clone(), gb[1].clone()
    norms = clip_per_member(stacked, 1.0)
    want = [torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0) for m in (a, b)]
    torch.testing.assert_close(norms, torch.stack(want))
    for i, m in enumerate((a, b)):
        torch.testing.assert_close(stacked[0].grad[i], m.weight.grad)
        torch.testing.assert_close(stacked[1].grad[i], m.bias.grad)


@pytest.mark.parametrize("grad_clip", [1.0, 1e-3])  # 1e-3: every member is clipped, each by its own norm
def test_one_stacked_step_equals_separate_steps(tmp_path: Path, grad_clip: float) -> None:
    p = tiny(**{"train.grad_clip": grad_clip})
    members = members_for(p, [1, 2, 4], [0, 1], lambda s, h: tmp_path / "stack" / f"s{s}" / f"h{h}")
    res = train_stack(members, tmp_path / "st", progress=False, stop_at=2)
    for m, r in zip(members, res):
        alone = train(m.spec, None, tmp_path / "alone" / f"s{m.spec.seed}h{m.spec.model.n_heads}", progress=False,
                      stop_at=2)
        assert r.meta["step"] == 2 and not r.meta["finished"]
        state_close(r.model, alone.model)


def test_stack_of_200_smoke_steps_matches_separate_training(tmp_path: Path) -> None:
    p = get_preset("smoke", **{"train.steps": 200, "train.n_eval_prompts": 64})
    members = members_for(p, [1, 2], [0], lambda s, h: tmp_path / "st" / f"h{h}")
    res = train_members(members, "cpu", stacked=True, progress=False)
    assert res["stacked"] and all(is_finished(m.out) for m in members)
    test = fixed_prompts(p.task, 400, p.seed, "test")
    for m in members:
        stacked_model, meta = load_model(m.out)
        alone = train(m.spec, None, tmp_path / "alone" / m.out.name, progress=False)
        a, b = evaluate(stacked_model, test, p.task).risk_norm, evaluate(alone.model, test, p.task).risk_norm
        assert a[p.task.d] < 0.9  # it learned something (an untrained model is at ~1)
        assert (abs(a - b) / b)[1:].max() < 0.02
        assert [r["step"] for r in meta["history"]] == [100, 200] == [r["step"] for r in alone.history]


def test_stack_resume_is_bit_identical_and_members_evaluate(tmp_path: Path) -> None:
    p = tiny(**{"train.snapshots": 4})
    def mk(root: str) -> list[Member]:
        return members_for(p, [1, 2], [0, 1], lambda s, h: tmp_path / root / f"s{s}" / f"h{h}")

    full = train_stack(mk("full"), tmp_path / "full" / "stack", progress=False)
    cut = train_stack(mk("cut"), tmp_path / "cut" / "stack", progress=False, stop_at=13)
    assert all(r.meta["step"] == 13 and not r.meta["finished"] for r in cut)
    assert not weights_equal(cut[0].model, full[0].model)
    with pytest.raises(ConfigError, match="^out: .*stack checkpoint"):
        train_stack(mk("cut"), tmp_path / "cut" / "stack", resume=False, progress=False)
    with pytest.raises(ConfigError, match="^resume: .*different members"):
        train_stack(mk("cut")[:3], tmp_path / "cut" / "stack", progress=False)
    resumed = train_stack(mk("cut"), tmp_path / "cut" / "stack", progress=False)
    for a, b in zip(resumed, full):
        assert a.meta["finished"] and weights_equal(a.model, b.model)
        rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in a.history]
        assert rows == [{k: v for k, v in r.items() if k != "wall_s"} for r in b.history]
        snaps = sorted(x.name for x in (a.path / "snapshots").iterdir())
        assert snaps == [f"step{s:06d}" for s in snapshot_steps(p.train)]
        for s in snaps:
            for f in ("model.safetensors", "meta.json"):
                assert (a.path / "snapshots" / s / f).read_bytes() == (b.path / "snapshots" / s / f).read_bytes()
    # a member is a normal checkpoint: the eval command reads it
    ck = tmp_path / "cut" / "s1" / "h2"
    cli.main(["eval", str(ck), "--out", str(tmp_path / "ev"), "--device", "cpu", "--prompts", "50"])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "risk.csv")))
    model, meta = load_model(ck)
    want = evaluate(model, fixed_prompts(p.task, 50, 1, "test"), p.task).risk_norm
    torch.testing.assert_close(torch.tensor([float(r["risk_norm"]) for r in rows], dtype=torch.float64),
                               torch.as_tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert meta["seed"] == 1 and meta["model_config"]["n_heads"] == 2 and (ck / "train_log.csv").exists()


def test_group_stacks_and_refusals(tmp_path: Path) -> None:
    a = members_for(tiny(), [1, 2], [0, 1], lambda s, h: tmp_path / f"a{s}{h}")
    b = members_for(tiny(**{"model.n_layers": 3}), [2], [0], lambda s, h: tmp_path / f"b{s}{h}")
    c = members_for(tiny(**{"model.mlp": False}), [1], [0], lambda s, h: tmp_path / f"c{s}{h}")
    groups = group_stacks([a[0], b[0], a[1], c[0], a[2], a[3]])
    assert groups == [[a[0], a[1], a[2], a[3]], b, c]
    assert stack_dir_for(a, tmp_path) == stack_dir_for(list(a), tmp_path) != stack_dir_for(a[:2], tmp_path)
    with pytest.raises(ConfigError, match="^stack: members differ"):
        train_stack(a + b, tmp_path / "st", progress=False)
    with pytest.raises(ConfigError, match="^stack: two members share"):
        train_stack([a[0], Member(a[1].spec, a[0].out)], tmp_path / "st", progress=False)
    train(a[0].spec, None, a[0].out, progress=False, stop_at=1)
    with pytest.raises(ConfigError, match="^out: .*not from this stack"):
        train_stack(a, tmp_path / "st2", progress=False)


def test_train_members_groups_architectures_and_reuses(tmp_path: Path) -> None:
    p = tiny(**{"train.steps": 8})
    ms = members_for(p, [1, 2], [0], lambda s, h: tmp_path / "L2" / f"h{h}")
    ms += members_for(tiny(**{"train.steps": 8, "model.n_layers": 1}), [2], [0], lambda s, h: tmp_path / "L1" / f"h{h}")
    info = train_members(ms, "cpu", stacked=True, progress=False)
    stacks = {v["stack"] for v in info["members"].values()}
    assert len(stacks) == 2 and all(Path(s).parent == tmp_path / "stacks" for s in stacks)
    assert all(is_finished(m.out) for m in ms)
    again = train_members(ms, "cpu", stacked=True, progress=False)
    assert all(v["reused"] for v in again["members"].values())
    spec = TrainSpec.from_preset(p, 2)
    assert load_model(ms[1].out)[1]["train"] == spec.train.model_dump()


@pytest.mark.parametrize("args,field", [
    (["--layers", "0"], "layers"),
    (["--layers", "a,b"], "layers"),
    (["--mlp", "2"], "mlp"),
    (["--heads", "3"], "heads"),
    (["--set", "train.steps=0"], "train.steps"),
])
def test_sweep_arch_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str], field: str) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep-arch", "--preset", "smoke", "--out", str(tmp_path / "o"), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: {field}") and "\n" not in err


def test_e1_train_models_stacked_on_request(tmp_path: Path) -> None:
    from icl_heads.experiments.heads_sweep import default_stacked, model_dir, train_models

    assert default_stacked("cuda") and default_stacked("cuda:1") and not default_stacked("cpu")
    p = tiny(**{"train.steps": 8})
    info = train_models(p, tmp_path, "cpu", stacked=True)
    for h in p.heads:
        assert info[h]["stacked"] and Path(info[h]["stack"]).parent == tmp_path / "models" / "stacks"
        meta = load_model(model_dir(tmp_path, h))[1]
        assert meta["finished"] and meta["model_config"]["n_heads"] == h
    assert all(train_models(p, tmp_path, "cpu", stacked=True)[h]["reused"] for h in p.heads)


@pytest.mark.parametrize("over", [
    {"model.token_format": "interleaved", "model.mlp": True},  # zoo configuration C
    {"model.mlp": False},  # configurations A
    {"model.attention": "linear"},
    {"model.layer_norm": False},
    {"model.pos_emb": False, "model.mlp": False},
    {"model.token_format": "interleaved", "model.attention": "linear", "model.layer_norm": False},
])
def test_stacked_forward_equals_each_member_for_every_option(over: dict) -> None:
    p = tiny(**over)
    members = members_for(p, [1, 2], [0, 1], lambda s, h: Path(f"s{s}h{h}"))
    models = []
    for m in members:
        torch.manual_seed(stream_seed(m.spec.seed, "init"))
        models.append(Transformer(m.spec.model))
    stack = StackedTransformer(models)
    prompts = [sample_prompts(p.task, 8, generator(i, "train")) for i in range(len(members))]
    x, y = torch.stack([q.x for q in prompts]), torch.stack([q.y for q in prompts])
    pred = stack(x, y)
    for i, (m, q) in enumerate(zip(models, prompts)):
        torch.testing.assert_close(pred[i], m(q.x, q.y))
