"""The job side of ``rift submit``: what every submitted job runs (:class:`StageJob` -> :func:`run_task`).

Sets up the launcher environment of each rank (:func:`_prepare_environment`: submitit-local and
SLURM variables, a rendezvous port derived from the job id and checked free, :func:`rendezvous_port`),
the config, torch, the process group and the stage context attached to the pipeline's MLflow parent
run; runs the task's part (the whole stage, or a piece of its shards named in the stage table,
:func:`run_part`); records start / end / failure / requeue in ``<run_dir>/jobs/events.jsonl``.
:class:`StageJob` is submitit's ``Checkpointable``: on preemption or near the time limit it requeues
the same task, which resumes from the files on disk (:func:`progress_on_disk`).

Jobs already submitted name ``rift_dist.cluster.StageJob`` in their pickles; the package re-exports
it there, so they still load after the move.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import submitit

from rift_dist.checkpoint_ids import newest_checkpoint_position
from rift_dist.layout import RunLayout
from rift_dist.cluster.profile import ClusterError
from rift_dist.stages import parts as stage_parts
from rift_dist.stages import resolve
from rift_dist.stages import stage as stage_entry

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _events_path(run_dir: str | Path) -> Path:
    return RunLayout(run_dir).events


def record_event(spec: dict, event: str, **extra) -> None:
    """Append one line to ``<run_dir>/jobs/events.jsonl`` (job, task, SLURM ids, restart count, ``extra``)."""
    path = _events_path(spec["run_dir"])
    path.parent.mkdir(parents=True, exist_ok=True)
    array_id, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{array_task}" if array_id and array_task else (
        os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
    line = {"time": time.time(), "event": event, "job": spec["job"], "task": spec["index"], "label": spec["label"],
            "job_id": job_id,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "pid": os.getpid(), **extra}
    with open(path, "a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")


def read_events(run_dir: str | Path) -> list[dict]:
    """The lines of ``<run_dir>/jobs/events.jsonl`` (empty when there are none)."""
    path = _events_path(run_dir)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def progress_on_disk(spec: dict) -> dict:
    """Where a requeued task would resume: the newest checkpoint (stages that checkpoint: epoch and step)
    or what its part says (the MRC array: the number of finished modules; :attr:`Part.progress`)."""
    run_dir = Path(spec["run_dir"])
    part, args = spec["part"], spec["args"]
    if part == "stage":
        entry = stage_entry(args["stage"])
        if not entry.checkpoints:
            return {}
        epoch, step = newest_checkpoint_position(RunLayout(run_dir).checkpoints(entry.name)) or (0, 0)
        return {"epoch": epoch, "step": step}
    found = stage_parts().get(part)
    if found and found[1].progress:
        return resolve(found[1].progress)(run_dir, args)
    return {}


PORT_BASE, PORT_SPAN = 20000, 40000
"""Derived rendezvous ports lie in PORT_BASE .. PORT_BASE + PORT_SPAN - 1 (20000-59999)."""


def derived_port(job_id: int) -> int:
    """The port a job's ranks agree on without talking: ``PORT_BASE + job_id mod PORT_SPAN``.

    ``job_id`` is the FULL SLURM job id of this allocation (``SLURM_JOB_ID``; every array task has its
    own, so the array job id and task id are both in it).  Two jobs get the same port only when their
    ids differ by a multiple of 40,000 (4123 and 24123 no longer collide); that case, and any other
    program holding the port, is caught by :func:`rendezvous_port`'s check on rank 0's node.
    """
    return PORT_BASE + int(job_id) % PORT_SPAN


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a TCP socket can bind ``port`` on this machine now (all interfaces when ``host`` is "")."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True


def rendezvous_port(run_dir: str | Path, key: str, rank: int, job_id: int, timeout_s: float = 600.0,
                    poll_s: float = 0.2) -> int:
    """The MASTER_PORT every rank of one job uses, the same on all ranks and free on rank 0's node.

    Rank 0 (which hosts the rendezvous store) takes :func:`derived_port` when it is free there, else a
    port the OS says is free, and writes it to ``<run_dir>/jobs/rendezvous/<key>.port`` (atomically); the
    other ranks, on any node of the (shared) run directory, wait for that file.  ``key`` names one run
    of one job (SLURM: ``<job id>-r<restart count>``, so a requeued job never reads its earlier
    run's port).  A profile's ``master_port`` (exported as MASTER_PORT) skips all of this.

    Raises:
        ClusterError: a non-zero rank waited ``timeout_s`` seconds without rank 0 writing the file.
    """
    from rift_dist.parallel.runtime import free_port

    path = RunLayout(run_dir).rendezvous_port(key)
    if rank == 0:
        port = derived_port(job_id)
        if not port_is_free(port):
            port = free_port("")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(str(port))
        os.replace(tmp, path)
        return port
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ClusterError(f"rank {rank}: rank 0 of job {key} did not write its rendezvous port to {path} within "
                               f"{timeout_s:.0f}s (is {path.parent} on a filesystem every node shares?); set "
                               f"master_port in the profile to skip this")
        time.sleep(poll_s)
    return int(path.read_text().strip())


def _prepare_environment(spec: dict) -> None:
    """Launcher variables for this process: drop the ones inherited from the submitting shell, turn
    submitit's local-executor variables into torchrun's (SLURM's are read by ``distributed.read_launch_env``),
    and set MASTER_PORT for multi-rank jobs: the profile's ``master_port`` when set, else
    :func:`rendezvous_port` (derived from the job id, checked free on rank 0's node, shared through the run
    directory) so two jobs sharing a node never meet on one port."""
    for key, value in spec.get("submit_env", {}).items():
        if os.environ.get(key) == value:
            del os.environ[key]
    env = os.environ
    fixed = int(spec.get("master_port") or 0)
    if "SUBMITIT_LOCAL_NTASKS" in env and "RANK" not in env:
        ntasks = int(env["SUBMITIT_LOCAL_NTASKS"])
        if ntasks > 1:
            job_id = int(env.get("SUBMITIT_LOCAL_JOB_ID", "0") or 0)
            rank = int(env.get("SUBMITIT_LOCAL_GLOBALID", "0"))
            port = env.get("MASTER_PORT") or fixed or rendezvous_port(spec["run_dir"], f"local-{job_id}", rank,
                                                                       job_id)
            env.update({"RANK": str(rank), "LOCAL_RANK": env.get("SUBMITIT_LOCAL_LOCALID", "0"),
                        "WORLD_SIZE": str(ntasks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    elif "SLURM_PROCID" in env and "RANK" not in env and "MASTER_PORT" not in env and int(
            env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        key = f"{job_id}-r{int(env.get('SLURM_RESTART_COUNT', '0') or 0)}"
        port = fixed or rendezvous_port(spec["run_dir"], key, int(env["SLURM_PROCID"]), job_id)
        env["MASTER_PORT"] = str(port)


def run_part(ctx, spec: dict, run) -> dict:
    """Run the part of a stage a task names: the whole stage (part ``stage``, through the pipeline's
    :func:`~rift_dist.pipeline.run_stages`: skipped when done), or a piece of its SLURM shards (the stage
    table's :class:`~rift_dist.stages.Part`, called with the task's arguments)."""
    if spec["part"] == "stage":
        from rift_dist.pipeline import run_stages

        return run_stages(ctx, [spec["args"]["stage"]])[spec["args"]["stage"]]
    try:
        _, part = stage_parts()[spec["part"]]
    except KeyError:
        raise ClusterError(f"unknown job part {spec['part']!r} (parts: stage, {', '.join(stage_parts())})") from None
    return resolve(part.run)(ctx, spec["args"], run)


def owns_run(part: str) -> bool:
    """Whether the MLflow run of a task of ``part`` is its own (ended by the job, not by the stage code)."""
    found = stage_parts().get(part)
    return bool(found and found[1].own_run)


def torch_threads_from_slurm() -> None:
    """Use SLURM's CPUs per task as torch's thread count (jobs that did not set ``precision.threads``)."""
    import torch

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))


def run_task(spec: dict) -> dict:
    """Run one task of a submitted job in this process (every rank of the job runs it).

    Sets up the launcher environment and the config (from the submission), then opens the run as every
    entry point does (:func:`rift_dist.pipeline.open_run`: torch, the process group from torchrun / SLURM /
    submitit-local variables, the stage context attached to the pipeline's MLflow parent run, teardown in
    ``finally``; the checks were made by ``rift submit``); runs the part.  Global rank 0 records
    start / end / failure in ``jobs/events.jsonl`` and logs to the task's MLflow run.

    Returns:
        {"job", "task", "outputs"}.

    Raises:
        whatever the part raises (StageError for missing inputs, DistributedError for a dead rank, ...).
    """
    if spec.get("executor") != "debug":
        _prepare_environment(spec)
    from rift_dist.config import from_dict
    from rift_dist.pipeline import open_run

    cfg = from_dict(spec["config"], source=f"{RunLayout(spec['run_dir']).config} (as submitted)")
    if not cfg.precision.threads:
        torch_threads_from_slurm()
    run = None
    status = "FAILED"
    # rift submit made the checks of `rift run` before the first sbatch and wrote config.yaml and the params;
    # the tasks of an array share the run directory, so no lock (each writes its own files)
    with open_run(cfg, spec["run_dir"], progress=False, parent_run_id=spec.get("parent_run_id"), exclusive=False,
                  config_copy=None, check=False, log_config=False) as ctx:
        runtime = ctx.runtime
        try:
            if runtime.is_main:
                record_event(spec, "start", progress=progress_on_disk(spec), world_size=runtime.world_size,
                             device=str(runtime.device), visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
                             nccl_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")})
                print(f"[rift] job {spec['job']} task {spec['index']} ({spec['label']}) starts: {runtime.world_size} "
                      f"rank(s) on {runtime.device}; on disk: {progress_on_disk(spec)}", flush=True)
            tags = {k: v for k, v in {
                "slurm.job_id": os.environ.get("SLURM_JOB_ID"), "slurm.array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
                "slurm.array_task": os.environ.get("SLURM_ARRAY_TASK_ID"), "slurm.restart_count":
                os.environ.get("SLURM_RESTART_COUNT"), "slurm.node": os.environ.get("SLURMD_NODENAME"),
                "rift.job": spec["job"], "rift.task": spec["index"], "rift.world_size": runtime.world_size}.items()
                if v is not None}
            if spec.get("run_key") and ctx.tracker.active:
                run = ctx.tracker.child(spec.get("run_name") or spec["run_key"], key=spec["run_key"], tags=tags)
            else:
                from rift_dist.tracking import _Null

                run = _Null()
            out = run_part(ctx, spec, run)
            status = "FINISHED"
            if runtime.is_main:
                record_event(spec, "end", progress=progress_on_disk(spec))
            return {"job": spec["job"], "task": spec["index"], "outputs": out}
        except (SystemExit, KeyboardInterrupt):
            status = "KILLED"
            raise
        except Exception as exc:
            if runtime.is_main:
                record_event(spec, "failed", error=f"{type(exc).__name__}: {str(exc)[:500]}")
            raise
        finally:
            tracker = ctx.tracker  # its writes are sent (or saved) and the process group closed by open_run
            if run is not None and owns_run(spec["part"]):
                tracker.end(run, status)
            if status == "FAILED":
                tracker.parent.set_tags({"rift.failed": f"{spec['job']} task {spec['index']} ({spec['label']})"})
                tracker.end(tracker.parent, "FAILED")
            elif status == "FINISHED" and spec.get("last"):
                tracker.end(tracker.parent, "FINISHED")


class StageJob(submitit.helpers.Checkpointable):
    """The callable every submitted job runs: ``StageJob()(spec)`` = :func:`run_task` (spec: a task's dict).

    Checkpointable: on preemption or before the time limit submitit calls :meth:`checkpoint` (global
    rank 0 only), which resubmits the same spec; the requeued job resumes from the files on disk.
    """

    def __call__(self, spec: dict) -> dict:
        """Run the task (see :func:`run_task`)."""
        return run_task(spec)

    def checkpoint(self, spec: dict) -> submitit.helpers.DelayedSubmission:
        """Requeue the same task; record (events file, stdout) the progress the requeued job will resume from.

        Saves nothing: every rank has saved its resumable state on the stage's schedule, so all ranks
        resume from the same newest checkpoint on disk.
        """
        progress = progress_on_disk(spec)
        try:
            record_event(spec, "checkpoint", progress=progress)
        except OSError:
            pass
        print(f"[rift] job {spec['job']} task {spec['index']}: preempted or near its time limit; requeued, it will "
              f"resume from {progress}", flush=True)
        return submitit.helpers.DelayedSubmission(StageJob(), spec)
