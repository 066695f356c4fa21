"""Process groups, rank helpers and model wrapping — the one place that imports torch.distributed.

Model, attack and stage code talk to a :class:`Runtime` (rank, world size,
device, collectives on metrics) and to an :class:`Engine` returned by
:meth:`Runtime.parallelize` (forward, ``step(loss)``, consolidated state dict),
so swapping DDP for DeepSpeed touches this file only.

The environment decides the layout: torchrun (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), SLURM's srun
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, first host of
``SLURM_JOB_NODELIST``), or a single process with none of them.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rift_dist.models import unwrap


class DistributedError(RuntimeError):
    """The process group could not be set up, or a collective failed (e.g. a rank died)."""


@dataclass
class LaunchEnv:
    """Rank layout read from the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[01-04,07],cpu1`` -> ``gpu01``."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict | None = None) -> LaunchEnv:
    """Read the rank layout from torchrun or SLURM variables (torchrun wins when both are set).

    Raises:
        DistributedError: when the variables are inconsistent (e.g. RANK >= WORLD_SIZE).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        le = LaunchEnv(
            int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
        )
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        le = LaunchEnv(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]),
            env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), port, "slurm",
        )
    else:
        return LaunchEnv()
    if not 0 <= le.rank < le.world_size:
        raise DistributedError(f"rank {le.rank} is outside world size {le.world_size} (from {le.source} variables)")
    return le


class Engine:
    """A model ready for training: one forward per backward, ``step(loss)``, consolidated state dict.

    Attributes:
        module: the unwrapped model (use it for attacks and evaluation).
        optimizer: the optimizer (None for evaluation-only engines).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, wrapped: nn.Module | None = None):
        self.module = unwrap(model)
        self.optimizer = optimizer
        self.wrapped = wrapped if wrapped is not None else model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x)

    def train(self, mode: bool = True) -> "Engine":
        self.wrapped.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step, zero the gradients."""
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict, wrapper-free (same keys as the plain model), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def optimizer_state(self) -> dict:
        """The optimizer's resumable state (empty without an optimizer)."""
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore :meth:`optimizer_state` output."""
        if self.optimizer is not None and state:
            self.optimizer.load_state_dict(state)


class Runtime:
    """Rank, world size, device and collectives; a single process unless ``init`` finds a launcher.

    Use as a context manager (or call :meth:`close` in ``finally``) so the process
    group is destroyed.
    """

    def __init__(self, cfg=None, environ: dict | None = None):
        self.cfg = cfg
        self.env = read_launch_env(environ)
        self.rank = self.env.rank
        self.local_rank = self.env.local_rank
        self.world_size = self.env.world_size
        self.device = self._pick_device()
        self._group = False
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
    def backend(self) -> str:
        want = self.cfg.distributed.backend if self.cfg is not None else "auto"
        if want == "auto":
            return "nccl" if self.device.type == "cuda" else "gloo"
        return want

    def _init_group(self) -> None:
        timeout = datetime.timedelta(seconds=self.cfg.distributed.timeout_s if self.cfg is not None else 300)
        os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.env.master_port))
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    self.backend, rank=self.rank, world_size=self.world_size, timeout=timeout,
                    init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                )
            except Exception as exc:
                raise DistributedError(
                    f"could not join the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                    f"as rank {self.rank}/{self.world_size} ({self.backend}): {exc}"
                ) from exc
        self._group = True

    def close(self) -> None:
        """Destroy the process group (safe to call twice)."""
        if self._group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            finally:
                self._group = False

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
        return self.world_size > 1

    # ------------------------------------------------------------------ collectives
    def _check(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank}: collective '{what}' failed — another rank probably died or hung "
                f"(timeout {self.cfg.distributed.timeout_s if self.cfg else 300}s): {exc}"
            ) from exc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place; also returned). A no-op with one process."""
        if self.distributed:
            t = tensor.to(self.device) if self.backend == "nccl" else tensor
            self._check("all_reduce", dist.all_reduce, t)
            if t is not tensor:
                tensor.copy_(t.to(tensor.device))
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather a picklable object from every rank, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._check("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._check("broadcast_object", dist.broadcast_object_list, box, src)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            self._check("barrier", dist.barrier)

    # ------------------------------------------------------------------ wrapping
    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Engine:
        """Wrap ``model`` for training on this runtime (DDP across ranks; plain in one process).

        The model must already be on ``self.device``.  With ``distributed.sync_bn`` the
        BatchNorm layers become SyncBatchNorm (the optimizer must be built after, so pass
        a factory via :meth:`parallelize_with`).
        """
        if not self.distributed:
            return Engine(model, optimizer)
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return Engine(model, optimizer, wrapped)

    def parallelize_with(self, model: nn.Module, make_optimizer) -> Engine:
        """Like :meth:`parallelize`, building the optimizer with ``make_optimizer(params)`` after any
        SyncBatchNorm conversion; picks DDP or DeepSpeed from ``distributed.engine``."""
        cfg = self.cfg.distributed if self.cfg is not None else None
        if cfg is not None and cfg.engine == "deepspeed":
            from rift_dist import deepspeed_engine

            return deepspeed_engine.build_engine(self, model, make_optimizer)
        if self.distributed and cfg is not None and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        params = [p for p in model.parameters() if p.requires_grad]
        return self.parallelize(model, make_optimizer(params))


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers (e.g. seed, epoch, step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
