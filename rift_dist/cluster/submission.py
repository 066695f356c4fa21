"""``rift submit``: the plan as submitit jobs (SLURM, local or debug executor), recorded and undone on failure.

:func:`submit` validates like ``rift run`` (config checks, input paths), plans (:mod:`rift_dist.cluster.plan`),
fits the plan to the cluster, creates the MLflow parent run and every stage and task run ahead of
time (status SCHEDULED), and queues each job with ``afterok`` on the one before; every job runs
:class:`~rift_dist.cluster.job.StageJob`.  The sbatch scripts carry a comment header saying what
they run (:func:`script_header`).  When an sbatch fails mid-way, what this submission queued is
cancelled, the MLflow parent marked FAILED and the run directory restored (:func:`_roll_back`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from rift_dist.cluster.job import LAUNCHER_VARS, StageJob
from rift_dist.cluster.monitor import ACTIVE_STATES, job_states, read_submission, write_submission
from rift_dist.layout import CONFIG, SUBMISSION, RunLayout
from rift_dist.cluster.plan import ClusterLimits, JobPlan, TaskPlan, check_plan, plan_jobs, query_cluster_limits, split_arrays
from rift_dist.cluster.profile import EXECUTORS, PROFILE_STAGES, ClusterError, Profile, Resources, last_line
from rift_dist.stages import STAGES
from rift_dist.stages import parts as stage_parts
from rift_dist.stages import stage as stage_entry

def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def sbatch_parameters(res: Resources, job_name: str, dependency: list[str] = ()) -> dict:
    """submitit ``SlurmExecutor`` parameters (sbatch's names) for ``res``; ``dependency`` = job ids this
    job waits for (``afterok``; the job is cancelled by SLURM when one of them fails)."""
    p: dict[str, Any] = {"job_name": f"rift-{job_name}", "time": int(res.time_min), "nodes": int(res.nodes),
                         "ntasks_per_node": res.ranks_per_node(), "cpus_per_task": int(res.cpus_per_task),
                         "signal_delay_s": int(res.signal_delay_s), "array_parallelism": int(res.array_parallelism)}
    gpu = res.gpu_option()
    if gpu is not None:
        p[gpu[0].replace("-", "_")] = gpu[1]
    if res.mem_gb:
        p["mem"] = f"{int(res.mem_gb)}GB" if float(res.mem_gb).is_integer() else f"{int(res.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(res, key):
            p[key] = getattr(res, key)
    setup = environment_lines(res)
    if res.setup:
        setup += ["# profile setup:", *(str(x) for x in res.setup)]
    if setup:
        p["setup"] = setup
    extra = {str(k): v for k, v in res.sbatch.items()}
    if dependency:
        p["dependency"] = "afterok:" + ":".join(dependency)
        extra.setdefault("kill-on-invalid-dep", "yes")
    if extra:
        p["additional_parameters"] = extra
    return p


def environment_lines(res: Resources) -> list[str]:
    """Shell lines exporting the profile's ``env:`` (values shell-quoted), under a comment; [] when empty."""
    if not res.env:
        return []
    return ["# profile env:"] + [f"export {k}={shlex.quote(_env_text(v))}" for k, v in res.env.items()]


def _env_text(value) -> str:
    """A profile ``env`` value as the shell should see it (YAML booleans as 1 / 0, as NCCL expects)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def part_what(part: str) -> str:
    """What a job part does, for the comment header of its script (the stage table's :attr:`Part.what`)."""
    found = stage_parts().get(part)
    return found[1].what if found else "the whole stage" if part == "stage" else part


def script_header(job: JobPlan, run_dir: str | Path, config_path: str | None = None) -> list[str]:
    """The comment lines at the top of a job's sbatch script: what it runs, for someone reading it.

    Stage, job and part, the config file, the run directory, the resources with the GPU binding, the
    job it waits for and, for an array, which array task (``SLURM_ARRAY_TASK_ID``) does which modules /
    alphas / candidate.  Every line starts with ``#`` (sbatch reads ``#SBATCH`` lines after them).
    """
    r = job.resources
    lines = [f"# rift {job.stage}: job {job.name}" + (f" (part of {job.family})" if job.family not in ("", job.name)
                                                      else "") + f" - {part_what(job.part)}",
             f"# config:  {config_path or f'(given as a mapping; see {CONFIG} in the run directory)'}",
             f"# run dir: {run_dir}"]
    ranks = r.nodes * r.ranks_per_node()
    shape = f"{r.nodes} node(s) x {r.ranks_per_node()} rank(s)" + (f" = {ranks} ranks" if ranks > 1 else "")
    shape += f", {r.cpus_per_task} CPU(s) per rank"
    shape += (f", {r.gpus_per_node} {r.gpu_type + ' ' if r.gpu_type else ''}GPU(s) per node" if r.gpus_per_node
              else ", no GPU")
    lines.append(f"# shape:   {shape}")
    if r.gpus_per_node:
        lines.append(f"# GPUs:    one per rank: rank SLURM_LOCALID of a node (= LOCAL_RANK, 0..{r.ranks_per_node() - 1}) "
                     f"runs on cuda:LOCAL_RANK of the {r.gpus_per_node} GPU(s) SLURM gives the node")
    if ranks > 1:
        lines.append(f"# ranks:   RANK = SLURM_PROCID, WORLD_SIZE = {ranks}, MASTER_ADDR = first node of the job, "
                     f"MASTER_PORT = " + (str(r.master_port) if r.master_port else "derived from the job id, checked "
                                          "free (<run dir>/jobs/rendezvous/)"))
    if job.depends_on:
        lines.append(f"# after:   {', '.join(job.depends_on)} succeeded (afterok; cancelled if one fails)")
    if job.array and len(job.tasks) > 1:
        lines.append(f"# array:   {len(job.tasks)} tasks; SLURM_ARRAY_TASK_ID -> work:")
        for i, t in enumerate(job.tasks):
            lines.append(f"#   {i:>3} -> {_task_what(job, t)}")
    elif job.array:  # one task left: submitit submits it as a plain job
        lines.append(f"# work:    {_task_what(job, job.tasks[0])}")
    lines.append("# re-submit what is not done: rift submit " + str(run_dir) + "; state: rift status " + str(run_dir))
    return lines


def _task_what(job: JobPlan, task: TaskPlan) -> str:
    return task.what or task.label


def _with_header(text: str, header: list[str]) -> str:
    """``text`` (a script starting with ``#!``) with ``header`` inserted after its first line."""
    if not header:
        return text
    first, _, rest = text.partition("\n")
    return "\n".join([first, *header, rest])


def sbatch_script(res: Resources, job_name: str, folder: str | Path, python: str, dependency: list[str] = (),
                  array_size: int | None = None, header: list[str] = ()) -> str:
    """The sbatch script submitit writes for this job (``--dry-run`` prints it; no SLURM needed).

    ``header``: comment lines put after ``#!/bin/bash`` (see :func:`script_header`); the submitted
    script carries the same ones (:class:`RiftSlurmExecutor`).
    """
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(res, job_name, dependency)
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _with_header(_make_sbatch_string(command=command, folder=str(folder), map_count=array_size, **params),
                        list(header))


class RiftSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor whose scripts start with rift's comment header (:func:`script_header`).

    Everything else (sbatch options, ``srun`` line, requeue) is submitit's.
    """

    header: list = []

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        """The script text submitit would write, with :attr:`header` after its ``#!`` line."""
        return _with_header(super()._make_submission_file_text(command, uid), list(self.header))


def _executor(kind: str, folder: Path, res: Resources, job_name: str, python: str, dependency: list[str],
              header: list[str] = ()):
    """A submitit executor of ``kind`` with this job's parameters (SLURM: scripts headed by ``header``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "slurm":
        try:
            ex = RiftSlurmExecutor(folder=folder, max_num_timeout=res.max_requeues, python=python)
        except RuntimeError as exc:
            raise ClusterError(f"SLURM is not available here ({exc}); run `rift submit` on a login node, or use "
                               f"--local to run the jobs on this machine") from exc
        ex.header = list(header)
        ex.update_parameters(**sbatch_parameters(res, job_name, dependency))
        return ex
    params: dict[str, Any] = {"timeout_min": int(res.time_min), "name": f"rift-{job_name}"}
    if kind == "local":
        if res.nodes > 1:
            print(f"rift: {job_name}: the local executor has one node; running {res.ranks_per_node()} rank(s) "
                  f"instead of {res.nodes} x {res.ranks_per_node()}", flush=True)
        params.update(nodes=1, tasks_per_node=res.ranks_per_node(), gpus_per_node=int(res.gpus_per_node))
        ex = submitit.AutoExecutor(folder=folder, cluster="local", local_python=python)
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="debug")
    ex.update_parameters(**params)
    return ex


def _precreate_runs(tracker, jobs: list[JobPlan], cfg, profile: Profile, kind: str) -> None:
    """Create the parent's stage runs and every task's own run ahead of time (status SCHEDULED)."""
    if not tracker.active:
        return
    stage_runs = {}
    for job in jobs:
        name = stage_entry(job.stage).run_name
        if name not in stage_runs:
            stage_runs[name] = tracker.child(name, key=name, status="SCHEDULED")
        parent = stage_runs[name]
        for t in job.tasks:
            if t.run_key and t.run_key != name:
                tracker.child(t.run_name or t.run_key, key=t.run_key, status="SCHEDULED", parent=parent,
                              tags={"rift.job": job.name, "rift.task": t.index, "rift.task_label": t.label})
        for t in job.tasks:
            for child in t.child_runs:
                tracker.child(child["key"], key=child["key"], params=child.get("params"), status="SCHEDULED",
                              parent=parent, tags={"rift.job": job.name, "rift.task": t.index})


def max_ranks(profile: Profile, kind: str = "slurm") -> int:
    """Ranks of the largest job the profile makes (``nodes x ranks_per_node``; one node under local, one rank
    under debug)."""
    if kind == "debug":
        return 1
    out = 1
    for key in PROFILE_STAGES:
        res = profile.resources(key)
        out = max(out, res.ranks_per_node() * (res.nodes if kind == "slurm" else 1))
    return out


def _active_jobs(record: dict) -> list[str]:
    """Job/task ids of the run that are still queued or running."""
    states = job_states(record)
    return [f"{jid} ({s})" for jid, s in states.items() if s.split()[0] in ACTIVE_STATES]


def submit(cfg, profile: Profile, run_dir: str | Path, *, executor: str | None = None,
           stages: list[str] | tuple[str, ...] = STAGES, only: list[str] | None = None, dry_run: bool = False,
           config_path: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Submit the jobs that bring ``run_dir`` to the end of ``stages`` and record them in ``submission.json``.

    Args:
        cfg: the RunConfig (its ``tracking.uri`` is resolved here and passed to every job).
        profile: the launch profile; executor: slurm, local or debug (default: the profile's).
        stages / only: see :func:`plan_jobs`.
        dry_run: print the plan (and the sbatch scripts) without submitting or touching MLflow.
        log: where progress lines go.

    With the slurm executor every job is queued at once (chained by ``afterok``) and this returns;
    with local and debug this process runs them in order and waits (raising at the first failure).

    Returns:
        the submission record (also in ``<run_dir>/submission.json``).

    Before anything is queued or written, the checks ``rift run`` makes (:func:`rift_dist.preflight.check_run`):
    config errors (FFCV, the ``eval`` section, module names) are refused, dry run or not; input paths
    the planned stages need (data, corruption set, checkpoint) that are missing on this machine are
    refused, or printed as warnings under ``--dry-run`` or with the profile's ``check_paths: false``.

    Raises:
        ClusterError: jobs of the run still active, SLURM missing, a bad profile or plan, or (local /
            debug) a failed job (names the task and its error).
        ConfigError: a config problem :func:`rift_dist.preflight.check_config` finds (nothing written).
        PreflightError: missing input paths (nothing written; see above).
    """
    from rift_dist.config import dump_yaml, flatten, to_dict
    from rift_dist.preflight import check_config, input_problems
    from rift_dist.tracking import Tracker, resolve_tracking_uri

    kind = executor or profile.executor
    if kind not in EXECUTORS:
        raise ClusterError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    run_dir = Path(run_dir).resolve()
    cfg.run_dir = str(run_dir)
    python = profile.python or sys.executable
    check_config(cfg, max_ranks(profile, kind))  # what `rift run` refuses, refused before the first sbatch
    jobs = plan_jobs(cfg, profile, run_dir, stages, only)
    if not jobs:
        log(f"rift: nothing to submit: stages {', '.join(s for s in STAGES if s in stages)} are done in {run_dir}")
        return read_submission(run_dir) if RunLayout(run_dir).submission.is_file() else {}
    problems = input_problems(cfg, [s for s in STAGES if any(j.stage == s for j in jobs)])
    if problems and not dry_run and profile.check_paths:
        from rift_dist.preflight import PreflightError

        raise PreflightError("inputs the jobs need are missing on this machine (nothing was submitted or written):"
                             "\n  - " + "\n  - ".join(problems) + f"\n(if the compute nodes see paths this "
                             f"machine does not, set check_paths: false in the profile {profile.name})")
    for problem in problems:
        log(f"rift: warning: a job will need this, and it is not there on this machine: {problem}")
    limits = query_cluster_limits() if kind == "slurm" else ClusterLimits()
    for note in limits.notes:
        log(f"rift: note: {note}")
    jobs = split_arrays(jobs, limits.max_array_size)
    if any(j.family != j.name for j in jobs):
        log(f"rift: arrays over the cluster's MaxArraySize ({limits.max_array_size}) are split: "
            + ", ".join(f"{j.name} ({len(j.tasks)} tasks)" for j in jobs if j.family != j.name))
    problems = check_plan(jobs, limits, profile)
    if problems:
        raise ClusterError("the cluster would refuse this submission; nothing was submitted or written:\n  "
                           + "\n  ".join(problems))
    if dry_run:
        _print_plan(jobs, run_dir, kind, python, log, dry_run=True, config_path=config_path)
        return {"jobs": [dataclasses.asdict(j) for j in jobs]}
    layout = RunLayout(run_dir)
    record = json.loads(layout.submission.read_text()) if layout.submission.is_file() else None
    if record is not None and kind == "slurm" == record.get("executor"):
        active = _active_jobs(record)
        if active:
            raise ClusterError(f"jobs of {run_dir} are still queued or running: {', '.join(active[:8])}"
                               f"{' ...' if len(active) > 8 else ''}; wait for them (rift status {run_dir}) or "
                               f"cancel them (rift cancel {run_dir}) before submitting again")
    undo = _Undo(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = flatten(cfg)  # as the user wrote it (rift run logs the same)
    dump_yaml(cfg, layout.config)
    cfg = copy.deepcopy(cfg)  # the jobs' copy: one tracking URI for every job, resolved here
    if cfg.tracking.enabled:
        cfg.tracking.uri = resolve_tracking_uri(cfg, run_dir)
    tracker = Tracker(cfg, run_dir)
    parent_run_id = tracker.parent.run_id
    if tracker.active:
        tracker.parent.log_params(params)
        tracker.parent.set_tags({"rift.run_dir": str(run_dir), "rift.executor": kind, "rift.profile": profile.name})
        _precreate_runs(tracker, jobs, cfg, profile, kind)
    tracker.close()
    record = record or {"run_dir": str(run_dir), "submissions": []}
    record.update({"executor": kind, "profile": profile.to_dict(), "config": config_path,
                   "tracking": {"enabled": cfg.tracking.enabled, "uri": cfg.tracking.uri,
                                "experiment": cfg.tracking.experiment, "parent_run_id": parent_run_id}})
    submission = {"time": _now(), "argv": sys.argv[1:], "stages": [s for s in STAGES if s in stages],
                  "only": only or [], "jobs": []}
    record["submissions"].append(submission)
    if kind != "slurm":
        write_submission(run_dir, record)  # local / debug: the record follows the jobs as this process runs them
    _print_plan(jobs, run_dir, kind, python, log)
    config = to_dict(cfg)
    submit_env = {k: os.environ[k] for k in LAUNCHER_VARS if k in os.environ}
    ids: dict[str, str] = {}
    for n, job in enumerate(jobs):
        folder = layout.job_dir(job.family)
        deps = [ids[d] for d in job.depends_on if d in ids] if kind == "slurm" else []
        specs = [{"run_dir": str(run_dir), "config": config, "job": job.name, "stage": job.stage, "part": job.part,
                  "index": t.index, "label": t.label, "args": t.args, "run_key": t.run_key, "run_name": t.run_name,
                  "parent_run_id": parent_run_id, "submit_env": submit_env, "last": n == len(jobs) - 1,
                  "executor": kind, "master_port": int(job.resources.master_port)}
                 for t in job.tasks]
        try:
            ex = _executor(kind, folder, job.resources, job.name, python, deps,
                           script_header(job, run_dir, config_path))
            if job.array:
                submitted = ex.map_array(StageJob(), specs)
            else:
                submitted = [ex.submit(StageJob(), specs[0])]
        except Exception as exc:  # noqa: BLE001 - sbatch refused (submitit's FailedJobError, ...): undo, one message
            if kind != "slurm":
                raise
            raise _roll_back(undo, run_dir, job, exc, submission, cfg, parent_run_id, config_path, profile,
                             log) from None
        base = submitted[0].job_id.split("_")[0]
        ids[job.name] = base
        entry = {"name": job.name, "family": job.family, "stage": job.stage, "part": job.part, "array": job.array,
                 "job_id": base, "folder": str(folder), "depends_on": job.depends_on,
                 "dependency": ("afterok:" + ":".join(deps)) if deps else "",
                 "resources": dataclasses.asdict(job.resources),
                 "tasks": [{"index": t.index, "label": t.label, "names": t.names, "args": t.args, "job_id": s.job_id,
                            "run_key": t.run_key, "state": "SUBMITTED" if kind == "slurm" else "RUNNING"}
                           for t, s in zip(job.tasks, submitted)]}
        submission["jobs"].append(entry)
        if kind != "slurm":
            write_submission(run_dir, record)
        log(f"rift: {job.name}: {'array of ' + str(len(submitted)) + ' task(s)' if job.array else 'job'} "
            f"{base}{' after ' + entry['dependency'] if deps else ''}")
        if kind != "slurm":
            _wait_here(submitted, entry, job, run_dir, record, kind, log)
    if kind == "slurm":
        write_submission(run_dir, record)  # only once every sbatch succeeded
        log(f"rift: submitted {len(jobs)} job(s); follow them with `rift status {run_dir}`")
    return record


class _Undo:
    """What ``submit`` must restore when an sbatch fails: the files of the run directory as they were.

    Taken before the first write: the set of files that exist and the bytes of ``config.yaml`` (the one
    file submit overwrites).  :meth:`restore` removes every file and folder created since (the MLflow
    store excepted when it lives there) and puts ``config.yaml`` back.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.existed = run_dir.exists()
        self.files = {p for p in run_dir.rglob("*")} if self.existed else set()
        cfg_file = RunLayout(run_dir).config
        self.config = cfg_file.read_bytes() if cfg_file.is_file() else None

    def restore(self, keep: tuple[Path, ...] = ()) -> list[str]:
        """Undo the run directory's changes; returns the paths removed (relative)."""
        import shutil

        if not self.run_dir.exists():
            return []
        removed = []
        keep = tuple(k.resolve() for k in keep)
        for path in sorted(self.run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path in self.files or any(path.resolve() == k or k in path.resolve().parents for k in keep):
                continue
            if any(path.resolve() in k.parents for k in keep):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(self.run_dir)))
        if self.config is not None:
            RunLayout(self.run_dir).config.write_bytes(self.config)
        if not self.existed and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
        return removed


def _scancel(ids: list[str]) -> tuple[list[str], str]:
    """scancel ``ids``; returns (ids cancelled, error text or "")."""
    if not ids:
        return [], ""
    try:
        proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"{type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        return [], (proc.stderr or proc.stdout).strip()
    return list(ids), ""


def _roll_back(undo: _Undo, run_dir: Path, job: JobPlan, exc: BaseException, submission: dict, cfg,
               parent_run_id: str | None, config_path: str | None, profile: Profile, log) -> ClusterError:
    """An sbatch failed mid-submit: cancel what this submit queued, mark the MLflow parent run FAILED,
    restore the run directory, and return the one error that says all of it and how to retry."""
    queued = [(e["name"], e["job_id"]) for e in submission["jobs"]]
    cancelled, cancel_error = _scancel([jid for _, jid in queued])
    reason = last_line(str(exc)) or type(exc).__name__
    marked = ""
    if cfg.tracking.enabled and parent_run_id:
        try:
            from rift_dist.tracking import Tracker

            tracker = Tracker(cfg, run_dir, parent_run_id=parent_run_id)
            tracker.parent.set_tags({"rift.submit_failed": f"sbatch of {job.name}: {reason}"[:500]})
            tracker.end(tracker.parent, "FAILED")
            tracker.close()
            marked = f" The MLflow parent run {parent_run_id} is marked FAILED (tag rift.submit_failed)."
        except Exception as mexc:  # noqa: BLE001 - the cancel matters more
            marked = f" (Could not mark the MLflow parent run {parent_run_id} FAILED: {last_line(str(mexc))}.)"
    store = cfg.tracking.uri[len("sqlite:///"):] if str(cfg.tracking.uri or "").startswith("sqlite:///") else ""
    removed = undo.restore(keep=(Path(store),) if store else ())
    what = ", ".join(f"{n} {jid}" for n, jid in queued) or "nothing"
    if cancel_error:
        gone = (f"cancelling them FAILED ({cancel_error}): cancel them yourself with "
                f"`scancel {' '.join(jid for _, jid in queued)}`")
    else:
        gone = f"cancelled: {', '.join(cancelled)} (scancel)" if cancelled else "nothing to cancel"
    retry = "rift " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["submit"] else (
        f"rift submit {config_path or run_dir} --profile {profile.name}")
    log(f"rift: sbatch of {job.name} failed; removed {len(removed)} new file(s) from {run_dir}")
    return ClusterError(
        f"sbatch refused job {job.name} ({len(job.tasks)} task(s)): {reason}. Queued by this submit before it: "
        f"{what}; {gone}. Nothing of this submission is left in {run_dir} (no {SUBMISSION}; {CONFIG} "
        f"{'restored' if undo.config is not None else 'removed'}).{marked} Fix the cause (the profile "
        f"{profile.name}, or the cluster's limits) and run the same command again: {retry}")


def _wait_here(submitted, entry: dict, job: JobPlan, run_dir: Path, record: dict, kind: str, log) -> None:
    """Local / debug executors: run (debug) or wait for (local) every task of a job; record states; raise on failure."""
    failures = []
    for task, sj in zip(entry["tasks"], submitted):
        if kind == "debug" and sys.stdin is not None and sys.stdin.isatty():
            try:
                sj.result()  # submitit's debug executor opens pdb on an exception
                exc = None
            except Exception as e:  # noqa: BLE001 - reported below
                exc = e
        else:
            while kind == "local" and not sj.done():
                time.sleep(1.0)
            exc = sj.exception()
        task["state"] = "COMPLETED" if exc is None else "FAILED"
        if exc is not None:
            task["error"] = last_line(str(exc))
            failures.append(f"{job.name} task {task['index']} ({task['label']}): {task['error']}")
    write_submission(run_dir, record)
    if failures:
        raise ClusterError("failed: " + "; ".join(failures) + f". Logs: {entry['folder']}. Re-submit what is not done "
                           f"with `rift submit {run_dir} --{kind}`")


def _print_plan(jobs: list[JobPlan], run_dir: Path, kind: str, python: str, log, dry_run: bool = False,
                config_path: str | None = None) -> None:
    log(f"rift: {'plan for' if dry_run else 'submitting'} {run_dir} ({kind} executor):")
    for job in jobs:
        r = job.resources
        shape = f"{r.nodes} node(s) x {r.ranks_per_node()} rank(s), {r.gpus_per_node} GPU/node, {r.time_min} min"
        where = f", partition {r.partition}" if r.partition else ""
        after = f", after {', '.join(job.depends_on)}" if job.depends_on else ""
        what = f"array of {len(job.tasks)}" if job.array else "job"
        log(f"  {job.name:<19} {what:<12} {shape}{where}{after}")
        if job.array:
            for t in job.tasks:
                log(f"      task {t.index:>3}: {t.label}")
        if dry_run and kind == "slurm":
            deps = [f"<{d}>" for d in job.depends_on]
            script = sbatch_script(r, job.name, RunLayout(run_dir).job_dir(job.family or job.name), python, deps,
                                   len(job.tasks) if job.array and len(job.tasks) > 1 else None,
                                   script_header(job, run_dir, config_path))
            log("\n".join("      | " + line for line in script.splitlines()))
