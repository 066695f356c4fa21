"""The job plan of ``rift submit``: the stage table turned into jobs and arrays, fitted to the cluster.

:func:`plan_jobs` reads the stage table (:mod:`rift_dist.stages`): each stage's needs and its
``shards`` (:func:`stage_jobs`: one job running the stage, or its prepare job, array of tasks and
gather job), leaving out what is done on disk.  :func:`query_cluster_limits` reads what the cluster
allows (MaxArraySize, MaxJobCount, partitions, QOS); :func:`split_arrays` cuts arrays to fit and
:func:`check_plan` lists what the cluster would refuse, before the first sbatch.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rift_dist.cluster.profile import ClusterError, Profile, Resources, last_line
from rift_dist.stages import STAGE_TABLE, STAGES, resolve
from rift_dist.stages.done_markers import stage_done

@dataclass
class TaskPlan:
    """One task of a job (the only one for a plain job).

    Attributes:
        index: position in the array (0 for a plain job).
        label: what it does, for people (modules, alphas, candidate).
        names: what ``--only JOB:NAME`` may call it (module names, alpha values, candidate index).
        args: the part's arguments (JSON-able).
        run_key / run_name / run_parent: its MLflow child run (created ahead of time), if it has its own.
        child_runs: see below.
    """

    index: int
    label: str
    names: list = field(default_factory=list)
    args: dict = field(default_factory=dict)
    run_key: str | None = None
    run_name: str | None = None
    run_parent: str | None = None
    child_runs: list = field(default_factory=list)
    """Further MLflow runs of the task created ahead of time: [{"key", "params"}] (one per alpha)."""
    what: str = ""
    """What the task does, for the script header's array map (empty = its label)."""


@dataclass
class JobPlan:
    """One submitit job or job array of the stage graph (see the module docstring for the list)."""

    name: str
    stage: str
    part: str
    resources: Resources
    array: bool = False
    tasks: list = field(default_factory=list)
    depends_on: list = field(default_factory=list)
    family: str = ""
    """The job this one is a part of when an array was split to fit MaxArraySize (else its own name)."""


def _parse_only(only: list[str] | None) -> dict[str, list[str]] | None:
    if not only:
        return None
    out: dict[str, list[str]] = {}
    for item in only:
        job, _, names = item.partition(":")
        out.setdefault(job.strip(), []).extend(n.strip() for n in names.split(",") if n.strip())
    return out


def candidates_of(profile: Profile) -> int:
    """The profile's number of fine-tuning candidates k (``stages.finetune.candidates``; 1 = ``rift run``'s)."""
    return int(profile.option("finetune", "candidates"))


def stage_jobs(stage, cfg, profile: Profile, run_dir: Path, candidates: int,
               wanted: dict[str, list[str]] | None) -> list[JobPlan]:
    """The jobs of one stage (its table entry ``stage``): one job running the whole stage, or, for a stage
    with ``shards`` that the profile splits, its prepare job (unless its output exists), the array of
    tasks still to do (:attr:`Shards.tasks`) and the gather job."""
    run_name = stage.run_name

    def single(part, args) -> JobPlan:
        parent = run_name if part.run_key else None
        return JobPlan(part.job, stage.name, part.part, profile.resources(part.resources), False,
                       [TaskPlan(0, part.job, [], args, part.run_key or run_name, part.run_name or run_name, parent)])

    sh = stage.shards
    options = {k: profile.option(stage.name, k) for k in sh.options} if sh else {}
    if sh is None or not resolve(sh.sharded)(cfg, options, candidates):
        return [JobPlan(stage.name, stage.name, "stage", profile.resources(stage.name), False,
                        [TaskPlan(0, stage.name, [], {"stage": stage.name}, run_name, run_name)])]
    jobs = []
    if sh.prepare is not None and (not resolve(sh.prepare_done)(run_dir) or (wanted and sh.prepare.job in wanted)):
        jobs.append(single(sh.prepare, {}))
    names = None if wanted is None else wanted.get(sh.compute.job, [])
    found, gather_args = resolve(sh.tasks)(cfg, run_dir, options, candidates, names)
    tasks = [TaskPlan(t["index"], t["label"], list(t["names"]), t["args"], t.get("run_key"), t.get("run_name"),
                      run_name, list(t.get("child_runs", [])), t.get("what", "")) for t in found]
    if tasks or (wanted and sh.compute.job in wanted):  # --only job:NAME matching nothing: named below as such
        jobs.append(JobPlan(sh.compute.job, stage.name, sh.compute.part, profile.resources(sh.compute.resources),
                            True, tasks))
    if sh.gather is not None:
        jobs.append(single(sh.gather, gather_args))
    return jobs


def plan_jobs(cfg, profile: Profile, run_dir: str | Path, stages: list[str] | tuple[str, ...] = STAGES,
              only: list[str] | None = None) -> list[JobPlan]:
    """The jobs that bring ``run_dir`` to the end of ``stages``, in order, each depending on the one before.

    Reads the stage table (:mod:`rift_dist.stages`): each stage's needs, and its ``shards`` (how it
    splits into jobs and arrays; :func:`stage_jobs`).  What is already done on disk is left out:
    finished stages (their done marker, same config), MRC groups whose modules all have result files,
    alphas with result files, fine-tuned candidates.  With ``only`` (``["mrc:layer2.1.conv2",
    "interpolate:0.5", "mrc:3", "mrc-gather"]``) just those jobs / tasks are planned, without what comes
    after them; a module or alpha named alone gets a task of its own.

    Raises:
        ClusterError: unknown stage or ``--only`` job/name, profile options that cannot work with the
            config, or a stage whose input stage is neither done nor planned (names it and the fix).
        StageError: a stage finished with a different config.
    """
    run_dir = Path(run_dir)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ClusterError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    selected = [s for s in STAGE_TABLE if s.name in stages]
    wanted = _parse_only(only)
    k = candidates_of(profile)
    for s in STAGE_TABLE:
        if s.shards and s.shards.check:
            options = {name: profile.option(s.name, name) for name in s.shards.options}
            problem = resolve(s.shards.check)(cfg, options, s in selected, profile.name)
            if problem:
                raise ClusterError(problem)
    done = {s.name: stage_done(cfg, run_dir, s.name) for s in STAGE_TABLE}
    if wanted is None:
        for s in selected:
            if done[s.name]:
                continue
            dropped = resolve(s.optional_needs)(cfg, k) if s.optional_needs else ()
            missing = [e for e in s.needs if e not in dropped and not done[e] and e not in stages]
            if missing:
                raise ClusterError(f"stage {s.name} needs the output of stage(s) {', '.join(missing)}, which "
                                   f"{'is' if len(missing) == 1 else 'are'} not done in {run_dir}; add "
                                   f"{', '.join(missing)} to --stages (or leave --stages out)")
    jobs: list[JobPlan] = []
    for s in selected:
        if not (done[s.name] and wanted is None):
            jobs += stage_jobs(s, cfg, profile, run_dir, k, wanted)
    if wanted is not None:
        names = {j.name for j in jobs}
        bad = sorted(set(wanted) - names)
        if bad:
            raise ClusterError(f"--only names job(s) {bad} that are not part of stages "
                               f"{', '.join(s.name for s in selected)}; jobs: {', '.join(sorted(names)) or 'none'}")
        jobs = [j for j in jobs if j.name in wanted]
        for j in jobs:
            if not j.tasks and not wanted[j.name]:
                raise ClusterError(f"--only {j.name}: every task of job {j.name} is done in {run_dir}")
            if not j.tasks:
                raise ClusterError(f"--only {j.name}:{','.join(wanted[j.name])} matches no task of job {j.name}")
    for i, job in enumerate(jobs):
        job.depends_on = [jobs[i - 1].name] if i else []
    return jobs


@dataclass
class ClusterLimits:
    """What the cluster allows, read before the first sbatch (see :func:`query_cluster_limits`).

    Attributes:
        max_array_size: SLURM ``MaxArraySize``: array task indices run 0 .. MaxArraySize-1, so one
            array has at most this many tasks (None = unknown, no splitting).
        max_job_count: SLURM ``MaxJobCount``: jobs the controller keeps at once; every array task counts.
        partitions: {name: {"state": UP/DOWN/..., "max_nodes": int or None}} (None = not read).
        default_partition: the partition a job without ``--partition`` goes to.
        qos: QOS names the cluster knows (None = not read).
        notes: what could not be read and why (printed by ``rift submit``).
    """

    max_array_size: int | None = None
    max_job_count: int | None = None
    partitions: dict | None = None
    default_partition: str = ""
    qos: list | None = None
    notes: list = field(default_factory=list)


def parse_scontrol_config(text: str) -> dict[str, str]:
    """``scontrol show config`` output -> {key: value} (``MaxArraySize = 1001`` lines; others ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_scontrol_partitions(text: str) -> tuple[dict[str, dict], str]:
    """``scontrol show partition -o`` output (one ``PartitionName=... State=UP ...`` line each) ->
    ({name: {"state", "max_nodes"}}, default partition name or "")."""
    parts_: dict[str, dict] = {}
    default = ""
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        name = fields.get("PartitionName")
        if not name:
            continue
        max_nodes = fields.get("MaxNodes", "UNLIMITED")
        parts_[name] = {"state": fields.get("State", "UP"),
                        "max_nodes": int(max_nodes) if max_nodes.isdigit() else None}
        if fields.get("Default") == "YES":
            default = name
    return parts_, default


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(str(value).split()[0])
    except (TypeError, ValueError, IndexError):
        return None


def query_cluster_limits(runner: Callable | None = None) -> ClusterLimits:
    """Read MaxArraySize / MaxJobCount (``scontrol show config``), the partitions (``scontrol show
    partition -o``) and the QOS names (``sacctmgr -n -P show qos format=name``).

    Anything that cannot be read (no ``scontrol`` on this machine, the controller down, no accounting)
    is skipped with a note in ``notes``: the submit then relies on sbatch's own refusal (and cancels
    what was queued).  ``runner(argv) -> (returncode, stdout, stderr)`` replaces subprocess for tests.
    """
    # Without a slurm.conf here (SLURM_CONF unset, none in /etc) the clients can only find a controller in
    # configless mode (a DNS SRV record), which answers at once; otherwise scontrol searches for a config for
    # about a minute.  So wait 5 s there instead of 30 (issue 11: a dry run stalled 30 s on such a machine).
    has_conf = bool(os.environ.get("SLURM_CONF")) or any(
        Path(p).is_file() for p in ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf"))
    timeout_s = 30 if has_conf else 5

    def default_runner(argv):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        return proc.returncode, proc.stdout, proc.stderr

    run = runner or default_runner
    limits = ClusterLimits()

    def call(argv) -> str | None:
        after = ("not checked before sbatch (sbatch still refuses what the cluster does not allow, and a "
                 "refused submit is undone)")
        try:
            rc, out, err = run(argv)
        except FileNotFoundError:
            limits.notes.append(f"no {argv[0]} on this machine: the cluster's limits are {after}")
            return None
        except (OSError, subprocess.TimeoutExpired) as exc:
            limits.notes.append(f"`{' '.join(argv)}` could not run ({type(exc).__name__}: {exc}); {after}")
            return None
        if rc != 0:
            limits.notes.append(f"`{' '.join(argv)}` failed ({last_line(err or out)[:160]}); {after}")
            return None
        return out

    text = call(["scontrol", "show", "config"])
    if text is not None:
        conf = parse_scontrol_config(text)
        limits.max_array_size = _int_or_none(conf.get("MaxArraySize"))
        limits.max_job_count = _int_or_none(conf.get("MaxJobCount"))
        text = call(["scontrol", "show", "partition", "-o"])
        if text is not None:
            limits.partitions, limits.default_partition = parse_scontrol_partitions(text)
        text = call(["sacctmgr", "-n", "-P", "show", "qos", "format=name"])
        if text is not None:
            limits.qos = sorted({x.strip() for x in text.splitlines() if x.strip()}) or None
    return limits


def split_arrays(jobs: list[JobPlan], max_array_size: int | None) -> list[JobPlan]:
    """Cut every array of more than ``max_array_size`` tasks into several arrays, keeping the graph.

    Part p of job ``mrc`` is named ``mrc-part<p>`` (``family`` stays ``mrc``, so ``--only mrc:...``
    and ``rift status`` still speak of ``mrc``).  Dependencies are rebuilt over levels: every part of
    a split job waits for every job of the level before, and the job after waits for ALL parts (the
    gather runs only when every task of every part succeeded).  ``max_array_size`` None or 0 changes
    nothing but the dependency lists.
    """
    levels: list[list[JobPlan]] = []
    for job in jobs:
        job.family = job.family or job.name
        if job.array and max_array_size and len(job.tasks) > max_array_size:
            chunks = [job.tasks[i:i + max_array_size] for i in range(0, len(job.tasks), max_array_size)]
            levels.append([dataclasses.replace(job, name=f"{job.name}-part{p}", tasks=chunk, family=job.name)
                           for p, chunk in enumerate(chunks, 1)])
        else:
            levels.append([job])
    out: list[JobPlan] = []
    for i, level in enumerate(levels):
        for job in level:
            job.depends_on = [j.name for j in levels[i - 1]] if i else []
            out.append(job)
    return out


def check_plan(jobs: list[JobPlan], limits: ClusterLimits, profile: Profile) -> list[str]:
    """Everything about ``jobs`` the cluster would refuse, as one sentence each (empty = fine).

    Checks: each array within ``max_array_size`` (call :func:`split_arrays` first), the total number of
    jobs (every array task counts) within ``max_job_count``, partitions exist and are UP and have enough
    nodes, QOS names exist.  Unknown limits are not checked.
    """
    problems = []
    src = profile.name
    for job in jobs:
        if job.array and limits.max_array_size and len(job.tasks) > limits.max_array_size:
            problems.append(f"job {job.name}: an array of {len(job.tasks)} tasks, but the cluster's MaxArraySize "
                            f"is {limits.max_array_size}")
    total = sum(len(j.tasks) for j in jobs)
    if limits.max_job_count and total > limits.max_job_count:
        problems.append(f"{total} jobs (array tasks count one each), but the cluster's MaxJobCount is "
                        f"{limits.max_job_count}: submit fewer stages at once (--stages) or set smaller "
                        f"stages.<stage>.array_size in {src}")
    if limits.partitions is not None:
        for job in jobs:
            name = job.resources.partition or limits.default_partition
            if not name:
                continue
            for part in name.split(","):
                info = limits.partitions.get(part)
                if info is None:
                    problems.append(f"job {job.name}: partition {part!r} does not exist (partitions: "
                                    f"{', '.join(sorted(limits.partitions))}); fix 'partition' in {src}")
                elif not str(info["state"]).startswith("UP"):
                    problems.append(f"job {job.name}: partition {part!r} is {info['state']}, not UP")
                elif info["max_nodes"] is not None and job.resources.nodes > info["max_nodes"]:
                    problems.append(f"job {job.name}: asks for {job.resources.nodes} nodes, partition {part!r} "
                                    f"allows {info['max_nodes']}; fix 'nodes' in {src}")
    if limits.qos is not None:
        for job in jobs:
            if job.resources.qos and job.resources.qos not in limits.qos:
                problems.append(f"job {job.name}: QOS {job.resources.qos!r} does not exist (QOS: "
                                f"{', '.join(limits.qos)}); fix 'qos' in {src}")
    return problems
