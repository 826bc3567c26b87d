"""Where a command's many jobs run: here in processes (``local``), in this process (``debug``) or on Slurm.

A *job* is one call ``fn(*args)`` of a module-level function that trains one model, one stack or
analyses one (configuration, seed), writing into its own folder and resuming from it: a finished
model is reused, an unfinished one continues from its last checkpoint (bit-identical on CPU). That
is all a cluster needs, so this module adds no scheduler of its own:

* ``local`` -- :func:`icl_heads.workers.run_in_processes`, today's path, unchanged (the default);
* ``debug`` -- the calls one after another in this process (a breakpoint or a traceback lands in the
  work itself; not submitit's ``DebugExecutor``, which opens pdb on an error and so hangs a script);
* ``slurm`` -- submitit (1.5): every call one job, submitted as one job array, each with the
  resources of :class:`~icl_heads.config.ExecutorConfig` (``docs/cluster.md``). A job is a
  :class:`Resumable`: when Slurm preempts it or its time runs out, submitit requeues the same call,
  which resumes from the folder's last checkpoint. A job that fails is resubmitted by rerunning the
  command: the job ids are recorded in ``<folder>/jobs.json``, and a rerun waits for its jobs still
  queued or running instead of submitting them twice, resubmits the ones that ended unfinished and
  submits none for finished work -- so the command that collects the results of ``--no-wait`` is
  the same command without ``--no-wait``.

The caller then lands the results exactly as after local training (export, evaluation, analysis),
so they are verified the same way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from ..config import ConfigError, ExecutorConfig
from ..io import read_json, write_json
from ..workers import JobsFailed, JobsSubmitted, run_in_processes

JOBS_FILE = "jobs.json"
# submitit's cluster for kind "slurm". The tests set "local": submitit's LocalExecutor runs the very same
# submission (pickled call, job folder, logs, requeue on its timeout signal) as subprocesses here.
SLURM_CLUSTER = "slurm"
LOCAL = ExecutorConfig()
PROGRESS_EVERY_S = 600.0  # while waiting, a progress line at least this often (and whenever the states change)


class Resumable(submitit.helpers.Checkpointable):
    """``fn(*args)`` as a submitit job that is requeued when preempted or timed out.

    On Slurm's signal submitit calls :meth:`checkpoint` (inherited: the same call again) and
    requeues the job; its ``SystemExit`` unwinds the training (the folder's lock is released) and
    the requeued call resumes from the last checkpoint written (every ``train.checkpoint_every`` steps).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def is_local(executor: ExecutorConfig | None) -> bool:
    return executor is None or executor.kind == "local"


def with_folder(executor: ExecutorConfig | None, default: str | Path) -> ExecutorConfig:
    """``executor`` (default ``local``) with its job folder set to ``default`` unless one was given."""
    executor = LOCAL if executor is None else executor
    return executor if executor.folder else executor.model_copy(update={"folder": str(Path(default).absolute())})


def job_device(device: str, executor: ExecutorConfig | None) -> str:
    """The device the jobs train on: ``device`` here and in process; on Slurm ``cuda`` exactly when a job
    has GPUs (``executor.gpus``), whatever this (login) machine has -- its ``--device`` is for the work
    the command itself does afterwards (evaluation, analysis)."""
    if executor is None or executor.kind != "slurm":
        return device
    return "cuda" if executor.gpus > 0 else "cpu"


def job_threads(executor: ExecutorConfig | None, default: int) -> int:
    """torch threads of a job: the cores Slurm gives it, else ``default`` (the local path's choice)."""
    return executor.cpus if executor is not None and executor.kind == "slurm" else default


def run_calls(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], names: Sequence[str],
              executor: ExecutorConfig | None = None, n_proc: int = 1,
              on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]`` where ``executor`` says, results in order; ``names`` (one per
    call, e.g. the model's folder) label the jobs in the progress lines and in ``jobs.json``.

    ``local``: ``n_proc`` processes (:func:`~icl_heads.workers.run_in_processes`); ``debug``: in this
    process; ``slurm``: submitted (or re-attached), then waited for unless ``executor.wait`` is off,
    which raises :class:`~icl_heads.workers.JobsSubmitted` once every job is queued.
    """
    if len(names) != len(calls):
        raise ValueError("run_calls: one name per call")
    if is_local(executor):
        return run_in_processes(fn, calls, n_proc, on_done)
    assert executor is not None
    if executor.kind == "debug":
        results = []
        for i, args in enumerate(calls):
            results.append(fn(*args))
            if on_done is not None:
                on_done(i, results[-1])
        return results
    if not executor.folder:
        raise ConfigError("executor.folder: the job folder is not set")
    jobs = submit(fn, calls, names, executor)
    if not executor.wait:
        raise JobsSubmitted([j.job_id for j in jobs], executor.folder, jobs)
    return wait_for(jobs, names, executor, on_done)


def submitit_executor(executor: ExecutorConfig, name: str = "icl-heads") -> submitit.AutoExecutor:
    """submitit's executor for ``executor`` (cluster :data:`SLURM_CLUSTER`), its parameters set; a missing
    Slurm is one line naming the field."""
    try:
        ex = submitit.AutoExecutor(folder=executor.folder, cluster=SLURM_CLUSTER,
                                   slurm_max_num_timeout=executor.max_requeues)
    except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
        raise ConfigError(f"executor.kind: slurm needs Slurm's srun and sbatch on this machine ({e})") from None
    ex.update_parameters(name=name, timeout_min=executor.time_min, cpus_per_task=executor.cpus,
                         gpus_per_node=executor.gpus, mem_gb=executor.mem_gb,
                         slurm_partition=executor.partition, slurm_array_parallelism=executor.array_parallelism,
                         slurm_setup=list(executor.setup), slurm_additional_parameters=dict(executor.slurm))
    return ex


def _job_class() -> Any:
    return submitit.LocalJob if SLURM_CLUSTER == "local" else submitit.SlurmJob


def _still_queued(job: Any) -> bool:
    """Whether a job recorded by an earlier run is queued or running (so it is waited for, not resubmitted).

    A job the cluster no longer knows (``UNKNOWN`` after a forced check: purged from its accounting) has ended."""
    return not job.done(force_check=True) and str(job.state).upper() != "UNKNOWN"


def submit(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], names: Sequence[str],
           executor: ExecutorConfig) -> list[Any]:
    """One job per call (re-attached where an earlier run's job for that name is still queued or running),
    the new ones as one job array; ``<folder>/jobs.json`` records every name's job id."""
    folder = Path(str(executor.folder))
    folder.mkdir(parents=True, exist_ok=True)
    record_file = folder / JOBS_FILE
    record: dict[str, str] = read_json(record_file) if record_file.exists() else {}
    jobs: list[Any] = [None] * len(calls)
    for i, name in enumerate(names):
        if name in record:
            job = _job_class()(folder=folder, job_id=record[name])
            if _still_queued(job):
                jobs[i] = job
    new = [i for i, j in enumerate(jobs) if j is None]
    if new:
        ex = submitit_executor(executor, name=f"icl-heads-{getattr(fn, '__name__', 'job').strip('_')}")
        job_fn = Resumable(fn)
        with ex.batch():
            pending = [ex.submit(job_fn, *calls[i]) for i in new]
        for i, job in zip(new, pending):
            jobs[i] = job
            record[names[i]] = job.job_id
        write_json(record_file, record)
    _log(f"executor: {len(new)} jobs submitted, {len(calls) - len(new)} still running from an earlier run; "
         f"job folder {folder}")
    return jobs


def wait_for(jobs: Sequence[Any], names: Sequence[str], executor: ExecutorConfig,
             on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Wait for every job with one progress line per finished job (and one when the jobs' states change);
    ``on_done(i, result)`` as each finishes. Failed jobs are reported together at the end
    (:class:`~icl_heads.workers.JobsFailed`); the others' results are landed first."""
    pending = dict(enumerate(jobs))
    results: dict[int, Any] = {}
    failed: list[tuple[int, BaseException]] = []
    t0 = shown_at = time.monotonic()
    shown = ""
    while pending:
        for i, job in list(pending.items()):
            if not job.done():
                continue
            del pending[i]
            try:
                results[i] = job.result()
            except Exception as e:  # submitit's FailedJobError / UncompletedJobError: reported below
                failed.append((i, e))
                _log(f"executor: {names[i]} (job {job.job_id}) ended unfinished ({job.state})")
                continue
            _log(f"executor: {names[i]} done (job {job.job_id}); {len(results)}/{len(jobs)} finished, "
                 f"{_elapsed(t0)}")
            if on_done is not None:
                on_done(i, results[i])
        if pending:
            states = f"waiting for {len(pending)} of {len(jobs)} jobs ({_states(pending.values())})"
            if states != shown or time.monotonic() - shown_at > PROGRESS_EVERY_S:  # a line when something changed
                _log(f"executor: {states}, {_elapsed(t0)}")
                shown, shown_at = states, time.monotonic()
            time.sleep(executor.poll_s)
    if failed:
        i, e = failed[0]
        why = _last_error_line(e)
        raise JobsFailed(f"executor: {len(failed)} of {len(jobs)} jobs ended unfinished, first {names[i]} "
                         f"(job {jobs[i].job_id}: {why}; log {jobs[i].paths.stderr}); rerun the same command to "
                         "resubmit them (each resumes from its last checkpoint)")
    return [results[i] for i in range(len(jobs))]


def _last_error_line(e: BaseException) -> str:
    """The exception line of a failed job's traceback (submitit puts it between two dashed lines)."""
    lines = [line.strip() for line in str(e).splitlines()]
    dashes = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    trace = [line for line in lines[dashes[0] + 1:dashes[1]] if line] if len(dashes) >= 2 else []
    return trace[-1] if trace else (next((line for line in lines if line), "") or type(e).__name__)


def _states(jobs: Any) -> str:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[str(j.state)] = counts.get(str(j.state), 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def _elapsed(t0: float) -> str:
    s = int(time.monotonic() - t0)
    return f"{s // 60}m{s % 60:02d}s elapsed"


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
