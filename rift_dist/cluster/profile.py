"""Launch profiles: what each job of ``rift submit`` asks the cluster for (``launch/<cluster>.yaml``).

:class:`Resources` (one job's nodes, GPUs, CPUs, memory, time, environment and extra sbatch options),
:class:`Profile` (the executor, default resources, per-stage overrides and the stage options the stage
table declares, e.g. ``stages.mrc.array_size``), :func:`load_profile` / :func:`profile_from_dict`
with every check that can be made before a job is planned (unknown keys, wrong types, options the
planner owns, environment variables rift sets itself, GPU and rank shapes).  :class:`ClusterError`,
the error of the whole package, lives here (every other module of ``rift_dist.cluster`` imports it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rift_dist.errors import RiftError
from rift_dist.stages import STAGE_TABLE

EXECUTORS = ("slurm", "local", "debug")


class ClusterError(RiftError, RuntimeError):
    """A submission cannot be made or read: bad profile, missing inputs, jobs still active, no SLURM."""


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
    ``cuda:LOCAL_RANK`` (``rift_dist.parallel.runtime.Runtime``: LOCAL_RANK mod the GPUs it sees)."""
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


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (at most 300 characters): the gist of an error message."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""
