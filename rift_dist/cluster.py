"""Run the RiFT stage graph on a cluster: SLURM jobs and job arrays through submitit, every run in MLflow.

``rift submit CONFIG --profile launch/<cluster>.yaml`` turns one config into jobs:

=====================  ==========================  =========================================================
job                    what                        shape
=====================  ==========================  =========================================================
``train``              adversarial training        one job, ``nodes`` x ``tasks_per_node`` ranks (DDP/DeepSpeed)
``mrc-prepare``        the fixed adversarial set   one job (sharded PGD over its ranks); skipped when it exists
``mrc``                MRC of the modules          job ARRAY: task i = the i-th balanced group of modules
                                                   (``assign_modules`` with the array size); or, with
                                                   ``stages.mrc.mode: job``, one multi-rank job
``mrc-gather``         ``mrc.csv``, the choice     one small job (no GPU): reads the per-module files
``finetune``           fine-tuning                 one job; with ``stages.finetune.candidates: k`` > 1 an
                                                   ARRAY: task j fine-tunes the j-th lowest-MRC module alone
``interpolate``        the alpha sweep             job ARRAY over alpha (x candidate); or one job
``interpolate-gather`` alpha* (and the candidate)  one small job
``evaluate``           final evaluation            one job, sharded over its ranks
=====================  ==========================  =========================================================

How stages chain: by SLURM dependencies.  Every job is submitted at once with
``--dependency=afterok:<the job before it>`` (an array counts as one job: all its
tasks must succeed) and ``--kill-on-invalid-dep=yes``, so when a job fails the
jobs after it are cancelled by SLURM instead of waiting forever.  No driver job
holds an allocation while others run.  ``--local`` (submitit's local executor:
subprocesses on this machine) and ``--debug`` (submitit's debug executor: in this
process) run the same jobs in the same order, and this process waits for each
before starting the next.

How arrays split: the MRC array gets ``stages.mrc.array_size`` tasks (default:
one per module); the modules, in network order, are cut into that many
contiguous groups of balanced estimated cost (the MRC stage's own
``assign_modules``: contiguity keeps the modules of one residual block in one
task, which then shares one activation cache).  The interpolation array gets
``stages.interpolate.array_size`` tasks (default: one per alpha, per candidate)
over contiguous runs of alphas.  Each task writes the stage's own per-module /
per-alpha result files, so a gather job finishes the stage exactly as ``rift
run`` would (same numbers; see the stage table, :mod:`rift_dist.stages`).

Fine-tuning candidates: with ``stages.finetune.candidates: k`` the MRC gather
records the k lowest-MRC modules (after ``mrc.exclude``), an array fine-tunes
each alone in ``finetune/candidates/<module>/``, the interpolation array sweeps
alpha for each, and the interpolation gather applies the paper's alpha rule over
every (candidate, alpha) pair on the validation split: the best clean accuracy
whose robust accuracy is at most ``interpolation.tolerance`` below the AT model's.
The chosen candidate becomes the run's fine-tuned model; all are listed in
``interpolate/candidates.json``.  k = 1 (the default) is exactly ``rift run``.

Preemption and time limits: every job runs :class:`StageJob`, a
``submitit.helpers.Checkpointable``.  SLURM sends USR2 ``signal_delay_s`` before
the time limit or on preemption; submitit calls :meth:`StageJob.checkpoint` on
global rank 0 only, which saves nothing itself: every rank already saves its
resumable state on the stage's schedule (``train.checkpoint_every`` steps, each
fine-tuning epoch, each MRC module, each alpha).  It returns a
``DelayedSubmission`` of the same task, the job is requeued (same job id), and on
restart every rank resumes from the newest checkpoint on disk — never from state
in the pickle — so all ranks restart at the same step and the result equals an
uninterrupted run's.  Each start and checkpoint is appended to
``<run_dir>/jobs/events.jsonl`` with the step on disk (a start also with rank 0's device, the GPUs
SLURM made visible and the NCCL_* variables the job runs with).

GPU jobs: ``gpus_per_node: N`` asks for N GPUs per node (``--gpus-per-node=N``, or ``--gres=gpu:N``
with ``gpu_request: gres``) and runs N ranks per node (``--ntasks-per-node=N``); each rank uses
``cuda:LOCAL_RANK`` (LOCAL_RANK = SLURM_LOCALID).  A profile's ``env:`` (NCCL_SOCKET_IFNAME, ...) is
exported at the top of every script.  Jobs without GPUs (the gathers) go to the profile's
``cpu_partition`` and inherit no GPU-only option.  Every script starts with a comment header saying
what it runs (:func:`script_header`); the job names are ``rift-<job>``.

MLflow: ``rift submit`` creates the pipeline's parent run (params = the config)
and, ahead of time (status SCHEDULED), one child run per stage and per array
task (MRC task, fine-tuning candidate, alpha), remembered in
``<run_dir>/mlflow/<key>.json``; the jobs only continue those runs, so a requeued
task continues its own run and no job needs the store to be up to start.  Only
global rank 0 logs.  The last job of a submission marks the parent FINISHED; a
failed job marks it FAILED (a re-submission sets it RUNNING again).  Use a
tracking server (``tracking.uri: http://host:5000`` or ``MLFLOW_TRACKING_URI``)
when the run directory is on a shared filesystem: SQLite's file locks are not
reliable over NFS/Lustre.  See :mod:`rift_dist.tracking` for buffering when the
server is down.

The run directory keeps the submission: ``submission.json`` (job ids per job,
array task -> modules / alphas / candidate, dependencies, resources, state of
local runs), ``config.yaml``, ``jobs/<job>/`` (submitit's pickles and logs).
``rift status RUN`` shows every job and task with its state and names failed
tasks with the command that re-submits them; ``rift cancel RUN`` cancels them;
``rift submit RUN`` (a run directory instead of a config) re-submits what is not
done — only the failed array tasks, and the jobs after them — and ``--only
JOB:NAME`` re-submits one task alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import yaml

import submitit

from rift_dist.errors import RiftError
from rift_dist.stages import STAGE_TABLE, STAGES, resolve
from rift_dist.stages import parts as stage_parts
from rift_dist.stages import stage as stage_entry
from rift_dist.stages.common import stage_done

SUBMISSION_FILE = "submission.json"
EVENTS_FILE = Path("jobs") / "events.jsonl"
EXECUTORS = ("slurm", "local", "debug")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "SUBMITTED")
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "BOOT_FAIL", "DEADLINE", "ERROR")


class ClusterError(RiftError, RuntimeError):
    """A submission cannot be made or read: bad profile, missing inputs, jobs still active, no SLURM."""


# ============================================================================== profiles


@dataclass
class Resources:
    """What one job (or each task of an array) asks the cluster for."""

    partition: str = ""
    """SLURM partition (empty = the cluster's default)."""
    account: str = ""
    """SLURM account to charge (empty = your default)."""
    qos: str = ""
    """SLURM quality of service (empty = default)."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (0 = a CPU job).  Each rank uses one: global rank r on a node runs on
    ``cuda:LOCAL_RANK`` (``rift_dist.distributed.Runtime``: LOCAL_RANK mod the GPUs it sees)."""
    gpu_type: str = ""
    """GPU model to ask for (``a100`` -> ``--gpus-per-node=a100:4``); empty = any GPU of the partition."""
    gpu_request: str = "gpus-per-node"
    """How GPUs are asked for: ``gpus-per-node`` (``--gpus-per-node=N``, SLURM >= 19.05 with select/cons_tres)
    or ``gres`` (``--gres=gpu:N``, for clusters on select/cons_res or sites that ask for it)."""
    tasks_per_node: int = 0
    """Processes (ranks) per node; 0 = one per GPU (one in a CPU job).  In a GPU job it must be 0 or
    ``gpus_per_node``: two ranks on one GPU make NCCL fail, fewer ranks leave GPUs idle."""
    cpus_per_task: int = 1
    """CPU cores per rank (also torch's thread count when ``precision.threads`` is 0)."""
    mem_gb: float = 0.0
    """Memory per node in GB (0 = the partition's default)."""
    time_min: int = 60
    """Time limit of one run of the job, in minutes (a timed-out job is requeued, see max_requeues)."""
    constraint: str = ""
    """SLURM --constraint (node features, e.g. a100)."""
    exclude: str = ""
    """Nodes to avoid (SLURM --exclude)."""
    env: dict = field(default_factory=dict)
    """Environment variables exported at the start of the job script, before ``setup``, e.g.
    ``{NCCL_SOCKET_IFNAME: ib0, NCCL_IB_DISABLE: 0}``.  A stage's ``env`` is merged over the top-level one.
    The launcher's variables (RANK, MASTER_ADDR, ...) and CUDA_VISIBLE_DEVICES are refused: rift and
    SLURM set them."""
    setup: list = field(default_factory=list)
    """Shell lines run before the job (e.g. 'module load cuda/13.0', 'source /path/venv/bin/activate')."""
    sbatch: dict = field(default_factory=dict)
    """Extra sbatch options, e.g. {mail-type: FAIL, reservation: rift}."""
    signal_delay_s: int = 120
    """Seconds between SLURM's warning signal (USR2) and the time limit: time to reach a checkpoint."""
    max_requeues: int = 3
    """How many times a job that hits its time limit is requeued (preemptions do not count)."""
    array_parallelism: int = 64
    """Most tasks of one array running at once."""
    master_port: int = 0
    """TCP port of the rendezvous of a multi-rank job (0 = derived from the job id and checked free, see
    :func:`rendezvous_port`); set it only when the cluster reserves a port range for you."""

    def ranks_per_node(self) -> int:
        """``tasks_per_node``, or one per GPU (at least one)."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def gpu_option(self) -> tuple[str, str] | None:
        """The sbatch option asking for this job's GPUs, as (name, value), or None for a CPU job:
        ``("gpus-per-node", "4")``, ``("gpus-per-node", "a100:4")`` or ``("gres", "gpu:a100:4")``."""
        if not self.gpus_per_node:
            return None
        count = f"{self.gpu_type}:{int(self.gpus_per_node)}" if self.gpu_type else str(int(self.gpus_per_node))
        if self.gpu_request == "gres":
            return "gres", f"gpu:{count}"
        return "gpus-per-node", count


RESOURCE_FIELDS = {f.name: f for f in dataclasses.fields(Resources)}
PLANNER_SBATCH_OPTIONS: dict[str, str] = {
    "array": "rift submit makes the arrays (one task per module group / alpha / candidate; split to fit the "
             "cluster's MaxArraySize); set stages.<stage>.array_size, and array_parallelism for the '%N' limit",
    "dependency": "rift submit chains the jobs with afterok dependencies; use --stages / --only to choose jobs",
    "kill-on-invalid-dep": "rift submit sets it so a failed job cancels the jobs after it",
    "job-name": "rift submit names the jobs rift-<job> (rift status and rift cancel find them by id)",
    "output": "submitit writes the logs to <run_dir>/jobs/<job>/ (rift status points to them)",
    "error": "submitit writes the logs to <run_dir>/jobs/<job>/ (rift status points to them)",
    "wrap": "submitit writes the job script",
    "requeue": "submitit requeues checkpointable jobs itself (see max_requeues)",
    "signal": "use signal_delay_s",
    "nodes": "use the profile key nodes", "ntasks-per-node": "use tasks_per_node", "ntasks": "use tasks_per_node",
    "cpus-per-task": "use cpus_per_task", "time": "use time_min", "gpus-per-node": "use gpus_per_node",
    "gres": "use gpus_per_node (and gpu_request: gres)", "gpus": "use gpus_per_node",
    "gpus-per-task": "use gpus_per_node: each rank gets one GPU (cuda:LOCAL_RANK)",
    "ntasks-per-gpu": "use gpus_per_node (one rank per GPU)", "gpus-per-socket": "use gpus_per_node",
    "cpus-per-gpu": "use cpus_per_task (sbatch refuses it together with --cpus-per-task)",
    "mem-per-gpu": "use mem_gb (per node)", "mem-per-cpu": "use mem_gb (per node)",
    "mem": "use mem_gb", "partition": "use the profile key partition (cpu_partition for jobs without GPUs)",
    "account": "use the profile key account", "qos": "use the profile key qos",
    "constraint": "use the profile key constraint", "exclude": "use the profile key exclude",
}
"""sbatch options a profile's ``sbatch:`` mapping may not set (the planner owns them), with the fix."""
SBATCH_SHORT = {"a": "array", "d": "dependency", "J": "job-name", "o": "output", "e": "error", "N": "nodes",
                "n": "ntasks", "c": "cpus-per-task", "t": "time", "p": "partition", "A": "account", "q": "qos",
                "C": "constraint", "x": "exclude", "G": "gpus"}
GPU_SBATCH_OPTIONS = ("gpu-bind", "gpu-freq")
"""GPU options a profile's ``sbatch:`` may set; a job without GPUs does not inherit them from the top level."""
ENV_REFUSED = {**{k: "rift sets the launcher variables of every rank itself" for k in
                  ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
               "CUDA_VISIBLE_DEVICES": "SLURM sets it to the GPUs it allocated; each rank then takes cuda:LOCAL_RANK",
               "SUBMITIT_EXECUTOR": "submitit sets it"}
"""Environment variables a profile's ``env:`` may not set, with the reason."""
GATHER = "gather"
"""The profile key of the small file-reading jobs (every stage's gather job)."""


def _profile_keys() -> tuple[str, ...]:
    keys: list[str] = []
    for s in STAGE_TABLE:
        own = [p.resources for p in s.shards.parts()] if s.shards else []
        keys += [k for k in own if k not in (s.name, GATHER)] + [s.name]
        if GATHER in own and GATHER not in keys:
            keys.append(GATHER)
    return tuple(keys)


PROFILE_STAGES = _profile_keys()
"""Keys of a profile's ``stages:`` section, from the stage table: each stage, its prepare job's key
(``mrc_prepare``, which inherits the stage's resources) and ``gather`` (every small gather job)."""
STAGE_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {s.name: dict(s.shards.options) for s in STAGE_TABLE
                                                         if s.shards}
"""Non-resource options per stage (the stage table's ``Shards.options``): (type, default).  array_size 0 =
one task per module / alpha."""
PREPARE_OF = {p.resources: s.name for s in STAGE_TABLE if s.shards
              for p in s.shards.parts() if p.resources not in (s.name, GATHER)}
"""{profile key of a prepare job: its stage} (a prepare job inherits its stage's resources)."""
GATHER_DEFAULTS = {"gpus_per_node": 0, "tasks_per_node": 1, "nodes": 1, "time_min": 30}
"""What the gather jobs ask for unless ``stages.gather`` says otherwise (they only read files)."""
GPU_ONLY_FIELDS = ("constraint", "gpu_type")
"""Top-level Resources fields a job without GPUs does not inherit (a node feature such as ``a100`` would
send a CPU-only gather to a GPU node, or be refused on a CPU partition); a stage may still set them."""


@dataclass
class Profile:
    """A launch profile: the executor, default resources and per-stage overrides and options.

    Attributes:
        name: where it came from (file path or ``<defaults>``).
        executor: slurm, local or debug.
        python: interpreter the jobs run (empty = the one running ``rift submit``).
        defaults: resources every job asks for unless its stage overrides them.
        stages: {stage key: {resource field or stage option: value}} (see PROFILE_STAGES, STAGE_OPTIONS).
        cpu_partition: partition of the jobs that use no GPU (the gathers, and any stage with
            ``gpus_per_node: 0``) unless their stage names a ``partition``; empty = the top-level one.
        check_paths: refuse a submission whose input paths (data, corruption set, checkpoint) are
            missing on this machine (:mod:`rift_dist.preflight`); false when the jobs see a filesystem
            this machine does not (node-local data): the problems are then printed as warnings.
    """

    name: str = "<defaults>"
    executor: str = "slurm"
    python: str = ""
    defaults: Resources = field(default_factory=Resources)
    stages: dict = field(default_factory=dict)
    cpu_partition: str = ""
    check_paths: bool = True

    def _stage_overrides(self, key: str) -> dict:
        """The Resources fields stage key ``key`` sets itself (a prepare job's key, ``mrc_prepare``, inherits
        its stage's)."""
        over = {}
        if key in PREPARE_OF:
            over.update({k: v for k, v in self.stages.get(PREPARE_OF[key], {}).items() if k in RESOURCE_FIELDS})
        over.update({k: v for k, v in self.stages.get(key, {}).items() if k in RESOURCE_FIELDS})
        return over

    def resources(self, key: str) -> Resources:
        """Resources of the jobs of stage key ``key``: the top-level defaults, then GATHER_DEFAULTS for the
        gathers, then the stage's overrides (``env`` is merged key by key; other fields are replaced).

        A job that ends up with no GPU goes to ``cpu_partition`` (when the profile names one and the stage
        sets no ``partition``) and does not inherit the top-level GPU-only fields (``constraint``,
        ``gpu_type``: GPU_ONLY_FIELDS) nor the top-level GPU sbatch options (GPU_SBATCH_OPTIONS).
        """
        over = self._stage_overrides(key)
        base = dataclasses.asdict(self.defaults)
        if key == GATHER:
            base.update(GATHER_DEFAULTS)
        env = {**base.get("env", {}), **over.get("env", {})}
        base.update(over)
        base["env"] = env
        if not base["gpus_per_node"]:
            for name in GPU_ONLY_FIELDS:
                if name not in over:
                    base[name] = RESOURCE_FIELDS[name].default
            if "sbatch" not in over:
                base["sbatch"] = {k: v for k, v in base["sbatch"].items()
                                  if _sbatch_name(k) not in GPU_SBATCH_OPTIONS}
            if self.cpu_partition and "partition" not in over:
                base["partition"] = self.cpu_partition
        return Resources(**base)

    def option(self, stage: str, name: str):
        """Stage option ``name`` of ``stage`` (its default when the profile does not set it)."""
        tp, default = STAGE_OPTIONS[stage][name]
        return self.stages.get(stage, {}).get(name, default)

    def to_dict(self) -> dict:
        """The profile as plain data (for submission.json and ``--profile`` round trips)."""
        return {"name": self.name, "executor": self.executor, "python": self.python,
                "cpu_partition": self.cpu_partition, "check_paths": self.check_paths,
                **dataclasses.asdict(self.defaults), "stages": self.stages}


def _field_type(name: str) -> type:
    """The Python type of Resources field ``name`` (from its default)."""
    f = RESOURCE_FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(default)


def _check_type(value, tp, key: str, source: str):
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is list and isinstance(value, str):
        return [value]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ClusterError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def profile_from_dict(data: dict, source: str = "<dict>") -> Profile:
    """Build and validate a :class:`Profile` from a mapping (the YAML file's content).

    Raises:
        ClusterError: an unknown key, a wrong type or a bad value (names the key and the file, lists
            the valid keys).
    """
    data = dict(data or {})
    top = {"executor", "python", "stages", "name", "cpu_partition", "check_paths"} | set(RESOURCE_FIELDS)
    unknown = sorted(set(data) - top)
    if unknown:
        raise ClusterError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(top))}")
    executor = data.pop("executor", "slurm")
    if executor not in EXECUTORS:
        raise ClusterError(f"{source}: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    python = str(data.pop("python", "") or "")
    name = str(data.pop("name", source))
    cpu_partition = _check_type(data.pop("cpu_partition", "") or "", str, "cpu_partition", source)
    check_paths = _check_type(data.pop("check_paths", True), bool, "check_paths", source)
    stages_raw = data.pop("stages", {}) or {}
    if not isinstance(stages_raw, dict):
        raise ClusterError(f"{source}: 'stages' must be a mapping of stage -> overrides")
    defaults = {k: _check_type(v, _field_type(k), k, source) for k, v in data.items()}
    stages: dict[str, dict] = {}
    for stage, over in stages_raw.items():
        if stage not in PROFILE_STAGES:
            raise ClusterError(f"{source}: unknown stage {stage!r} under 'stages'; valid: {', '.join(PROFILE_STAGES)}")
        if not isinstance(over, dict):
            raise ClusterError(f"{source}: stages.{stage} must be a mapping, got {over!r}")
        options = STAGE_OPTIONS.get(stage, {})
        checked = {}
        for k, v in over.items():
            if k in RESOURCE_FIELDS:
                checked[k] = _check_type(v, _field_type(k), f"stages.{stage}.{k}", source)
            elif k in options:
                checked[k] = _check_type(v, options[k][0], f"stages.{stage}.{k}", source)
            else:
                valid = sorted(set(RESOURCE_FIELDS) | set(options))
                raise ClusterError(f"{source}: unknown key stages.{stage}.{k}; valid: {', '.join(valid)}")
        stages[stage] = checked
    _check_sbatch_keys(defaults.get("sbatch", {}), "sbatch", source)
    _check_env(defaults.get("env", {}), "env", source)
    for stage, over in stages.items():
        _check_sbatch_keys(over.get("sbatch", {}), f"stages.{stage}.sbatch", source)
        _check_env(over.get("env", {}), f"stages.{stage}.env", source)
    for stage, options in STAGE_OPTIONS.items():
        mode = stages.get(stage, {}).get("mode", "array")
        if "mode" in options and mode not in ("array", "job"):
            raise ClusterError(f"{source}: stages.{stage}.mode must be array or job, got {mode!r}")
        if "candidates" in options and stages.get(stage, {}).get("candidates", 1) < 1:
            raise ClusterError(f"{source}: stages.{stage}.candidates must be >= 1")
    profile = Profile(name=name, executor=executor, python=python, defaults=Resources(**defaults), stages=stages,
                      cpu_partition=cpu_partition, check_paths=check_paths)
    for key in PROFILE_STAGES:
        res = profile.resources(key)
        own = [k for k in ((key, PREPARE_OF[key]) if key in PREPARE_OF else (key,)) if k in stages]
        where = f"stages.{own[0]} (or the top level)" if own else "the top level"
        if res.nodes < 1 or res.time_min < 1 or res.cpus_per_task < 1 or res.gpus_per_node < 0:
            raise ClusterError(f"{source}: stage {key} asks for nodes={res.nodes}, time_min={res.time_min}, "
                               f"cpus_per_task={res.cpus_per_task}, gpus_per_node={res.gpus_per_node}; "
                               f"nodes, time_min and cpus_per_task must be >= 1, gpus_per_node >= 0")
        if res.gpu_request not in GPU_REQUESTS:
            raise ClusterError(f"{source}: gpu_request of stage {key} is {res.gpu_request!r}; choose one of "
                               f"{', '.join(GPU_REQUESTS)} (fix it in {where})")
        if res.gpus_per_node and res.tasks_per_node not in (0, res.gpus_per_node):
            raise ClusterError(f"{source}: stage {key} asks for {res.gpus_per_node} GPU(s) per node but "
                               f"tasks_per_node={res.tasks_per_node}: every rank drives one GPU (cuda:LOCAL_RANK), "
                               f"so a GPU job runs one rank per GPU; set tasks_per_node: 0 (= one per GPU) or "
                               f"{res.gpus_per_node} in {where}")
    return profile


GPU_REQUESTS = ("gpus-per-node", "gres")
"""Values of the profile key ``gpu_request``."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env(env: dict, where: str, source: str) -> None:
    """Refuse ``env:`` entries that are not ``NAME: scalar`` or that rift / SLURM set themselves (ENV_REFUSED).

    Raises:
        ClusterError: naming the entry, the profile file and the fix.
    """
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise ClusterError(f"{source}: {where}.{key} is not an environment variable name (letters, digits "
                               f"and _, not starting with a digit)")
        if str(key) in ENV_REFUSED:
            raise ClusterError(f"{source}: {where}.{key} may not be set in a profile: {ENV_REFUSED[str(key)]}; "
                               f"remove it from {source}")
        if isinstance(value, (dict, list)) or value is None:
            raise ClusterError(f"{source}: {where}.{key} must be a string or a number, got {value!r}")


def _sbatch_name(key) -> str:
    """An sbatch option as sbatch spells it in full: leading dashes dropped, ``_`` read as ``-``, one-letter
    forms (``a``, ``d``, ``J``, ...) mapped to the long ones (SBATCH_SHORT)."""
    norm = str(key).lstrip("-")
    return SBATCH_SHORT.get(norm, norm.replace("_", "-").lower())


def _check_sbatch_keys(extra: dict, where: str, source: str) -> None:
    """Refuse sbatch options the planner owns (``array``, ``dependency``, ...; see PLANNER_SBATCH_OPTIONS).

    Keys are compared as sbatch spells them: leading dashes dropped, ``_`` read as ``-``, one-letter
    forms (``a``, ``d``, ``J``, ...) mapped to the long ones.

    Raises:
        ClusterError: naming the key, the profile file and the fix.
    """
    for key in extra or {}:
        raw = str(key)
        norm = _sbatch_name(raw)
        if norm in PLANNER_SBATCH_OPTIONS:
            raise ClusterError(f"{source}: {where}.{raw} sets the sbatch option --{norm}, which rift submit sets "
                               f"itself for every job ({PLANNER_SBATCH_OPTIONS[norm]}); remove {where}.{raw} from "
                               f"{source}")


def load_profile(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read a launch profile YAML (None = the built-in defaults) and apply ``key=value`` overrides
    (``partition=gpu``, ``stages.mrc.array_size=8``; values parsed as YAML).

    Raises:
        ClusterError: a missing file (says where profiles live), invalid YAML or an invalid profile.
    """
    data: dict = {}
    source = "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ClusterError(f"profile {p} not found; profiles live in launch/ (e.g. launch/example_cluster.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ClusterError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ClusterError(f"{p}: a profile is a mapping of keys to values")
        source = str(p)
    for item in overrides:
        if "=" not in item:
            raise ClusterError(f"--profile-set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ClusterError(f"--profile-set {item}: {part} is not a mapping")
        node[parts[-1]] = _parse_value(value)
    profile = profile_from_dict(data, source)
    return profile


# ============================================================================== planning


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
    if tasks:
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
            if not j.tasks:
                raise ClusterError(f"--only {j.name}:{','.join(wanted[j.name])} matches no task of job {j.name}")
    for i, job in enumerate(jobs):
        job.depends_on = [jobs[i - 1].name] if i else []
    return jobs


# ============================================================================== cluster limits


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
    def default_runner(argv):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
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
            limits.notes.append(f"`{' '.join(argv)}` failed ({_last_line(err or out)[:160]}); {after}")
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


# ============================================================================== job side


def _events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_FILE


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


def checkpoint_position(folder: Path) -> tuple[int, int] | None:
    """(epoch, next step) of the newest resumable checkpoint in ``folder`` (``ckpt-<id>.pt``), or None.

    Both training loops number checkpoints ``epoch * 1_000_000 + step`` (step 0 = the epoch's start).
    """
    ckpts = sorted(folder.glob("ckpt-*.pt"))
    if not ckpts:
        return None
    n = int(ckpts[-1].stem.split("-")[1])
    return n // 1_000_000, n % 1_000_000


def progress_on_disk(spec: dict) -> dict:
    """Where a requeued task would resume: the newest checkpoint (stages that checkpoint: epoch and step)
    or what its part says (the MRC array: the number of finished modules; :attr:`Part.progress`)."""
    run_dir = Path(spec["run_dir"])
    part, args = spec["part"], spec["args"]
    if part == "stage":
        entry = stage_entry(args["stage"])
        if not entry.checkpoints:
            return {}
        epoch, step = checkpoint_position(run_dir / entry.name / "checkpoints") or (0, 0)
        return {"epoch": epoch, "step": step}
    found = stage_parts().get(part)
    if found and found[1].progress:
        return resolve(found[1].progress)(run_dir, args)
    return {}


PORT_BASE, PORT_SPAN = 20000, 40000
"""Derived rendezvous ports lie in PORT_BASE .. PORT_BASE + PORT_SPAN - 1 (20000-59999)."""
RENDEZVOUS_DIR = Path("jobs") / "rendezvous"
"""Where rank 0 of a multi-rank job writes the port it chose (``<run_dir>/jobs/rendezvous/<key>.port``)."""


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
    from rift_dist.distributed import free_port

    path = Path(run_dir) / RENDEZVOUS_DIR / f"{key}.port"
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

    Sets up the launcher environment, the config (from the submission), torch, the process group
    (``Runtime``: torchrun / SLURM / submitit-local variables) and the stage context attached to the
    pipeline's MLflow parent run; runs the part; tears down in ``finally``.  Global rank 0 records
    start / end / failure in ``jobs/events.jsonl`` and logs to the task's MLflow run.

    Returns:
        {"job", "task", "outputs"}.

    Raises:
        whatever the part raises (StageError for missing inputs, DistributedError for a dead rank, ...).
    """
    if spec.get("executor") != "debug":
        _prepare_environment(spec)
    from rift_dist.config import from_dict
    from rift_dist.distributed import Runtime
    from rift_dist.pipeline import configure_torch, make_context

    cfg = from_dict(spec["config"], source=f"{spec['run_dir']}/config.yaml (as submitted)")
    run_dir = Path(spec["run_dir"])
    configure_torch(cfg)
    if not cfg.precision.threads:
        torch_threads_from_slurm()
    runtime = Runtime(cfg)
    ctx = None
    run = None
    status = "FAILED"
    try:
        ctx = make_context(cfg, run_dir, runtime, progress=False, parent_run_id=spec.get("parent_run_id"))
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
        if ctx is not None:
            tracker = ctx.tracker
            if run is not None and owns_run(spec["part"]):
                tracker.end(run, status)
            if status == "FAILED":
                tracker.parent.set_tags({"rift.failed": f"{spec['job']} task {spec['index']} ({spec['label']})"})
                tracker.end(tracker.parent, "FAILED")
            elif status == "FINISHED" and spec.get("last"):
                tracker.end(tracker.parent, "FINISHED")
            tracker.close()
        runtime.close()


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


# ============================================================================== submission


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_submission(run_dir: str | Path) -> dict:
    """The run's ``submission.json``.

    Raises:
        ClusterError: when there is none (names the file and how to make one).
    """
    path = Path(run_dir) / SUBMISSION_FILE
    if not path.is_file():
        raise ClusterError(f"{path} not found: {run_dir} was not submitted with `rift submit` "
                           f"(or the path is wrong)")
    return json.loads(path.read_text())


def write_submission(run_dir: str | Path, record: dict) -> None:
    """Write ``submission.json`` atomically."""
    path = Path(run_dir) / SUBMISSION_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


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
             f"# config:  {config_path or '(given as a mapping; see config.yaml in the run directory)'}",
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
        return read_submission(run_dir) if (run_dir / SUBMISSION_FILE).is_file() else {}
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
    record = json.loads((run_dir / SUBMISSION_FILE).read_text()) if (run_dir / SUBMISSION_FILE).is_file() else None
    if record is not None and kind == "slurm" == record.get("executor"):
        active = _active_jobs(record)
        if active:
            raise ClusterError(f"jobs of {run_dir} are still queued or running: {', '.join(active[:8])}"
                               f"{' ...' if len(active) > 8 else ''}; wait for them (rift status {run_dir}) or "
                               f"cancel them (rift cancel {run_dir}) before submitting again")
    undo = _Undo(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = flatten(cfg)  # as the user wrote it (rift run logs the same)
    dump_yaml(cfg, run_dir / "config.yaml")
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
        folder = run_dir / "jobs" / job.family
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
        cfg_file = run_dir / "config.yaml"
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
            (self.run_dir / "config.yaml").write_bytes(self.config)
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
    reason = _last_line(str(exc)) or type(exc).__name__
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
            marked = f" (Could not mark the MLflow parent run {parent_run_id} FAILED: {_last_line(str(mexc))}.)"
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
        f"{what}; {gone}. Nothing of this submission is left in {run_dir} (no submission.json; config.yaml "
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
            task["error"] = _last_line(str(exc))
            failures.append(f"{job.name} task {task['index']} ({task['label']}): {task['error']}")
    write_submission(run_dir, record)
    if failures:
        raise ClusterError("failed: " + "; ".join(failures) + f". Logs: {entry['folder']}. Re-submit what is not done "
                           f"with `rift submit {run_dir} --{kind}`")


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


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
            script = sbatch_script(r, job.name, run_dir / "jobs" / (job.family or job.name), python, deps,
                                   len(job.tasks) if job.array and len(job.tasks) > 1 else None,
                                   script_header(job, run_dir, config_path))
            log("\n".join("      | " + line for line in script.splitlines()))


# ============================================================================== status / cancel


def _sacct(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        out.update({x: state.strip() for x in _expand_array_id(jid.strip())})
    return out


def _squeue(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    wanted = set(ids)
    try:
        proc = subprocess.run(["squeue", "-h", "--me", "--array", "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        if line.count("|") < 2:
            continue
        jid, state, reason = line.split("|", 2)
        label = state.strip() + (f" ({reason.strip()})" if reason.strip() and reason.strip() != "None" else "")
        for x in _expand_array_id(jid.strip()):
            if x.split("_")[0] in wanted:
                out[x] = label
    return out


def _expand_array_id(jid: str) -> list[str]:
    """``123_[0-2,5%4]`` -> 123_0, 123_1, 123_2, 123_5; other ids unchanged."""
    if "_[" not in jid:
        return [jid]
    base, rest = jid.split("_[", 1)
    rest = rest.rstrip("]").split("%")[0]
    out = []
    for part in rest.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def _result_state(folder: str, job_id: str) -> tuple[str, str] | None:
    """(state, error) from submitit's result pickle of a task, or None when it has none yet."""
    path = Path(folder) / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            outcome, payload = pickle.load(fh)
    except Exception:  # noqa: BLE001 - an unreadable pickle just means "unknown"
        return None
    if outcome == "success":
        return "COMPLETED", ""
    return "FAILED", _last_line(str(payload))


def job_states(record: dict) -> dict[str, str]:
    """{task job id: state} for every task of every submission of a run.

    SLURM: ``squeue`` (pending / running, with the reason) then ``sacct`` (finished); local and
    debug: the state recorded by the waiting process, or submitit's result files.
    """
    tasks = [(job, t) for sub in record.get("submissions", []) for job in sub["jobs"] for t in job["tasks"]]
    states: dict[str, str] = {}
    if record.get("executor") == "slurm":
        bases = sorted({job["job_id"] for job, _ in tasks})
        queued = _squeue(bases)
        finished = _sacct(bases)
        for job, t in tasks:
            jid = t["job_id"]
            states[jid] = queued.get(jid) or finished.get(jid) or (_result_state(job["folder"], jid) or ("UNKNOWN",))[0]
    else:
        for job, t in tasks:
            found = _result_state(job["folder"], t["job_id"])
            states[t["job_id"]] = t.get("state") if t.get("state") in ("COMPLETED", "FAILED") else (
                found[0] if found else t.get("state", "UNKNOWN"))
    return states


def _outputs_summary(run_dir: Path) -> str:
    """One line: which stages are done, how many partial results (modules, alphas) exist."""
    bits = []
    for s in STAGE_TABLE:
        partial = resolve(s.results)(run_dir) if s.results else ""
        bits.append(f"{s.name} done" if (run_dir / s.name / "done.json").is_file() else
                    f"{s.name} {partial}" if partial else f"{s.name} -")
    return ", ".join(bits)


def task_done_on_disk(run_dir: str | Path, job: dict, task: dict) -> bool:
    """Whether the work of a recorded task is on disk (done by this task or by a later re-submission).

    Part ``stage``: the stage's done marker; a piece of a stage's shards: its :attr:`Part.done`, else
    (the gathers) the stage's done marker.
    """
    run_dir = Path(run_dir)
    part, args = job["part"], task.get("args", {})
    if part == "stage":
        return (run_dir / args.get("stage", job["stage"]) / "done.json").is_file()
    found = stage_parts().get(part)
    if found is None:
        return False
    if found[1].done:
        return bool(resolve(found[1].done)(run_dir, args))
    return (run_dir / found[0].name / "done.json").is_file()


def _lock_holder(run_dir: Path) -> str | None:
    """'host H, PID P, command C, since S' of the live process holding the run directory's lock, or None.

    Probes the lock (``flock``, non-blocking, released at once) without creating or writing anything.
    """
    import fcntl

    from rift_dist.run_lock import LOCK_NAME, _describe

    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fh.read())
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def stage_state_on_disk(run_dir: Path, stage: str) -> str:
    """A stage's state read from the run directory: 'done', 'in progress (...)' or 'not started'."""
    entry = stage_entry(stage)
    folder = run_dir / stage
    if (folder / "done.json").is_file():
        return "done"
    if entry.checkpoints and (position := checkpoint_position(folder / "checkpoints")) is not None:
        epoch, step = position
        where = f"epoch {epoch + 1}, step {step}" if step else f"{epoch} epoch(s) done"
        return f"in progress (checkpoint: {where})"
    partial = resolve(entry.results)(run_dir) if entry.results else ""
    if partial:
        return f"in progress ({partial})"
    return "in progress" if folder.is_dir() and any(folder.iterdir()) else "not started"


def _pending_ops(run_dir: Path) -> int:
    """How many MLflow writes wait in ``mlflow/pending/*.json`` files under ``run_dir``."""
    n = 0
    for path in run_dir.rglob("mlflow/pending/*.json"):
        try:
            n += len(json.loads(path.read_text()).get("ops", []))
        except (OSError, ValueError):
            continue
    return n


def local_status(run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """``rift status`` of a run started with ``rift run`` (no ``submission.json``).

    Prints whether a process is running on the directory (its lock holder), each stage's state on disk
    (done, in progress with the checkpoint's epoch / step or the modules and alphas done, not started),
    the MLflow parent run, and sends the MLflow writes that earlier processes could not send
    (``<run_dir>/mlflow/pending``: metrics, params, tags, statuses and buffered run creations), saying
    how many were sent and how many still wait.

    Returns:
        {"states": {stage: state}, "failed": [], "active": [lock holder, if any],
        "pending_sent": int, "pending_left": int}.

    Raises:
        ClusterError: when ``run_dir`` is not a run directory (no ``config.yaml``); nothing is written.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ClusterError(f"{run_dir} is not a rift run directory (it has no config.yaml nor {SUBMISSION_FILE}); "
                           f"give the --run-dir of a `rift run` or `rift submit`")
    holder = _lock_holder(run_dir)
    log(f"run {run_dir} (local: started with `rift run`, no {SUBMISSION_FILE})")
    log(f"  {'running: ' + holder if holder else 'no rift process is running on it'}")
    states = {s: stage_state_on_disk(run_dir, s) for s in STAGES}
    for s, state in states.items():
        log(f"  {s:<12} {state}")
    before = _pending_ops(run_dir)
    marker = run_dir / "mlflow_run.json"
    if marker.is_file():
        data = json.loads(marker.read_text())
        log(f"  MLflow parent run {data.get('run_id')} at {data.get('tracking_uri')}")
        if before:
            _replay_local_pending(run_dir, data)
    elif before:
        log(f"  MLflow: {before} buffered write(s) but no {marker.name}: cannot tell which parent run they belong to")
    left = _pending_ops(run_dir)
    if before:
        log(f"  MLflow: sent {before - left} buffered write(s)" +
            (f"; {left} still wait (the store does not answer): run `rift status {run_dir}` again later"
             if left else ""))
    return {"states": states, "failed": [], "active": [holder] if holder else [],
            "pending_sent": before - left, "pending_left": left}


def _replay_local_pending(run_dir: Path, marker: dict) -> None:
    """Send the pending MLflow writes of a local run (and of its sub-run directories) to its parent's store."""
    try:
        from rift_dist.config import load_config
        from rift_dist.tracking import Tracker

        cfg = load_config(run_dir / "config.yaml")
        cfg.tracking.enabled = True
        cfg.tracking.uri = marker.get("tracking_uri") or cfg.tracking.uri
        for owner in sorted({p.parent.parent.parent for p in run_dir.rglob("mlflow/pending/*.json")}):
            parent = marker.get("run_id")
            sub = owner / "mlflow_run.json"
            if owner != run_dir and sub.is_file():
                parent = json.loads(sub.read_text()).get("run_id", parent)
            Tracker(cfg, owner, parent_run_id=parent).close()
    except Exception as exc:  # noqa: BLE001 - status must still print
        print(f"rift: could not send buffered MLflow writes: {type(exc).__name__}: {exc}", file=sys.stderr)


def status(run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Print every job and task of a run with its state; name failed tasks and how to re-submit them.

    Also sends MLflow writes that earlier jobs could not send (``<run_dir>/mlflow/pending``).  A run
    without ``submission.json`` (started with ``rift run``) gets :func:`local_status`.

    Returns:
        {"states": {task job id: state}, "failed": [task descriptions], "active": [...]}.

    Raises:
        ClusterError: when ``run_dir`` is neither a submitted nor a local run directory.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / SUBMISSION_FILE).is_file():
        return local_status(run_dir, log)
    record = read_submission(run_dir)
    _replay_pending(run_dir, record)
    states = job_states(record)
    tr = record.get("tracking", {})
    log(f"run {run_dir}")
    log(f"  executor {record.get('executor')}, profile {record.get('profile', {}).get('name')}; MLflow parent run "
        f"{tr.get('parent_run_id')} at {tr.get('uri')} (experiment {tr.get('experiment')})")
    requeues: dict[str, int] = {}  # checkpoint() calls (= requeues) per task job id
    for e in read_events(run_dir):
        if e["event"] == "checkpoint":
            requeues[str(e.get("job_id"))] = requeues.get(str(e.get("job_id")), 0) + 1
    failed, active = [], []
    for n, sub in enumerate(record.get("submissions", []), 1):
        log(f"submission {n} ({sub['time']}){' --only ' + ' '.join(sub['only']) if sub.get('only') else ''}:")
        log(f"  {'job':<19} {'id':<14} {'task':>4}  {'state':<34} what")
        for job in sub["jobs"]:
            for t in job["tasks"]:
                state = states.get(t["job_id"], "UNKNOWN")
                task = str(t["index"]) if job["array"] else "-"
                n_requeued = requeues.get(t["job_id"], 0)
                shown = state + (f", requeued {n_requeued}x" if n_requeued else "")
                log(f"  {job['name']:<19} {t['job_id']:<14} {task:>4}  {shown:<34} {t['label']}")
                word = state.split()[0]
                if word in FAILED_STATES or word.startswith("CANCELLED"):
                    err = t.get("error") or (_result_state(job["folder"], t["job_id"]) or ("", ""))[1]
                    if "Dependency" in state or (word.startswith("CANCELLED") and job.get("dependency")
                                                 and not err):
                        continue  # cancelled because an earlier job failed: not a failure of its own
                    failed.append((job, t, state, err))
                elif word in ACTIVE_STATES:
                    active.append(t["job_id"])
    log(f"outputs: {_outputs_summary(run_dir)}")
    still_failed = [(j, t, s, e) for j, t, s, e in failed if not task_done_on_disk(run_dir, j, t)]
    executor_flag = "" if record.get("executor") == "slurm" else f" --{record.get('executor')}"
    for job, t, state, err in still_failed:
        what = f"{job['name']} task {t['index']} ({t['label']})" if job["array"] else f"{job['name']} ({t['label']})"
        log(f"FAILED: {what}: {state}{' — ' + err if err else ''}; log: {job['folder']}/{t['job_id']}_0_log.err")
        name = t["names"][0] if t.get("names") else str(t["index"])
        log(f"  re-submit it alone: rift submit {run_dir} --only {job.get('family') or job['name']}"
            f"{':' + name if job['array'] else ''}"
            f"{executor_flag}")
    if still_failed:
        log(f"  or re-submit everything that is not done (failed tasks and the jobs after them): "
            f"rift submit {run_dir}{executor_flag}")
    return {"states": states, "failed": [f"{j['name']}:{t['label']}" for j, t, _, _ in still_failed],
            "active": active}


def _replay_pending(run_dir: Path, record: dict) -> None:
    """Send MLflow writes saved by jobs that ended while the store was down."""
    tr = record.get("tracking", {})
    if not tr.get("enabled") or not any(run_dir.rglob("mlflow/pending/*.json")):
        return
    try:
        from rift_dist.config import load_config
        from rift_dist.tracking import Tracker

        cfg = load_config(run_dir / "config.yaml")
        cfg.tracking.uri = tr.get("uri") or cfg.tracking.uri
        for pending in sorted({p.parent.parent.parent for p in run_dir.rglob("mlflow/pending/*.json")}):
            Tracker(cfg, pending, parent_run_id=tr.get("parent_run_id")).close()
    except Exception as exc:  # noqa: BLE001 - status must still print
        print(f"rift: could not send buffered MLflow writes: {exc}", file=sys.stderr)


def cancel(run_dir: str | Path, log: Callable[[str], None] = print) -> list[str]:
    """Cancel every queued or running job of a run (SLURM: scancel; local: SIGTERM to the job's process).

    Marks the MLflow parent run KILLED.  Returns the ids cancelled.

    Raises:
        ClusterError: no submission, or scancel failing.
    """
    run_dir = Path(run_dir).resolve()
    record = read_submission(run_dir)
    states = job_states(record)
    active = [jid for jid, s in states.items() if s.split()[0] in ACTIVE_STATES or s in ("RUNNING", "SUBMITTED")]
    if not active:
        log(f"rift: no queued or running job in {run_dir}")
        return []
    if record.get("executor") == "slurm":
        bases = sorted({jid.split("_")[0] for jid in active})  # an array's id cancels all its remaining tasks
        proc = subprocess.run(["scancel", *bases], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"scancel failed: {proc.stderr.strip() or proc.stdout.strip()}")
    else:
        for jid in active:
            pid = int(jid.split("_")[0]) if jid.split("_")[0].isdigit() else 0
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") if pid else ""
            except OSError:
                cmdline = ""
            if "submitit" in cmdline:
                os.kill(pid, signal.SIGTERM)
    tr = record.get("tracking", {})
    if tr.get("enabled") and tr.get("parent_run_id"):
        try:
            from rift_dist.config import load_config
            from rift_dist.tracking import Tracker

            cfg = load_config(run_dir / "config.yaml")
            cfg.tracking.uri = tr.get("uri") or cfg.tracking.uri
            tracker = Tracker(cfg, run_dir, parent_run_id=tr["parent_run_id"])
            tracker.end(tracker.parent, "KILLED")
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - the jobs are cancelled either way
            print(f"rift: could not mark the MLflow run killed: {exc}", file=sys.stderr)
    log(f"rift: cancelled {len(active)} job(s)/task(s): {', '.join(sorted(active))}")
    return active


def wait(run_dir: str | Path, timeout_s: float = 0, poll_s: float = 5.0, log: Callable[[str], None] = print) -> dict:
    """Wait until no job of the run is queued or running; print state changes.

    Returns :func:`job_states`' final dict.

    Raises:
        ClusterError: on ``timeout_s`` (> 0) running out.
    """
    record = read_submission(run_dir)
    start = time.time()
    seen: dict[str, str] = {}
    while True:
        states = job_states(record)
        for jid, s in states.items():
            if seen.get(jid) != s:
                log(f"  {jid}: {s}")
        seen = states
        if not any(s.split()[0] in ACTIVE_STATES for s in states.values()):
            return states
        if timeout_s and time.time() - start > timeout_s:
            raise ClusterError(f"jobs of {run_dir} still active after {timeout_s:.0f}s")
        time.sleep(poll_s)


# ============================================================================== CLI


def add_arguments(subparsers) -> None:
    """Add ``submit``, ``status``, ``cancel`` and ``report`` to the ``rift`` command line."""
    p = subparsers.add_parser("submit", help="run the stage graph as SLURM jobs and arrays (submitit)",
                              description="Submit CONFIG as jobs (see launch/*.yaml for profiles). Given a run "
                                          "directory instead of a config, re-submit what is not done there.")
    p.add_argument("config", help="experiment YAML, or a submitted run directory to re-submit what is not done")
    p.add_argument("--profile", help="launch profile YAML (e.g. launch/example_cluster.yaml); default for a run "
                                     "directory: the one it was submitted with")
    p.add_argument("--run-dir", help="where the run lives (default: the config's run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--profile-set", dest="profile_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field, e.g. stages.mrc.array_size=8 (repeatable)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all that are not done)")
    p.add_argument("--only", action="append", default=[], metavar="JOB[:NAME,...]",
                   help="submit only this job, or these tasks of an array (module name, alpha, candidate or task "
                        "index), e.g. --only mrc:layer2.1.conv2 (repeatable); nothing after it is submitted")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="run the jobs on this machine (submitit local executor)")
    g.add_argument("--debug", action="store_true", help="run the jobs in this process (submitit debug executor)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and sbatch scripts, submit nothing")
    p.add_argument("--wait", action="store_true", help="after submitting to SLURM, wait for the jobs to end")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    s = subparsers.add_parser("status", help="stages (local run) or jobs (submitted run) and their states; "
                                               "sends pending MLflow writes")
    s.add_argument("run_dir", help="the run directory (as given to rift run / rift submit --run-dir)")
    s.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    c = subparsers.add_parser("cancel", help="cancel the queued and running jobs of a submitted run")
    c.add_argument("run_dir", help="the run directory of a submitted run (holds submission.json)")
    c.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    from rift_dist import report

    report.add_arguments(subparsers.add_parser("report", help="Table 1 of the paper from the runs in MLflow"))


def _submit_command(args) -> int:
    from rift_dist.config import load_config

    target = Path(args.config)
    if target.is_dir():
        record = read_submission(target)
        cfg = load_config(target / "config.yaml", list(args.overrides))
        run_dir = target
        if args.profile:
            profile = load_profile(args.profile, args.profile_overrides)
        else:
            stored = dict(record.get("profile", {}))
            name = stored.pop("name", "<stored>")
            for item in args.profile_overrides:
                key, _, value = item.partition("=")
                node = stored
                parts_ = key.split(".")
                for part in parts_[:-1]:
                    node = node.setdefault(part, {})
                node[parts_[-1]] = _parse_value(value)
            profile = profile_from_dict(stored, f"{target / SUBMISSION_FILE} (profile {name})")
            profile.name = name
        executor = "local" if args.local else "debug" if args.debug else record.get("executor", profile.executor)
        config_path = record.get("config")
    else:
        cfg = load_config(args.config, list(args.overrides))
        run_dir = Path(args.run_dir or cfg.run_dir)
        profile = load_profile(args.profile, args.profile_overrides)
        executor = "local" if args.local else "debug" if args.debug else profile.executor
        if executor == "slurm" and not args.profile:
            raise ClusterError("a SLURM submission needs a launch profile: --profile launch/<cluster>.yaml (start "
                               "from launch/example_cluster.yaml); or run the jobs here with --local / --debug")
        config_path = str(Path(args.config).resolve())
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(STAGES)
    submit(cfg, profile, run_dir, executor=executor, stages=stages, only=args.only or None, dry_run=args.dry_run,
           config_path=config_path)
    if args.wait and executor == "slurm" and not args.dry_run:
        wait(run_dir)
        return 1 if status(run_dir)["failed"] else 0
    return 0


def main(args) -> int:
    """Run ``rift submit|status|cancel|report`` from parsed arguments; returns the exit status."""
    try:
        if args.command == "submit":
            return _submit_command(args)
        if args.command == "status":
            result = status(args.run_dir)
            return 1 if result["failed"] else 0
        if args.command == "cancel":
            cancel(args.run_dir)
            return 0
        if args.command == "report":
            from rift_dist import report

            return report.main(args)
    except ClusterError as exc:
        print(f"rift: {exc}", file=sys.stderr)
        return 2
    raise ClusterError(f"unknown cluster command {args.command!r}")
