"""The run's place among its processes: environment -> process group -> collectives -> shard(n).

:class:`Runtime` reads the rank layout from the launcher (torchrun: ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; SLURM's srun: ``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NTASKS``, first host of ``SLURM_JOB_NODELIST``; or a single process with none of them), joins the
process group (NCCL with CUDA, gloo otherwise; ``distributed.backend`` overrides it), offers the few
collectives stage code needs (sum, gather, broadcast, barrier) and the one rule that splits a data set
across ranks (:func:`shard_bounds`).  Wrapping a model for training is :func:`rift_dist.parallel.parallelize`.

Failure model: every collective runs under ``distributed.timeout_s``.  Gloo
honours that timeout for all the collectives used here (all_reduce, barrier,
all_gather_object, broadcast_object_list, and the all_reduces inside DDP's and
DeepSpeed's backward), and NCCL's watchdog aborts a stuck collective after it,
so a rank that died or hangs makes the others raise :class:`DistributedError`
(a peer that exits closes its sockets, which gloo reports at once) instead of
waiting forever; no extra watchdog thread is needed.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rift_dist.errors import RiftError

# Words in the message of an exception raised by a failed collective (gloo, NCCL, the TCP store).
_COMM_FAILURE_MARKERS = (
    "gloo", "nccl", "c10d", "timed out", "connection reset", "connection closed", "closed by peer",
    "broken pipe", "processgroup",
)


class DistributedError(RiftError, RuntimeError):
    """The process group could not be set up, or a collective failed (e.g. a rank died or hangs)."""


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed collective (a dead or stuck peer) rather than a bug in the step."""
    if isinstance(exc, DistributedError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (RuntimeError, OSError, ConnectionError)) and any(m in text for m in _COMM_FAILURE_MARKERS)


@dataclass
class LaunchEnv:
    """Rank layout read from the environment.

    Attributes:
        rank: global rank in [0, world_size); local_rank: rank on this node (picks the GPU).
        world_size: number of processes; master_addr/master_port: where rank 0 listens.
        source: "torchrun", "slurm" or "single".
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[01-04,07],cpu1`` -> ``gpu01``, ``n[3-4]-ib`` -> ``n3-ib``."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]*)(?:\[([^\]]+)\])?([^,\[]*)", nodelist)
    if not m or not (m.group(1) or m.group(2)):
        return nodelist
    prefix, ranges, suffix = m.groups()
    if not ranges:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def read_launch_env(environ: dict | None = None) -> LaunchEnv:
    """Read the rank layout from torchrun or SLURM variables (torchrun wins when both are set).

    SLURM: ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` when
    set, i.e. inside an srun step), master = ``MASTER_ADDR`` or the first host of
    ``SLURM_JOB_NODELIST``, port = ``MASTER_PORT`` or 20000 + (full ``SLURM_JOB_ID``) mod 40000.  Jobs
    started by ``rift submit`` always have MASTER_PORT set: the profile's ``master_port``, or a port
    derived from the job id, checked free on rank 0's node and shared through the run directory
    (``rift_dist.cluster.job.rendezvous_port``); the fallback here is for other sbatch scripts.

    Raises:
        DistributedError: when the variables are inconsistent (e.g. RANK >= WORLD_SIZE) or not integers.
    """
    env = os.environ if environ is None else environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            le = LaunchEnv(
                int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]),
                env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
            )
        elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
            ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
            port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 40000)
            le = LaunchEnv(
                int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), ntasks,
                env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), port, "slurm",
            )
        else:
            return LaunchEnv()
    except ValueError as exc:
        raise DistributedError(f"a rank variable of the launcher is not an integer: {exc}") from exc
    if not 0 <= le.rank < le.world_size:
        raise DistributedError(f"rank {le.rank} is outside world size {le.world_size} (from {le.source} variables)")
    return le


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n items (np.array_split semantics: the first n % world_size
    ranks get one item more).  The one rule for splitting evaluation sets, MRC's modules and examples across ranks."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for single-node rendezvous in tests and one-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]



class Runtime:
    """Rank, world size, device and collectives; a single process unless the environment names a launcher.

    Use as a context manager (or call :meth:`close` in ``finally``) so the process
    group is destroyed.

    Raises (from the constructor):
        DistributedError: inconsistent launcher variables, an unusable backend, or a rendezvous
            that failed or timed out.
    """

    def __init__(self, cfg=None, environ: dict | None = None):
        self.cfg = cfg
        self.env = read_launch_env(environ)
        self.rank = self.env.rank
        self.local_rank = self.env.local_rank
        self.world_size = self.env.world_size
        self.device = self._pick_device()
        self._group = False
        self._env_set: list[str] = []  # launcher variables this runtime invented (removed by close)
        if self.world_size > 1:
            self._init_group()

    # ------------------------------------------------------------------ setup
    def _pick_device(self) -> torch.device:
        want = getattr(self.cfg, "device", "auto") if self.cfg is not None else "auto"
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise DistributedError("device=cuda but CUDA is not available; set device: cpu")
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def timeout_s(self) -> float:
        """Seconds a collective may wait for the other ranks (``distributed.timeout_s``, default 300)."""
        return float(self.cfg.distributed.timeout_s) if self.cfg is not None else 300.0

    @property
    def sync_bn(self) -> bool:
        """Whether BatchNorm layers are synchronised (``distributed.sync_bn`` with more than one rank)."""
        return bool(self.distributed and self.cfg is not None and self.cfg.distributed.sync_bn)

    @property
    def backend(self) -> str:
        """The torch.distributed backend: ``distributed.backend``, or nccl with CUDA and gloo otherwise.

        Raises:
            DistributedError: nccl asked for without CUDA, or an unknown backend.
        """
        want = self.cfg.distributed.backend if self.cfg is not None else "auto"
        if want == "auto":
            return "nccl" if self.device.type == "cuda" else "gloo"
        if want not in ("nccl", "gloo", "mpi", "ucc"):
            raise DistributedError(f"distributed.backend is {want!r}; use auto, gloo or nccl")
        if want == "nccl" and self.device.type != "cuda":
            raise DistributedError("distributed.backend is nccl but the device is the CPU; use gloo (or auto)")
        return want

    def _init_group(self) -> None:
        os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.env.master_port))
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
        if not dist.is_initialized():
            backend = self.backend
            try:
                dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, init_method="env://",
                                        timeout=datetime.timedelta(seconds=self.timeout_s))
            except Exception as exc:
                raise DistributedError(
                    f"rank {self.rank}/{self.world_size} could not join the process group at "
                    f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({backend}, {self.env.source} launch, "
                    f"timeout {self.timeout_s:g}s): {exc}. Check that every rank was started and can reach that address."
                ) from exc
        self._group = True

    def ensure_process_group(self) -> None:
        """Make sure torch.distributed is initialised, with a one-process group when nothing launched us.

        DeepSpeed needs a process group even in one process; without launcher variables it
        would look for MPI.  This sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and a free
        MASTER_PORT (unless set) and starts a group of one, destroyed by :meth:`close`.
        """
        if dist.is_initialized():
            self._group = self._group or self.world_size > 1
            return
        if self.world_size > 1:
            self._init_group()
            return
        wanted = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(free_port())}
        for key, value in wanted.items():
            if key not in os.environ:
                os.environ[key] = value
                self._env_set.append(key)
        self._init_group()

    def close(self) -> None:
        """Destroy the process group this runtime created and forget invented launcher variables (safe to call twice)."""
        try:
            if self._group and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after a failure must not mask it
            pass
        finally:
            self._group = False
            for key in self._env_set:
                os.environ.pop(key, None)
            self._env_set = []

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ info
    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the only process with side effects)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous shard of ``n`` items (:func:`shard_bounds`)."""
        return shard_bounds(n, self.rank, self.world_size)

    # ------------------------------------------------------------------ collectives
    def comm_error(self, what: str, exc: BaseException) -> DistributedError:
        """The :class:`DistributedError` for a failed collective ``what`` (names the likely cause and the fix)."""
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: collective '{what}' failed — another rank probably died or hung "
            f"(distributed.timeout_s = {self.timeout_s:g}s); look at the other ranks' output for the first error. "
            f"Cause: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )

    def _check(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            raise self.comm_error(what, exc) from exc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place; also returned). A no-op with one process.

        Raises:
            DistributedError: when the collective fails or times out.
        """
        if self.distributed:
            t = tensor.to(self.device) if self.backend == "nccl" else tensor
            self._check("all_reduce", dist.all_reduce, t)
            if t is not tensor:
                tensor.copy_(t.to(tensor.device))
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather a picklable object from every rank, in rank order.

        Raises:
            DistributedError: when the collective fails or times out.
        """
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._check("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s object on every rank.

        Raises:
            DistributedError: when the collective fails or times out.
        """
        if not self.distributed:
            return obj
        box = [obj]
        self._check("broadcast_object", dist.broadcast_object_list, box, src)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank.

        Raises:
            DistributedError: when a rank does not arrive within the timeout.
        """
        if self.distributed:
            self._check("barrier", dist.barrier)
