"""Process groups, rank helpers and model wrapping — the one place that imports torch.distributed.

Model, attack and stage code talk to a :class:`Runtime` (rank, world size,
device, collectives on metrics) and to an :class:`Engine` returned by
:meth:`Runtime.parallelize_with` (forward, ``step(loss)``, consolidated state
dict), so swapping DDP for DeepSpeed touches this file and
``rift_dist.deepspeed_engine`` only.

The environment decides the layout: torchrun (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), SLURM's srun
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, first host of
``SLURM_JOB_NODELIST``), or a single process with none of them.  The backend
is NCCL with CUDA and gloo otherwise (``distributed.backend`` overrides it).

Failure model: every collective runs under ``distributed.timeout_s``.  Gloo
honours that timeout for all the collectives used here (all_reduce, barrier,
all_gather_object, broadcast_object_list, and the all_reduces inside DDP's and
DeepSpeed's backward), and NCCL's watchdog aborts a stuck collective after it,
so a rank that died or hangs makes the others raise :class:`DistributedError`
(a peer that exits closes its sockets, which gloo reports at once) instead of
waiting forever; no extra watchdog thread is needed.

Reproducibility across world sizes: with ``distributed.sync_bn`` the
BatchNorm layers normalise with the statistics of the GLOBAL batch, so a run on
W ranks with per-rank batch b computes what one process computes with batch
W*b, up to the order of floating-point sums.  NCCL/CUDA uses
``torch.nn.SyncBatchNorm``; gloo/CPU (which ``torch.nn.SyncBatchNorm`` rejects)
uses :class:`AllReduceBatchNorm`, in one CPU process too (same arithmetic).  What
remains between rank counts is measured in ``benchmarks/bench_rank_parity.py`` and
stated in the README ("Rank count and reproducibility").
"""

from __future__ import annotations

import datetime
import inspect
import importlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rift_dist.errors import RiftError
from rift_dist.models import unwrap

# Words in the message of an exception raised by a failed collective (gloo, NCCL, the TCP store).
_COMM_FAILURE_MARKERS = (
    "gloo", "nccl", "c10d", "timed out", "connection reset", "connection closed", "closed by peer",
    "broken pipe", "processgroup",
)


class DistributedError(RiftError, RuntimeError):
    """The process group could not be set up, or a collective failed (e.g. a rank died or hangs)."""


# Engines other than DDP live in modules built on this one (they subclass :class:`Engine` and use
# :class:`Runtime`); they are named here and imported when chosen, so this module never imports them.
# Each provides ``build_engine(runtime, model, make_optimizer) -> Engine``.
ENGINE_PLUGINS: dict[str, str] = {"deepspeed": "rift_dist.deepspeed_engine"}


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


# ---------------------------------------------------------------------------------- SyncBatchNorm on gloo


def _all_reduce_in_place(tensor: torch.Tensor) -> None:
    """all_reduce(SUM) of ``tensor`` in place over the default group."""
    dist.all_reduce(tensor)


def _no_reduce(tensor: torch.Tensor) -> None:
    """One process: the local sums are the global ones."""


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Reduction dims (all but the channel dim 1) and the broadcast shape [1, C, 1, ...] of a [B, C, *] tensor."""
    return [0] + list(range(2, x.dim())), [1, x.shape[1]] + [1] * (x.dim() - 2)


class _GlobalBatchNormFn(torch.autograd.Function):
    """Training-mode batch normalisation with statistics over all ranks, in float32, two-pass (centred) sums.

    forward(x [B, C, *], weight [C], bias [C], eps, reduce) -> (out like x, mean [C], unbiased var [C]) (the
    statistics for the running averages; float32);
    ``reduce(t)`` sums ``t`` over ranks in place (a no-op in one process).  The per-channel sum and count are
    reduced first, then the centred sum of squares (never E[x^2] - E[x]^2).  The backward is torch's
    SyncBatchNorm formula: with N the global count, xhat = (x - mean) * invstd and the GLOBAL sums
    a = sum(dy) / N, b = sum(dy * xhat) / N, dx = weight * invstd * (dy - a - xhat * b); the weight and bias
    gradients are this rank's own sums (DDP averages them over ranks), so W ranks with batch b compute
    the gradient of one process with batch W * b.  Source: Ioffe & Szegedy 2015 (the formulas), torch's
    ``SyncBatchNorm`` (the split into local and global sums).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reduce):  # noqa: D102 - autograd protocol
        dims, shape = _channel_dims(x)
        c = x.shape[1]
        ctx.in_dtype = x.dtype
        x = x.float()
        sums = torch.cat([x.sum(dims), x.new_tensor([x.numel() / c])])
        reduce(sums)
        n = float(sums[c].item())
        if n <= 1:
            raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel over all ranks "
                             f"(got {int(n)}); use a larger batch")
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        sq = (centred * centred).sum(dims)
        reduce(sq)
        var = sq / n
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight.float()
        out = torch.addcmul(bias.float().view(shape), centred, scale.view(shape))
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.n, ctx.reduce = n, reduce
        unbiased = var * (n / (n - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return out, mean, unbiased

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # noqa: D102 - autograd protocol
        x, mean, invstd, weight = ctx.saved_tensors
        dims, shape = _channel_dims(x)
        c = x.shape[1]
        g = grad_out.float()
        centred = x - mean.view(shape)
        local = torch.cat([g.sum(dims), (g * centred).sum(dims)])  # sum(dy), sum(dy * (x - mean))
        total = local.clone()
        ctx.reduce(total)
        scale = invstd * weight.float()
        a = total[:c] / ctx.n
        coef = total[c:] / ctx.n * invstd * invstd * scale  # b * invstd * scale, with b over xhat
        dx = torch.addcmul((-a * scale).view(shape), centred, (-coef).view(shape)).addcmul_(g, scale.view(shape))
        return dx.to(ctx.in_dtype), (local[c:] * invstd).to(weight.dtype), local[:c].to(weight.dtype), None, None


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, on any backend.

    What ``torch.nn.SyncBatchNorm`` does on CUDA/NCCL, for gloo and CPU tensors too (torch's
    refuses them).  In training mode the per-channel sum and count, then the centred sum of squares,
    are summed over the ranks of the default process group (none to sum in one process), so every rank
    normalises with the global mean and biased variance and updates its running statistics with the
    global mean and unbiased variance -- identical on every rank; the backward sums the statistics'
    gradients over ranks (:class:`_GlobalBatchNormFn`).  In eval mode it is a plain BatchNorm.

    One process uses the same arithmetic (two-pass float32 sums), which is why ``distributed.sync_bn``
    converts BatchNorm on the CPU in one process too: torch 2.14's CPU BatchNorm kernel for channels_last
    inputs accumulates each channel's statistics with an error that grows with B*H*W (relative error of
    the stem's output 5e-6 at batch 64, 50x its NCHW kernel's; ``benchmarks/bench_rank_parity.py``), and
    it was what made a 1-rank run part from a 2-rank one at the first BatchNorm of the first step.

    Every rank must run every training-mode forward and backward (a forward on one rank only would wait
    for the others).  Input: float [B, C, *] (any number of trailing dims); the statistics are computed in
    float32 and the output has the input's dtype.

    Raises (forward): ValueError for an input with fewer than 2 dims, or 1 value per channel over all ranks.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [B, C, ...] (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102 - nn.Module protocol
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = input.shape[1]
        weight = self.weight if self.affine else torch.ones(c, device=input.device)
        bias = self.bias if self.affine else torch.zeros(c, device=input.device)
        out, mean, unbiased = _GlobalBatchNormFn.apply(input, weight, bias, self.eps,
                                                       _all_reduce_in_place if sync else _no_reduce)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a synchronised one, in place (root returned).

    CUDA: ``torch.nn.SyncBatchNorm``; otherwise :class:`AllReduceBatchNorm`.  The same Parameter
    objects (and their ``requires_grad`` flags) and buffers are kept, so optimizers built
    afterwards, frozen layers and state-dict keys are unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, _BatchNorm) and not isinstance(module, (AllReduceBatchNorm, nn.SyncBatchNorm)):
            new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


# ---------------------------------------------------------------------------------- engines


class Engine:
    """A model ready for training: one forward per backward, ``step(loss)``, consolidated state dict.

    The plain (one process) and DDP engine; ``rift_dist.deepspeed_engine.DeepSpeedEngine``
    has the same interface.  Methods marked *collective* must be called on every rank.

    Attributes:
        module: the unwrapped model (use it for attacks and evaluation).
        optimizer: the optimizer (None for evaluation-only engines); its ``param_groups`` set the lr.
        wrapped: what the forward runs through (the DDP wrapper, or ``module``).
        runtime: the :class:`Runtime` (None for a plain engine built without one).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, wrapped: nn.Module | None = None,
                 runtime: "Runtime | None" = None):
        self.module = unwrap(model)
        self.optimizer = optimizer
        self.wrapped = wrapped if wrapped is not None else model
        self.runtime = runtime

    def _guard(self, what: str, fn: Callable, *args):
        """Run ``fn``; turn a collective failure inside it into a :class:`DistributedError`."""
        try:
            return fn(*args)
        except Exception as exc:
            if self.runtime is not None and self.runtime.distributed and is_comm_failure(exc):
                raise self.runtime.comm_error(what, exc) from exc
            raise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped forward: logits [B, K] for images [B, 3, H, W]."""
        return self._guard("forward", self.wrapped, x)

    def train(self, mode: bool = True) -> "Engine":
        """Set training mode on the model; returns self."""
        self.wrapped.train(mode)
        return self

    def eval(self) -> "Engine":
        """Set eval mode on the model; returns self."""
        return self.train(False)

    def step(self, loss: torch.Tensor) -> None:
        """Backward (gradients averaged over ranks by DDP), optimizer step, zero the gradients.

        Raises:
            DistributedError: when the gradient all-reduce fails (a rank died or hangs).
        """
        self._guard("backward", loss.backward)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict, wrapper-free (same keys as the plain model), float32 master weights, on the CPU.

        *Collective* (DeepSpeed gathers partitioned weights): call it on every rank, save on the main one.
        """
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a wrapper-free state dict (strict) into the model (and any master copy of its weights).

        Raises:
            RuntimeError: missing or unexpected keys, or shape mismatches (torch's message).
        """
        self.module.load_state_dict(state, strict=True)

    def optimizer_state(self) -> dict:
        """The optimizer's resumable state in torch's ``Optimizer.state_dict()`` format (empty without an optimizer).

        The same format whatever the engine and world size (parameters numbered in the order
        they were given to the optimizer), so any engine on any number of ranks can resume it.
        *Collective*: call it on every rank.
        """
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore :meth:`optimizer_state` output (a no-op for an empty dict).

        Raises:
            ValueError: when the state does not fit the optimizer's parameters (torch's message).
        """
        if self.optimizer is not None and state:
            self.optimizer.load_state_dict(state)

    def sync_buffers(self) -> None:
        """Make the floating-point buffers (BatchNorm running statistics) equal on every rank: their mean.

        Needed before evaluating or saving when BatchNorm is not synchronised (each rank's
        running statistics then follow its own batches).  A no-op in one process and with
        ``distributed.sync_bn`` (the statistics are already equal).  *Collective*.
        """
        rt = self.runtime
        if rt is None or not rt.distributed or rt.sync_bn:
            return
        for buf in self.module.buffers():
            if buf.is_floating_point():
                rt.all_reduce_sum(buf)
                buf.div_(rt.world_size)


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

    # ------------------------------------------------------------------ wrapping
    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Engine:
        """Wrap ``model`` for training on this runtime (DDP across ranks; plain in one process).

        The model must already be on ``self.device``.  Prefer :meth:`parallelize_with`, which also
        converts BatchNorm for ``distributed.sync_bn`` and picks the engine.

        Raises:
            DistributedError: when DDP's initial parameter broadcast fails.
        """
        if not self.distributed:
            return Engine(model, optimizer, runtime=self)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (BN running statistics) are not broadcast at each forward: SyncBN keeps them equal,
        # Engine.sync_buffers averages them otherwise.  Newer torch renamed the switch.
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        try:
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
        except Exception as exc:
            if is_comm_failure(exc):
                raise self.comm_error("DDP set-up", exc) from exc
            raise
        return Engine(model, optimizer, wrapped, runtime=self)

    def parallelize_with(self, model: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Engine:
        """Wrap ``model`` for training, building its optimizer with ``make_optimizer(trainable params)``.

        Picks the engine from ``distributed.engine``: ``ddp`` (plain in one process) or
        ``deepspeed`` (:mod:`rift_dist.deepspeed_engine`, also in one process).  With
        ``distributed.sync_bn`` and more than one rank -- or on the CPU in one process too, so that
        the rank count does not change the BatchNorm arithmetic (see :class:`AllReduceBatchNorm`) --
        BatchNorm layers become synchronised first (:func:`convert_sync_batchnorm`).  The model must
        already be on ``self.device``.

        Raises:
            DistributedError: DeepSpeed asked for but not installed, or a failed set-up collective.
        """
        cfg = self.cfg.distributed if self.cfg is not None else None
        if cfg is not None and cfg.engine not in ("ddp", "deepspeed"):
            raise DistributedError(f"distributed.engine is {cfg.engine!r}; use ddp or deepspeed")
        if self.sync_bn or (cfg is not None and cfg.sync_bn and self.device.type == "cpu"):
            # on the CPU also in one process: the same BatchNorm arithmetic whatever the rank count
            model = convert_sync_batchnorm(model, self.device)
        if cfg is not None and cfg.engine in ENGINE_PLUGINS:
            return importlib.import_module(ENGINE_PLUGINS[cfg.engine]).build_engine(self, model, make_optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        return self.parallelize(model, make_optimizer(params))
