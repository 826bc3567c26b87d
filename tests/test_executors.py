"""Executors without a cluster (``icl_heads.training.executors``, docs/cluster.md).

* The Slurm path runs end to end through submitit's own ``LocalExecutor`` (``SLURM_CLUSTER = "local"``):
  real subprocesses started from pickled jobs, with submitit's job folder and logs. Its zoo must equal,
  bit for bit, the zoo today's process pool trains (the reference), and a job killed mid-training must
  resume, when the command is rerun, from its last checkpoint to the same weights.
* The sbatch script submitit writes is checked up to submission: a fake ``sbatch`` (and ``srun``) on
  PATH answers like Slurm does, so the real submitit code writes the real script; its ``#SBATCH`` lines
  must carry the partition, time, GPUs, CPUs and job array given with ``--set executor.*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icl_heads.checkpoint import load_meta
from icl_heads.cli import main
from icl_heads.cli.options import make_executor
from icl_heads.config import ConfigError, ExecutorConfig
from icl_heads.folders import read_lock
from icl_heads.training import executors, is_finished
from icl_heads.workers import JobsFailed, JobsSubmitted
from icl_heads.zoo import ZooConfig, model_path, train_zoo, verify

TINY = ZooConfig("T", "tiny smoke configuration",
                 {"model.d_model": 16, "train.steps": 40, "train.snapshots": 4, "train.eval_every": 20,
                  "train.checkpoint_every": 20, "train.n_eval_prompts": 32, "eval.n_test": 64, "eval.n_val": 64,
                  "train.batch_size": 16},
                 seeds=(0,), heads=(1, 2), base="smoke")
# long enough to be killed between two checkpoints (every 20 steps; evaluated at each, so the log shows where
# a run starts from)
LONG = ZooConfig("K", "a smoke configuration to kill", {**TINY.overrides, "train.steps": 600}, seeds=(0,),
                 heads=(2,), base="smoke")
SUBMITIT_LOCAL = ExecutorConfig(kind="slurm", poll_s=0.2)


@pytest.fixture
def submitit_local(monkeypatch):
    """Kind ``slurm`` submitted to submitit's LocalExecutor instead of sbatch."""
    monkeypatch.setattr(executors, "SLURM_CLUSTER", "local")


@pytest.fixture(scope="module")
def reference_zoo(tmp_path_factory):
    """TINY trained by today's path: ``workers.run_in_processes``, two processes."""
    root = tmp_path_factory.mktemp("zoo-ref")
    assert len(train_zoo([TINY], tmp_path_factory.mktemp("work-ref"), jobs=2, root=root)) == 2
    return root


def tensors_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every weights file under ``folder`` (model and snapshots), by relative path."""
    return {str(f.relative_to(folder)): load_file(f) for f in sorted(folder.rglob("model.safetensors"))}


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta and list(ta) == list(tb)
    for name in ta:
        assert list(ta[name]) == list(tb[name])
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)


def test_a_zoo_trained_as_submitit_jobs_equals_the_process_pool_zoo(reference_zoo, submitit_local, tmp_path):
    root, work = tmp_path / "zoo", tmp_path / "work"
    done = train_zoo([TINY], work, jobs=2, root=root, executor=SUBMITIT_LOCAL)
    assert sorted(p.name for p in done) == ["h1", "h2"]
    for h in TINY.heads:
        assert_same_weights(model_path("T", 0, h, reference_zoo), model_path("T", 0, h, root))
        ref, got = load_meta(model_path("T", 0, h, reference_zoo)), load_meta(model_path("T", 0, h, root))
        assert got["zoo"]["convergence"] == ref["zoo"]["convergence"]
    assert verify(root) == verify(reference_zoo)  # the same files, checked the same way
    # these were submitit jobs: the pickled call, its result and its logs are in the job folder
    jobs = json.loads((work / "jobs" / executors.JOBS_FILE).read_text())
    assert sorted(jobs) == sorted(str(work / "T" / "seed0" / f"h{h}") for h in TINY.heads)
    for job_id in jobs.values():
        assert (work / "jobs" / f"{job_id}_submitted.pkl").is_file()
        assert (work / "jobs" / f"{job_id}_0_result.pkl").is_file()
        assert "finished in" in (work / "jobs" / f"{job_id}_0_log.out").read_text()


def test_the_debug_executor_trains_in_process_to_the_same_zoo(reference_zoo, tmp_path):
    root = tmp_path / "zoo"
    train_zoo([TINY], tmp_path / "work", jobs=2, root=root, executor=ExecutorConfig(kind="debug"))
    for h in TINY.heads:
        assert_same_weights(model_path("T", 0, h, reference_zoo), model_path("T", 0, h, root))


def eval_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"K/seed0/h2 step (\d+) ", log)]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """LONG trained by today's path, never interrupted."""
    root = tmp_path_factory.mktemp("zoo-long")
    train_zoo([LONG], tmp_path_factory.mktemp("work-long"), jobs=1, root=root)
    return root


def submit_and_wait_for_step(work: Path, root: Path, step: int) -> tuple[object, int]:
    """LONG submitted without waiting; returns its job and its training process once past ``step``."""
    run = work / "K" / "seed0" / "h2"
    with pytest.raises(JobsSubmitted) as sub:
        train_zoo([LONG], work, jobs=1, root=root, executor=SUBMITIT_LOCAL.model_copy(update={"wait": False}))
    job = sub.value.jobs[0]
    deadline = time.monotonic() + 120
    while not ((run / "meta.json").exists() and load_meta(run)["step"] >= step):
        assert time.monotonic() < deadline and not job.done(), job.stderr()
        time.sleep(0.01)
    return job, read_lock(run)["pid"]  # the training process holds its folder's lock


def checkpoint_is_whole(run: Path) -> bool:
    meta = load_meta(run)
    return all(hashlib.sha256((run / name).read_bytes()).hexdigest() == digest
               for name, digest in meta["sha256"].items())


@pytest.mark.slow  # ~20 s on the 2-core VM: two trainings of 600 steps and three Python starts with torch
def test_a_killed_job_resumes_on_resubmission_to_the_same_weights(long_reference, submitit_local, tmp_path):
    root, work = tmp_path / "zoo", tmp_path / "work"
    run = work / "K" / "seed0" / "h2"
    job, pid = submit_and_wait_for_step(work, root, 100)
    os.kill(pid, signal.SIGSTOP)  # SIGKILL cannot be held: not while a checkpoint is half written (io.signals_held)
    while not checkpoint_is_whole(run):
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
        os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)  # mid-run, no clean-up: as a node failure
    while not job.done():
        time.sleep(0.05)
    killed_at = load_meta(run)["step"]
    assert not is_finished(run) and 100 <= killed_at < 600, killed_at
    assert not (root / "K").exists()

    train_zoo([LONG], work, jobs=1, root=root, executor=SUBMITIT_LOCAL)  # the rerun resubmits it
    new_id = json.loads((work / "jobs" / executors.JOBS_FILE).read_text())[str(run)]
    assert new_id != job.job_id
    steps = eval_steps((work / "jobs" / f"{new_id}_0_log.out").read_text())
    assert steps[0] == killed_at + 20 and steps[-1] == 600  # resumed from the last checkpoint, not from 0
    assert_same_weights(model_path("K", 0, 2, long_reference), model_path("K", 0, 2, root))


@pytest.mark.slow  # ~15 s: one training of 600 steps, restarted once
def test_a_preempted_job_is_requeued_by_submitit_and_resumes_to_the_same_weights(long_reference, submitit_local,
                                                                                  tmp_path):
    """Slurm's warning signal (USR2, what submitit asks sbatch for) makes submitit checkpoint the job (a
    :class:`Resumable`: the same call) and requeue it; the requeued call resumes from the last checkpoint."""
    root, work = tmp_path / "zoo", tmp_path / "work"
    run = work / "K" / "seed0" / "h2"
    job, pid = submit_and_wait_for_step(work, root, 100)
    os.kill(pid, signal.SIGUSR2)
    assert job.result() == str(run)  # the same job, requeued by its controller, finished
    log = job.stdout()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log and "Requeued job" in log
    first, second = log.split("Requeued job")  # submitit started the same call again
    before, after = eval_steps(first), eval_steps(second)
    assert before[-1] >= 100 and after[-1] == 600
    assert 100 < after[0] <= before[-1] + 20  # from the last checkpoint (every 20 steps), not from step 0
    assert sorted(set(before + after)) == list(range(20, 601, 20))

    train_zoo([LONG], work, jobs=1, root=root, executor=SUBMITIT_LOCAL)  # collects: exports, submits nothing
    assert json.loads((work / "jobs" / executors.JOBS_FILE).read_text()) == {str(run): job.job_id}
    assert_same_weights(model_path("K", 0, 2, long_reference), model_path("K", 0, 2, root))


def test_failed_jobs_are_one_line_after_the_others_landed_and_a_rerun_resubmits_them(submitit_local, tmp_path):
    executor = SUBMITIT_LOCAL.model_copy(update={"folder": str(tmp_path / "jobs")})
    landed: list[tuple[int, object]] = []
    with pytest.raises(JobsFailed) as e:
        executors.run_calls(int, [("7",), ("seven",)], ["good", "bad"], executor, on_done=lambda i, r: landed.append((i, r)))
    assert landed == [(0, 7)]  # the job that succeeded was landed before the failure was reported
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("executor: 1 of 2 jobs ended unfinished, first bad (job ")
    assert "invalid literal for int()" in msg and "rerun the same command to resubmit" in msg
    first = json.loads((tmp_path / "jobs" / executors.JOBS_FILE).read_text())
    with pytest.raises(JobsFailed):
        executors.run_calls(int, [("seven",)], ["bad"], executor)
    again = json.loads((tmp_path / "jobs" / executors.JOBS_FILE).read_text())
    assert again["bad"] != first["bad"] and again["good"] == first["good"]  # the ended job was resubmitted


def test_submitits_preemption_signal_waits_until_a_checkpoint_is_whole(tmp_path, monkeypatch):
    """USR2 makes submitit requeue the job and exit (``SystemExit``); arriving after each file of a checkpoint,
    it is delivered once ``meta.json`` matches the new files (as SIGTERM is: ``io.signals_held``)."""
    from icl_heads import io as io_module
    from icl_heads.checkpoint import load_model, save_checkpoint
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path, model, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_write = io_module.atomic_write_bytes

    def write_then_usr2(path, data):
        out = real_write(path, data)
        os.kill(os.getpid(), signal.SIGUSR2)
        return out

    def requeue_and_exit(signum, frame):  # what submitit's handler ends with
        raise SystemExit(-1)

    monkeypatch.setattr(io_module, "atomic_write_bytes", write_then_usr2)
    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        with pytest.raises(SystemExit):
            save_checkpoint(tmp_path, model, {"step": 2})
    finally:
        signal.signal(signal.SIGUSR2, previous)
    loaded, meta = load_model(tmp_path)  # checksums match: the whole new checkpoint, not half of it
    assert meta["step"] == 2
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the sbatch script, not submitted

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` that answers as Slurm does (and records its argument); ``srun`` so submitit sees a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/sbatch_calls\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def sbatch_lines(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


@pytest.mark.parametrize("stacked", [False, True])
def test_slurm_jobs_are_submitted_with_the_given_resources(fake_slurm, capsys, stacked):
    jobs, out = fake_slurm / "jobs", fake_slurm / "out"
    args = ["sweep-heads", "--preset", "smoke", "--out", str(out), "--device", "cpu", "--set", "train.steps=20",
            "--executor", "slurm", "--no-wait", "--set", "executor.partition=gpu", "--set", "executor.time_min=90",
            "--set", "executor.gpus=1", "--set", "executor.cpus=4", "--set", "executor.array_parallelism=1",
            "--set", f"executor.folder={jobs}"] + ([] if stacked else ["--no-stacked"])
    main(args)
    printed = capsys.readouterr().out
    ids = ["4242"] if stacked else ["4242_0", "4242_1"]  # one stack of h = 1, 2, or one job per model (an array)
    assert f"submitted {len(ids)} jobs: {' '.join(ids)}" in printed
    collect = printed.split("collect the results with: ", 1)[1].strip()
    assert collect.startswith("icl-heads sweep-heads ") and "--no-wait" not in collect
    assert collect.split()[1:] == [a for a in args if a != "--no-wait"]

    script = (jobs / "4242_submission.sh").read_text()
    assert (fake_slurm / "sbatch_calls").read_text().count("\n") == 1  # one sbatch call for all the jobs
    got = sbatch_lines(script)
    assert got["partition"] == "gpu" and got["time"] == "90" and got["gpus-per-node"] == "1"
    assert got["cpus-per-task"] == "4" and got["nodes"] == "1" and "requeue" not in got
    assert got.get("array") == (None if stacked else "0-1%1")
    assert got["signal"].startswith("USR2@")  # submitit's warning before the time limit: checkpoint and requeue
    assert re.search(r"-m submitit\.core\._submit", script)
    # the pickled call: a Resumable job of the trainer, on cuda (the job has a GPU), 4 threads for a model
    from submitit.core.utils import DelayedSubmission

    record = json.loads((jobs / executors.JOBS_FILE).read_text())
    assert sorted(record.values()) == ids
    pickled = DelayedSubmission.load(jobs / f"{ids[0]}_submitted.pkl")
    assert isinstance(pickled.function, executors.Resumable) and pickled.function.checkpoint().function is pickled.function
    if stacked:
        assert pickled.args[2:] == ("cuda", 4) and [m.spec.model.n_heads for m in pickled.args[0]] == [1, 2]
    else:
        assert pickled.args[2:4] == ("cuda", 4) and pickled.args[1] in record
    assert not any(is_finished(Path(m)) for m in record)  # nothing ran here


def test_slurm_without_slurm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    with pytest.raises(SystemExit) as e:
        main(["sweep-heads", "--preset", "smoke", "--out", str(tmp_path / "o"), "--device", "cpu",
              "--set", "train.steps=20", "--executor", "slurm"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: executor.kind: slurm needs"), err


@pytest.mark.parametrize("extra,field", [
    (["--executor", "nope"], "executor:"),
    (["--executor", "slurm", "--set", "executor.time_min=0"], "executor.time_min:"),
    (["--executor", "slurm", "--set", "executor.cpus=nan"], "executor.cpus:"),
    (["--executor", "slurm", "--set", "executor.mem_gb=nan"], "executor.mem_gb:"),
    (["--executor", "slurm", "--set", "executor.partiton=gpu"], "executor.partiton:"),
    (["--executor", "local", "--no-wait"], "executor.wait:"),
    (["--executor", "missing.toml"], "executor:"),
])
def test_bad_executor_settings_are_one_line_naming_the_field(tmp_path, capsys, extra, field):
    for cmd in (["sweep-heads", "--preset", "smoke", "--out", str(tmp_path / "o")],
                ["zoo", "train", "--config", "A", "--work", str(tmp_path / "w"), "--root", str(tmp_path / "z")]):
        with pytest.raises(SystemExit) as e:
            main(cmd + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith(f"error: {field}"), err
    assert not (tmp_path / "w").exists() and not (tmp_path / "z").exists()


def test_a_settings_file_with_set_on_top(tmp_path):
    toml = tmp_path / "cluster.toml"
    toml.write_text('[executor]\nkind = "slurm"\npartition = "a100"\ntime_min = 720\ngpus = 1\n'
                    'setup = ["source .venv/bin/activate"]\n[executor.slurm]\naccount = "lab"\n')
    ex = make_executor(str(toml), {"partition": "h100"}, no_wait=True)
    assert (ex.kind, ex.partition, ex.time_min, ex.gpus, ex.wait) == ("slurm", "h100", 720, 1, False)
    assert ex.setup == ["source .venv/bin/activate"] and ex.slurm == {"account": "lab"}
    js = tmp_path / "cluster.json"
    js.write_text(json.dumps({"kind": "slurm", "cpus": 0}))
    with pytest.raises(ConfigError, match=r"^executor\.cpus: "):
        make_executor(str(js), {})


@pytest.mark.slow  # six in-process trainings: ~25 s on the loaded 2-core VM
def test_reproduce_train_queues_every_configuration_where_its_train_stage_looks(tmp_path):
    """``reproduce --train`` with an executor trains all configurations' models first, as one batch, into
    the folders each configuration's train stage uses: that stage then finds every model finished."""
    from icl_heads.experiments.heads_sweep import train_seeds
    from icl_heads.reproduce import seed_preset
    from icl_heads.runs import layout
    from icl_heads.zoo.reproduce import train_all, zoo_preset

    two = ZooConfig("U", "second tiny configuration", {**TINY.overrides, "model.mlp": False, "train.steps": 20},
                    seeds=(0, 1), heads=(1, 2), base="smoke")
    train_all(tmp_path, [TINY, two], "cpu", ExecutorConfig(kind="debug"))
    for c in (TINY, two):
        preset = zoo_preset(c, None)
        per_seed = [seed_preset(preset, k) for k in range(len(c.seeds))]
        dirs = [layout.stage_dir(tmp_path / c.name, "e1", k) for k in range(len(c.seeds))]
        got = train_seeds(per_seed, dirs, "cpu")  # what reproduce's train stage calls
        assert len(got["members"]) == 2 * len(c.seeds) and all(m["reused"] for m in got["members"].values())
