"""The model zoo: export, checksums, verify, listing, cards, retraining from the recorded recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icl_heads.checkpoint import CheckpointError, load_meta, load_model
from icl_heads.cli import main
from icl_heads.training import snapshot_dir, snapshot_steps, train
from icl_heads.evaluation import predict
from icl_heads.model import act_name
from icl_heads.tasks import fixed_prompts
from icl_heads.zoo import (CONFIGS, ZOO_DIR, ZooConfig, available, cpu_kernels, export, listing, model_path, spec_of,
                           train_zoo, verify, write_sums)
from icl_heads.zoo.cards import card
from icl_heads.experiments.e7_emergence import snapshot_dirs

TINY = ZooConfig("T", "tiny smoke configuration",
                 {"model.d_model": 16, "train.steps": 40, "train.snapshots": 4, "train.eval_every": 20,
                  "train.checkpoint_every": 20, "train.n_eval_prompts": 32, "eval.n_test": 64, "eval.n_val": 64,
                  "train.batch_size": 16},
                 seeds=(0,), heads=(1, 2), base="smoke")


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    work = tmp_path_factory.mktemp("work")
    done = train_zoo([TINY], work, jobs=2, root=root)
    assert len(done) == 2
    return root, work


def test_export_layout_meta_and_snapshots(tiny_zoo):
    root, work = tiny_zoo
    assert sorted(available("T", root)) == [(0, 1), (0, 2)]
    h2, h1 = model_path("T", 0, 2, root), model_path("T", 0, 1, root)
    assert not (h2 / "state.safetensors").exists()  # no optimizer state in the zoo
    # snapshots for the claims' pair (largest and smallest h), not for the head counts between them
    assert (h2 / "snapshots").is_dir() and (h1 / "snapshots").is_dir()
    assert [h for h in (1, 2, 4) if ZooConfig("X", "", {}, (0,), (1, 2, 4)).keeps_snapshots(h)] == [1, 4]
    meta = load_meta(h2)
    assert set(meta["sha256"]) == {"model.safetensors"}
    z = meta["zoo"]
    assert z["config"] == "T" and z["overrides"] == TINY.overrides and z["machine"]
    conv = z["convergence"]
    assert conv["from_step"], conv["to_step"] == snapshot_steps(TINY.preset().train)[-2:]
    assert set(conv["at"]) == {"2", "5", "10"} and isinstance(conv["converged"], bool)
    # the zoo copy predicts exactly what the training run does
    a, _ = load_model(h2)
    b, _ = load_model(work / "T" / "seed0" / "h2")
    x = torch.randn(3, 11, 5)
    y = torch.randn(3, 11)
    assert torch.equal(a(x, y), b(x, y))


def test_convergence_numbers_are_the_test_prompt_risk(tiny_zoo):
    """risk at n in meta equals evaluate() of the final model on the seed's test prompts."""
    from icl_heads.evaluation import evaluate
    from icl_heads.tasks import fixed_prompts

    root, _ = tiny_zoo
    path = model_path("T", 0, 2, root)
    model, meta = load_model(path)
    p = TINY.preset(0)
    curve = evaluate(model, fixed_prompts(p.task, p.eval.n_test, p.seed, "test"), p.task)
    for n, v in meta["zoo"]["convergence"]["at"].items():
        assert v["risk"] == pytest.approx(float(curve.risk_norm[int(n)]), rel=1e-5)


def test_verify_catches_a_flipped_byte(tiny_zoo, tmp_path, capsys):
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo[0], root)
    assert verify(root) > 4
    main(["zoo", "verify", "--root", str(root)])
    assert "zoo ok" in capsys.readouterr().out
    f = model_path("T", 0, 2, root) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["zoo", "verify", "--root", str(root)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checksum mismatch" in err and "h2/model.safetensors" in err
    write_sums(root)  # a new manifest accepts it; an unlisted file is refused
    (root / "T" / "stray.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not listed"):
        verify(root)


def test_retrained_for_k_steps_matches_its_snapshot(tiny_zoo, tmp_path):
    """Training again from scratch with the recorded recipe reproduces the zoo's snapshot at K on CPU."""
    root, _ = tiny_zoo
    path = model_path("T", 0, 2, root)
    spec = spec_of(path)
    torch.set_num_threads(load_meta(path)["zoo"]["threads"])
    assert load_meta(path)["zoo"]["cpu"] == cpu_kernels()  # recorded at export: this machine
    k = snapshot_steps(spec.train)[1]
    r = train(spec, None, tmp_path / "again", "cpu", progress=False, stop_at=k)
    snap, _ = load_model(snapshot_dir(path, k))
    for (name, a), (_, b) in zip(r.model.state_dict().items(), snap.state_dict().items()):
        assert torch.equal(a, b), name


def test_listing_and_cards(tiny_zoo):
    root, _ = tiny_zoo
    rows = listing(root)  # only the shipped configurations are listed; T is a test configuration
    assert rows == [] or {r["config"] for r in rows} <= set(CONFIGS)
    text = card(TINY, root, baselines={"ridge": {2: 0.5, 5: 0.2, 10: 0.1}})
    assert "seed0/h2" in text and "seed0/h1" in text and "*ridge*" in text and "0.2000" in text


@pytest.mark.skipif(not (ZOO_DIR / "SHA256SUMS").exists(), reason="the repository's zoo has no manifest yet")
def test_repository_zoo_verifies():
    assert verify(ZOO_DIR) >= 1


def test_repository_zoo_model_retrains_to_its_first_snapshot(tmp_path):
    """The same check on a committed zoo model (its first snapshot: a few seconds of training)."""
    have = [(c, k, h) for c in CONFIGS for k, h in available(c) if (model_path(c, k, h) / "snapshots").is_dir()]
    if not have:
        pytest.skip("no zoo model with snapshots committed yet")
    c, k, h = sorted(have, key=lambda t: (t[0] != "A", t))[0]
    path = model_path(c, k, h)
    torch.set_num_threads(load_meta(path)["zoo"]["threads"])
    if CONFIGS[c].accumulates:  # the meta holds the cool-down's recipe; the snapshots are the stable run's
        spec, heads = CONFIGS[c].preset(k), h
    else:
        spec, heads = spec_of(path), None
    step = snapshot_dirs(path)[0][0]
    r = train(spec, heads, tmp_path / "again", "cpu", progress=False, stop_at=step)
    snap, _ = load_model(snapshot_dir(path, step))
    if load_meta(path)["zoo"].get("cpu") == cpu_kernels():  # same kernels: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), snap.state_dict().values()))
        return
    # Another CPU's kernels round differently (seen: AVX512 here vs the training machine), and Adam
    # amplifies rounding in near-zero-gradient weights (up to 1e-3 after 125 steps); the function is
    # the same: predictions agree to ~2e-6 relative (measured), a wrong recipe or seed differs by O(1).
    p = fixed_prompts(spec.task, 500, 0, "test")
    a, b = predict(r.model, p), predict(snap, p)
    assert ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt() < 1e-4


def test_set_model_fields_reach_the_trained_model(tmp_path):
    """``--set model.token_format=interleaved`` (and model.mlp, model.n_layers) on train reach the checkpoint."""
    out = tmp_path / "m"
    main(["train", "--preset", "smoke", "--heads", "2", "--out", str(out), "--quiet", "--steps", "3",
          "--set", "model.token_format=interleaved", "--set", "model.mlp=false", "--set", "model.n_layers=1",
          "--set", "train.snapshots=0", "--set", "train.n_eval_prompts=8"])
    model, meta = load_model(out)
    assert model.cfg.token_format == "interleaved" and not model.cfg.mlp and model.cfg.n_layers == 1
    assert meta["model_config"]["token_format"] == "interleaved"
    import json

    assert json.loads((out / "config.json").read_text())["config"]["model"]["token_format"] == "interleaved"
    lay = model.token_layout(11)[0]
    assert lay.token_type.numel() == 2 * 11 - 1  # x and y tokens interleaved


@pytest.mark.slow  # end-to-end
def test_reproduce_on_the_zoo_analyses_its_models_without_training(tiny_zoo, tmp_path):
    """The main job's zoo mode: E1-E7 on the zoo's checkpoints (no training stage), one report per
    configuration, and the factor table naming the configuration's verdicts."""
    from icl_heads.io import read_json
    from icl_heads.zoo.reproduce import reproduce_zoo

    root, _ = tiny_zoo
    out = tmp_path / "run"
    report = reproduce_zoo(out, [TINY], root=root, any_t=False, not_learned=True)  # the tiny models learn nothing
    assert report == out / "report.md" and "| claim | T |" in report.read_text()
    assert "Not in this run: **A** paired tokens" in report.read_text()  # the zoo's own configurations
    man = read_json(out / "T" / "manifest.json")
    assert "train" not in man["stage_wall_s"] and man["models"]["seed0/h2"] == str(model_path("T", 0, 2, root))
    assert not (out / "T" / "seed0" / "e1" / "models").exists()  # nothing trained
    table = read_json(out / "factor_table.json")
    verdicts = read_json(out / "T" / "verdicts.json")
    assert {r["claim"] for r in table} == {v["claim"] for v in verdicts}
    assert (out / "e5" / "stage.json").exists()


@pytest.mark.slow  # end-to-end
def test_zoo_main_job_in_worker_processes_equals_the_serial_run(tiny_zoo, tmp_path):
    """jobs=2 runs each (configuration, seed)'s stages in a worker process first; every number, table
    and verdict equals the serial run's, and the per-configuration run only writes the report."""
    from reference_run import compare, fingerprint

    from icl_heads.io import read_json
    from icl_heads.zoo.reproduce import reproduce_zoo

    root, _ = tiny_zoo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        reproduce_zoo(tmp_path / "serial", [TINY], root=root, any_t=False, not_learned=True)
    finally:
        torch.set_num_threads(threads)
    reproduce_zoo(tmp_path / "jobs", [TINY], root=root, any_t=False, jobs=2, not_learned=True)
    assert compare(fingerprint(tmp_path / "serial"), fingerprint(tmp_path / "jobs"), rtol=1e-12) is None
    walls = read_json(tmp_path / "jobs" / "T" / "manifest.json")["stage_wall_s"]
    assert all(walls[f"seed0/{s}"] > 0 for s in ("e1", "e2", "e3", "e4", "e6", "e7"))


def test_export_refuses_a_run_of_another_recipe(tiny_zoo, tmp_path):
    from icl_heads.config import ConfigError

    _, work = tiny_zoo
    other = ZooConfig("T", "same name, other lr", {**TINY.overrides, "train.lr": 1e-4}, seeds=(0,), heads=(1, 2),
                      base="smoke")
    with pytest.raises(ConfigError, match="recipe"):
        export(work / "T" / "seed0" / "h2", other, 0, 2, tmp_path / "zoo")


def test_high_level_load_gives_model_task_and_float32_prompts(tiny_zoo):
    import icl_heads
    from icl_heads.evaluation import evaluate
    from icl_heads.tasks import fixed_prompts

    root, _ = tiny_zoo
    run = icl_heads.load(model_path("T", 0, 2, root))
    x, y, f = run.prompts(64)
    assert x.dtype == torch.float32 and run.task.d == 5 and run.seed == 0
    assert torch.equal(run.prompt_set(64).x.to(x.dtype), x) and torch.equal(run.prompt_set(64, "val").x, fixed_prompts(run.task, 64, 0, "val").x)
    with torch.no_grad():
        pred, cache = run.model.run_with_cache(x, y, names_filter=[act_name("pattern", 0)], return_cache_object=False)
    ref = evaluate(run.model, fixed_prompts(run.task, 64, 0, "test"), run.task).risk_norm
    assert torch.allclose(run.risk(pred, f).double(), torch.as_tensor(ref, dtype=torch.float64), rtol=1e-4)
    assert act_name("pattern", 0) in cache


def test_emergence_command_runs_e7_on_the_snapshots(tiny_zoo, tmp_path, capsys):
    root, _ = tiny_zoo
    out = tmp_path / "e7"
    main(["emergence", str(model_path("T", 0, 2, root)), "--out", str(out), "--prompts", "40"])
    text = capsys.readouterr().out
    assert "E7 steps" in text and "pruned/full" in text
    assert (out / "emergence.csv").exists() and (out / "summary.json").exists()


def test_factor_sentence_names_the_factor_that_moves_a_verdict():
    from icl_heads.zoo.reproduce import factor_sentence

    s = factor_sentence("1b", {"A": "not reproduced", "B": "reproduced", "C": "reproduced"})
    assert "adding the MLP (A -> B) changes the verdict" in s and "reproduced in B, C" in s
    s = factor_sentence("2a", {"A": "not reproduced", "B": "not reproduced", "C": "inconclusive"})
    assert "leaves it unchanged" in s and "interleaving" not in s
    assert "one configuration only" in factor_sentence("3", {"A": "reproduced"})
    s = factor_sentence("1b", {"A": "not reproduced", "B": "not reproduced", "D": "reproduced"})
    assert "doubling the depth (A -> D) changes the verdict" in s and "MLP" not in s
    s = factor_sentence("2c", {"A": "inconclusive", "B": "inconclusive"})  # both undecided: nothing is decided
    assert "leaves it unchanged" not in s and "no single-factor comparison is decided" in s
    s = factor_sentence("3", dict.fromkeys("ABCD", "reproduced"))
    assert ("adding the MLP (A -> B), interleaving the tokens (B -> C) and doubling the depth (A -> D) "
            "leave it unchanged") in s


def test_the_zoo_stays_under_its_size_cap():
    """Issue 23: the exported zoo under 150 MB (issue 14's 60 MB before configuration E), in MiB (`du` units)."""
    size = sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file())
    assert size < 150 * 2 ** 20, f"zoo is {size / 2 ** 20:.1f} MiB"


def test_pairs_are_handed_out_longest_first():
    """The main job's pair order (LPT): deep and MLP configurations first, seed 0 first within a
    configuration, the short attention-only L = 3 pairs last, so two workers finish close together."""
    from icl_heads.zoo.reproduce import pair_cost

    pairs = [(c, k) for c in CONFIGS.values() for k in range(len(c.seeds))]
    order = [f"{c.name}{k}" for c, k in sorted(pairs, key=lambda ck: -pair_cost(ck[0].preset(), ck[1]))]
    assert order[0] == "D0" and set(order[-8:]) == {f"{c}{k}" for c in "AE" for k in range(1, 5)}, order
    assert order.index("B0") < order.index("B1") < order.index("B2")
    costs = {c.name: pair_cost(c.preset(), 1) for c in CONFIGS.values()}
    assert costs["D"] == 2 * costs["A"] and costs["B"] == costs["C"] > costs["A"]


def test_a_configuration_that_has_not_learned_is_not_analysed_by_default(tiny_zoo, tmp_path):
    """The tiny zoo's models sit on the plateau: by default the main job reads their state, skips their
    analysis and reports every claim about trained models as not testable (no stage folder is written)."""
    from icl_heads.zoo.reproduce import reproduce_zoo

    root, _ = tiny_zoo
    text = reproduce_zoo(tmp_path / "run", [TINY], root=root, any_t=False).read_text()
    assert "| T | not learned" in text and "not analysed" in text
    assert not (tmp_path / "run" / "T" / "seed0").exists()


def test_the_main_job_leaves_out_the_costliest_configurations_and_the_report_says_how_to_add_them():
    from icl_heads.zoo import CONFIGS, main_job_configs
    from icl_heads.zoo.reproduce import left_out_text

    assert [c.name for c in main_job_configs()] == ["A", "B", "E"]
    text = left_out_text([CONFIGS["C"], CONFIGS["D"]])
    assert "**C** interleaved tokens, MLP (Garg et al.), L = 3; **D** paired tokens, attention-only, L = 6" in text
    assert "--configs A,B,C,D,E" in text
    assert left_out_text([]) == ""


def test_a_plateau_configuration_is_not_testable_and_never_compared(tmp_path):
    """Issue 23: a configuration whose largest-head models sit above 0.5 at n = d has not learned: its claims
    about trained models read *not testable* and the factor sentences compare only configurations that learned."""
    from icl_heads.io import write_json
    from icl_heads.zoo.reproduce import NOT_TESTABLE, factor_sentence, model_state

    def fake(root, risk):
        for k in (0, 1):
            write_json(model_path("T", k, 2, root) / "meta.json",
                       {"step": 40, "zoo": {"convergence": {"converged": False, "at": {"5": {"risk": risk[k],
                                                                                           "improvement": 0.1}}}}})
    cfg = ZooConfig("T", "two seeds", TINY.overrides, seeds=(0, 1), heads=(1, 2), base="smoke")
    fake(tmp_path / "plateau", [0.9, 0.45])  # mean 0.675 > 0.5
    fake(tmp_path / "learned", [0.2, 0.3])
    plateau, learned = model_state(cfg, 2, tmp_path / "plateau"), model_state(cfg, 2, tmp_path / "learned")
    assert not plateau["learned"] and plateau["word"].startswith("not learned")
    assert learned["learned"] and learned["word"].startswith("capped at 40 steps")
    assert learned["risk_at_d"] == pytest.approx(0.25)
    for k in (0, 1):  # an accumulating configuration between milestones is training, not capped
        write_json(model_path("T", k, 2, tmp_path / "wsd") / "meta.json",
                   {"step": 19, "zoo": {"state": "training", "stable_steps": 16, "cooldown_steps": 3,
                                        "convergence": {"converged": False, "at": {"5": {"risk": 0.3}}}}})
    growing = model_state(cfg, 2, tmp_path / "wsd")
    assert growing["learned"] and growing["word"] == "training, at 16 + 3 steps (h = 2 at n = d: 0.300; next milestone 32)"
    assert [m["steps_text"] for m in growing["models"]] == ["16 + 3", "16 + 3"]
    write_json(model_path("T", 1, 2, tmp_path / "wsd") / "meta.json",  # mid-milestone: seed 1 is further along
               {"step": 38, "zoo": {"state": "training", "stable_steps": 32, "cooldown_steps": 6,
                                    "convergence": {"converged": False, "at": {"5": {"risk": 0.3}}}}})
    assert model_state(cfg, 2, tmp_path / "wsd")["word"].startswith("training, at 32 + 6 steps (h = 2 at n = d: 0.300; "
                                                                    "next milestone 64)")
    for k, step in ((0, 19), (1, 38)):  # the h = 1 references: seed 1's lags its h = 2 model (grown by --heads)
        write_json(model_path("T", k, 1, tmp_path / "wsd") / "meta.json", {"step": step if k == 0 else 19})
    word = model_state(cfg, 2, tmp_path / "wsd")["word"]
    assert word.endswith("; **h = 1 at other lengths** (seed 1: 19 steps): the head-count comparisons (1a, 2b, "
                         "the fraction of the advantage lost) mix training lengths")
    write_json(model_path("T", 1, 1, tmp_path / "wsd") / "meta.json", {"step": 38})
    assert "other lengths" not in model_state(cfg, 2, tmp_path / "wsd")["word"]
    s = factor_sentence("1b", {"A": "not reproduced", "B": "not reproduced", "C": NOT_TESTABLE})
    assert "leaves it unchanged" in s and "not testable in C" in s and "B -> C" not in s
    assert "no configuration learned" in factor_sentence("1b", {"C": NOT_TESTABLE})


def test_the_zoo_folder_is_ICL_HEADS_ZOO_and_a_missing_one_is_one_line(tmp_path, capsys):
    """An installed package has no checkout beside it: ``$ICL_HEADS_ZOO`` names the zoo (else the checkout's zoo/),
    and a command that reads a missing folder says so in one line, exit 2."""
    import os
    import subprocess
    import sys

    code = "from icl_heads.zoo import ZOO_DIR, STATE_DIR; print(ZOO_DIR); print(STATE_DIR)"
    env = {**os.environ, "ICL_HEADS_ZOO": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(tmp_path / "elsewhere"), str(tmp_path / "zoo_state")]
    env.pop("ICL_HEADS_ZOO")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == str(ZOO_DIR) == str(Path(__file__).resolve().parents[1] / "zoo")
    for cmd in ("list", "verify", "cards"):
        with pytest.raises(SystemExit) as e:
            main(["zoo", cmd, "--root", str(tmp_path / "missing")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: root: no zoo folder at") and "ICL_HEADS_ZOO" in err


def test_snapshots_are_added_only_from_a_run_with_the_same_final_weights(tiny_zoo, tmp_path):
    """``add_snapshots``: a model exported without snapshots gets those of a run whose final weights are the
    model's, byte for byte; a run with other weights is refused and the model is left as it was."""
    from icl_heads.checkpoint import CheckpointError
    from icl_heads.zoo import add_snapshots

    root, work = tiny_zoo
    run, other = work / "T/seed0/h1", work / "T/seed0/h2"
    bare = tmp_path / "zoo"
    export(run, TINY, 0, 1, bare, snapshots=False)
    dest = model_path("T", 0, 1, bare)
    assert not (dest / "snapshots").exists()
    meta_before = (dest / "meta.json").read_bytes()
    with pytest.raises(CheckpointError, match="final weights differ"):
        add_snapshots(other, TINY, 0, 1, bare)
    assert not (dest / "snapshots").exists()
    add_snapshots(run, TINY, 0, 1, bare)
    got = sorted(p.relative_to(dest / "snapshots") for p in (dest / "snapshots").rglob("*") if p.is_file())
    want = sorted(p.relative_to(run / "snapshots") for p in (run / "snapshots").rglob("*") if p.is_file())
    assert got == want and len(want) >= 8  # 4 snapshots x (weights, meta)
    assert all((dest / "snapshots" / p).read_bytes() == (run / "snapshots" / p).read_bytes() for p in want)
    assert (dest / "meta.json").read_bytes() == meta_before  # the model's own record is kept
    assert verify(bare) == len(want) + 2
