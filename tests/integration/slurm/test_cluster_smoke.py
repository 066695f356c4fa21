"""Smoke tests: submitit jobs on the real local SLURM cluster.

Covers a plain job, a job array, preemption by a higher-priority partition
(USR2 -> checkpoint -> requeue -> resume from disk) and a signalled time limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import submitit

from tests.harness import slurm_jobs

pytestmark = pytest.mark.slurm

# ProgressJob shape: long enough to be interrupted mid-way, short enough for CI.
N_STEPS = 30
STEP_S = 0.2


def _wait_for_progress(workdir: Path, job: submitit.Job, min_step: int, timeout_s: float = 60) -> int:
    """Wait until ProgressJob in ``workdir`` has finished ``min_step`` steps; return the step."""
    deadline = time.monotonic() + timeout_s
    progress = workdir / "progress.json"
    while time.monotonic() < deadline:
        if progress.exists():
            step = int(json.loads(progress.read_text())["step"])
            if step >= min_step:
                return step
        if job.done():
            pytest.fail(f"job {job.job_id} ended before reaching step {min_step}:\n{job.stderr()}")
        time.sleep(0.1)
    pytest.fail(f"job {job.job_id} did not reach step {min_step} within {timeout_s} s:\n{job.stderr()}")


def _uninterrupted_result(tmp_path: Path) -> int:
    """Run ProgressJob in-process, without sleeping, to get the reference result."""
    return slurm_jobs.ProgressJob()(str(tmp_path / "reference"), N_STEPS, 0.0)


def test_single_job_returns_value(slurm_cluster, slurm_executor, wait_result):
    """A submitted function runs as a SLURM job in the default partition and returns its value."""
    executor = slurm_executor("single")
    job = executor.submit(slurm_jobs.add, 2, 3)
    assert wait_result(job) == 5

    ctx_job = executor.submit(slurm_jobs.job_context)
    ctx = wait_result(ctx_job)
    assert ctx["SLURM_JOB_ID"] == ctx_job.job_id
    assert ctx["SLURM_JOB_PARTITION"] == "debug"  # the default partition


def test_map_array_returns_all_values(slurm_executor, wait_result):
    """map_array makes one 4-task job array whose tasks return their values in order."""
    executor = slurm_executor("array", slurm_array_parallelism=4)
    jobs = executor.map_array(slurm_jobs.square, [1, 2, 3, 4])
    assert len(jobs) == 4
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job
    assert [wait_result(job) for job in jobs] == [1, 4, 9, 16]


def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster, slurm_executor, wait_result, tmp_path
):
    """A `high` job needing every CPU preempts a running `debug` Checkpointable job, which
    gets USR2, checkpoints, requeues and resumes from its on-disk progress to the same result."""
    workdir = tmp_path / "progress"
    # timeout_min >= 20: submitit treats USR2 as a *timeout* when the job has run
    # longer than min(0.8 * T, T - 10 min); with T = 30 min, USR2 means preemption.
    low_executor = slurm_executor("low", slurm_partition="debug", timeout_min=30, cpus_per_task=1)
    low = low_executor.submit(slurm_jobs.ProgressJob(), str(workdir), N_STEPS, STEP_S)
    step_before = _wait_for_progress(workdir, low, min_step=4)

    # Needs every CPU of the node, so the debug job has to make room.
    high_executor = slurm_executor(
        "high", slurm_partition="high", timeout_min=5, cpus_per_task=slurm_cluster.cpus
    )
    high = high_executor.submit(slurm_jobs.hold_cpus, 1.0)
    assert wait_result(high, timeout_s=60) == slurm_cluster.cpus

    assert wait_result(low, timeout_s=90) == _uninterrupted_result(tmp_path)

    starts = slurm_jobs.read_jsonl(workdir / "starts.jsonl")
    checkpoints = slurm_jobs.read_jsonl(workdir / "checkpoints.jsonl")
    assert len(checkpoints) >= 1, "checkpoint() was never called"
    assert len(starts) >= 2, f"job was not restarted: {starts}"
    assert starts[0]["start_step"] == 0
    assert starts[-1]["start_step"] >= step_before > 0, starts
    assert all(s["job_id"] == low.job_id for s in starts)
    assert "this job is preempted" in low.stderr()


def test_signalled_time_limit_checkpoints_requeues_and_resumes(
    slurm_cluster, slurm_executor, wait_result, tmp_path
):
    """A Checkpointable job warned of its time limit (USR2) counts a timeout, requeues, resumes."""
    # SLURM checks time limits only every ~30 s, so instead of waiting for a real
    # limit we deliver the time-limit warning signal ourselves. (`scontrol requeue`
    # would not do: it sends SIGTERM, which submitit ignores.) With timeout_min=3,
    # submitit counts the USR2 as a timeout (one of max_num_timeout) and requeues.
    workdir = tmp_path / "progress"
    executor = slurm_executor("timeout", timeout_min=3)
    job = executor.submit(slurm_jobs.ProgressJob(), str(workdir), N_STEPS, STEP_S)
    step_before = _wait_for_progress(workdir, job, min_step=4)
    slurm_cluster.run(["scancel", "--signal=USR2", job.job_id])

    assert wait_result(job, timeout_s=90) == _uninterrupted_result(tmp_path)

    starts = slurm_jobs.read_jsonl(workdir / "starts.jsonl")
    assert len(starts) >= 2, f"job was not restarted: {starts}"
    assert starts[-1]["start_step"] >= step_before > 0, starts
    assert "this job is timed-out" in job.stderr()
    assert "2 remaining timeouts" in job.stdout()


def test_cancelled_job_is_reported_done_via_sacct(slurm_executor):
    """A cancelled pending job is seen as done (state CANCELLED) through sacct."""
    # submitit learns that a job without a result is over only from `sacct`,
    # i.e. from slurmdbd + MariaDB; without them job.result() would hang here.
    executor = slurm_executor("cancelled", slurm_additional_parameters={"begin": "now+3600"})
    job = executor.submit(slurm_jobs.add, 1, 1)
    job.cancel(check=True)
    deadline = time.monotonic() + 30
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, f"job {job.job_id} still not done: {job.state}"
        time.sleep(0.5)
    assert job.state.startswith("CANCELLED"), job.state
    # (job.result() would now raise UncompletedJobError after submitit's 15 s
    # wait for a result file; not exercised to keep the test fast.)
