"""DeepSpeed as the training engine (``distributed.engine: deepspeed``) — the one place that imports deepspeed.

:func:`build_engine` turns a model and an optimizer factory into a
:class:`DeepSpeedEngine` with the interface of :class:`rift_dist.parallel.engine.Engine`:

* ZeRO stage 0, 1 or 2 (``distributed.zero_stage``); gradient accumulation
  (``distributed.gradient_accumulation_steps``: each ``step(loss)`` is one
  micro-batch, the optimizer steps every GA micro-batches, DeepSpeed scales
  the loss by 1/GA); ``zero_allow_untested_optimizer`` so our torch optimizer
  (SGD) runs under ZeRO.
* The optimizer is ours (built by the stage's factory and handed to
  DeepSpeed) or, with ``distributed.deepspeed_optimizer``, built by DeepSpeed
  from its config with the same type and hyperparameters.  The learning rate
  follows the stage's per-epoch schedule through ``engine.optimizer.param_groups``;
  a DeepSpeed scheduler can be added with ``distributed.deepspeed_config``
  (a JSON file merged over the generated config).
* Precision: on CUDA with ZeRO 1/2, ``precision.autocast`` bf16 / fp16 turns on
  DeepSpeed's bf16 / fp16 mode (low-precision weights, fp32 master weights
  partitioned over ranks, dynamic loss scaling for fp16).  With ZeRO 0 and on
  the CPU the weights stay fp32 and the forward runs under the stage's autocast.
* Layout: the weights are kept in the contiguous (NCHW) format under DeepSpeed, whatever
  ``precision.channels_last`` says (DeepSpeed views parameters as flat byte buffers, which a
  channels_last weight cannot be); with ``channels_last`` auto / on the inputs and activations stay
  channels_last, and the convolutions still run their NHWC kernels (see :func:`contiguous_parameters`).
* One engine forward and one ``engine.backward`` + ``engine.step`` per step.
* :meth:`DeepSpeedEngine.state_dict` is the consolidated float32 state dict
  (master weights gathered from the ZeRO partitions; same keys as the plain
  model, no ``module.`` prefix); :meth:`DeepSpeedEngine.optimizer_state` is the
  optimizer state gathered into torch's ``Optimizer.state_dict()`` format, so
  a checkpoint resumes under DDP or DeepSpeed on any number of ranks.

Facts that shape the set-up: DeepSpeed needs a process group even in one
process (:meth:`Runtime.ensure_process_group` makes one; otherwise it looks
for MPI); on the CPU, DeepSpeed's accelerator is "cpu" and, without oneCCL,
communicates over the gloo group we create; ``deepspeed.init_distributed``
then loads a shared-memory op that it JIT-compiles with g++/ninja on first use
(``scripts/install_deepspeed.sh`` pre-builds it into the torch extensions cache).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from rift_dist.config import deep_merge
from rift_dist.parallel.engine import Engine
from rift_dist.parallel.runtime import DistributedError, Runtime, is_comm_failure

# Optimizer hyperparameters that are implementation switches, not part of the method (not sent to DeepSpeed).
_IMPLEMENTATION_KEYS = {"foreach", "fused", "differentiable", "capturable", "maximize"}


def available() -> tuple[bool, str]:
    """``(True, version)`` when DeepSpeed imports, else ``(False, why)``; never raises."""
    try:
        _set_accelerator(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        with _quiet(True):
            import deepspeed
    except Exception as exc:  # noqa: BLE001 - a broken install must only disable the engine
        return False, f"deepspeed cannot be imported ({type(exc).__name__}: {exc}); run scripts/install_deepspeed.sh"
    return True, deepspeed.__version__


def _set_accelerator(device: torch.device) -> None:
    """Tell DeepSpeed which accelerator to use (before it is first imported), matching our device."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


@contextlib.contextmanager
def _quiet(silence_stdout: bool):
    """DeepSpeed's loggers at WARNING (torch's "No CUDA runtime" note at ERROR), its prints swallowed when asked."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    loggers = [logging.getLogger(n) for n in ("DeepSpeed", "deepspeed")]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    with contextlib.redirect_stdout(io.StringIO()) if silence_stdout else contextlib.nullcontext():
        yield


# DeepSpeed's ZeRO calls a collective that torch has renamed; the warning says nothing to our users.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)


def _optimizer_section(optimizer: torch.optim.Optimizer) -> dict:
    """DeepSpeed's ``optimizer`` config section that rebuilds ``optimizer`` (type name + scalar hyperparameters).

    Raises:
        DistributedError: when the optimizer has several parameter groups with different settings.
    """
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if any(g != groups[0] for g in groups[1:]):
        raise DistributedError("distributed.deepspeed_optimizer needs one set of hyperparameters for all parameters; "
                               "set distributed.deepspeed_optimizer: false to pass our optimizer in")
    params = {k: v for k, v in groups[0].items()
              if k not in _IMPLEMENTATION_KEYS and isinstance(v, (int, float, bool)) and v is not None}
    return {"type": type(optimizer).__name__, "params": params}


def deepspeed_config(runtime: Runtime, optimizer: torch.optim.Optimizer | None) -> dict:
    """The DeepSpeed config for this run: batch sizes, ZeRO stage, precision, accumulation, optimizer section.

    ``optimizer`` (only read, with ``distributed.deepspeed_optimizer``) gives the ``optimizer``
    section; ``distributed.deepspeed_config`` (a JSON file) is merged over the result, key by key.

    Raises:
        DistributedError: a bad accumulation count, fp16 with ZeRO 0, or an unreadable JSON file.
    """
    from rift_dist.precision import resolve_precision

    cfg = runtime.cfg
    dc = cfg.distributed
    ga = int(dc.gradient_accumulation_steps)
    if ga < 1:
        raise DistributedError(f"distributed.gradient_accumulation_steps must be >= 1, got {ga}")
    world = runtime.world_size
    micro = max(1, cfg.data.batch_size // world)
    ds: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "train_batch_size": micro * ga * world,
        "zero_optimization": {"stage": int(dc.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    dtype = resolve_precision(cfg.precision, runtime.device).dtype
    if runtime.device.type == "cuda" and dtype is not None:
        if dc.zero_stage == 0:
            pass  # fp32 weights; the stage's autocast gives the bf16/fp16 forward
        elif dtype == torch.bfloat16:
            ds["bf16"] = {"enabled": True}
        else:
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if dc.deepspeed_optimizer and optimizer is not None:
        ds["optimizer"] = _optimizer_section(optimizer)
    if dc.deepspeed_config:
        path = Path(dc.deepspeed_config)
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DistributedError(f"distributed.deepspeed_config {path}: cannot read it as JSON ({exc})") from exc
        ds = deep_merge(ds, extra)
    return ds


@torch.no_grad()
def contiguous_parameters(model: nn.Module) -> int:
    """Put every parameter and buffer of ``model`` in the contiguous (NCHW) memory format, in place.

    DeepSpeed views parameters as flat byte buffers (``_broadcast_model``, the ZeRO flat partitions), which
    needs ``stride(-1) == 1``; a channels_last [O, I, kH, kW] weight has ``stride(-1) == I``.  So under
    DeepSpeed the weights stay NCHW whatever ``precision.channels_last`` says, while inputs and activations
    stay channels_last: a convolution with a channels_last input and an NCHW weight still picks the NHWC
    kernels (oneDNN on the CPU, cuDNN on CUDA: the output is channels_last and equals the all-NHWC result;
    checked by ``tests/integration/test_engine_matrix.py``).  Values are unchanged (a layout copy), the
    parameter objects stay the same (``.data`` is replaced), so optimizer references and ``requires_grad``
    (frozen modules in fine-tuning) are kept.

    Returns:
        how many tensors were converted (0 when the model was already contiguous).
    """
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # compare strides, not is_contiguous(): a channels_last [O, I, 1, 1] weight counts as contiguous
        # (size-1 dims are ignored) but has stride(-1) == I, which DeepSpeed's byte view refuses
        if t.dim() and t.stride() != _contiguous_strides(t.shape):
            t.data = t.data.clone(memory_format=torch.contiguous_format)
            n += 1
    return n


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def build_engine(runtime: Runtime, model: nn.Module,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> "DeepSpeedEngine":
    """Wrap ``model`` (already on ``runtime.device``, BatchNorm already converted) in a DeepSpeed engine.

    The model's parameters are first made contiguous (NCHW) in place (:func:`contiguous_parameters`):
    DeepSpeed cannot take channels_last weights; inputs stay channels_last under ``precision.channels_last``
    auto / on.

    Args:
        runtime: the run's :class:`rift_dist.parallel.runtime.Runtime` (its config's ``distributed`` section configures DeepSpeed).
        model: the plain model; only parameters with ``requires_grad`` are trained.
        make_optimizer: ``make_optimizer(trainable params) -> torch optimizer``.

    Raises:
        DistributedError: DeepSpeed is not installed (with the install command), or its set-up failed.
    """
    _set_accelerator(runtime.device)
    ok, why = available()
    if not ok:
        raise DistributedError(f"distributed.engine is deepspeed but {why} (or set distributed.engine: ddp)")
    import deepspeed

    runtime.ensure_process_group()
    contiguous_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DistributedError("the model has no trainable parameter to give DeepSpeed")
    optimizer = make_optimizer(params)
    groups = [list(g["params"]) for g in optimizer.param_groups if g["params"]]
    ds_cfg = deepspeed_config(runtime, optimizer)
    own = "optimizer" in ds_cfg
    with _quiet(True):
        try:
            deepspeed.init_distributed(dist_backend=runtime.backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=datetime.timedelta(seconds=runtime.timeout_s))
            ds_engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=None if own else optimizer, model_parameters=params, config=ds_cfg,
                dist_init_required=False,
            )
        except Exception as exc:
            if runtime.distributed and is_comm_failure(exc):
                raise runtime.comm_error("DeepSpeed set-up", exc) from exc
            raise DistributedError(f"DeepSpeed could not be set up with config {ds_cfg}: {type(exc).__name__}: {exc}") from exc
    return DeepSpeedEngine(ds_engine, runtime, groups, ds_cfg)


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine behind the :class:`rift_dist.parallel.engine.Engine` interface.

    Attributes:
        ds: the ``deepspeed.DeepSpeedEngine``; module: the plain model inside it;
        optimizer: DeepSpeed's optimizer (a ZeRO / bf16 wrapper or the torch optimizer itself;
        ``param_groups`` sets the lr either way); config: the DeepSpeed config used.
    """

    def __init__(self, ds_engine, runtime: Runtime, groups: list[list[nn.Parameter]], config: dict):
        super().__init__(ds_engine.module, ds_engine.optimizer, ds_engine, runtime)
        self.ds = ds_engine
        self.config = config
        self._groups = groups
        names = {id(p): n for n, p in self.module.named_parameters()}
        self._names = [[names[id(p)] for p in g] for g in groups]
        self._partitioned = any(hasattr(p, "_hp_mapping") for g in groups for p in g)
        if self._partitioned:
            inner_groups = self._lp_groups()
            if [[id(p) for p in g] for g in inner_groups] != [[id(p) for p in g] for g in groups]:
                raise DistributedError("DeepSpeed reordered the optimizer's parameters; the consolidated optimizer "
                                       "state would not match torch's numbering (report this with the DeepSpeed version)")

    # ------------------------------------------------------------------ DeepSpeed internals, in one place
    def _lp_groups(self) -> list[list[nn.Parameter]]:
        """The trainable (low-precision) parameters of each group, as the ZeRO / bf16 optimizer holds them."""
        opt = self.ds.optimizer
        for attr in ("bit16_groups", "bf16_groups"):
            if hasattr(opt, attr):
                return [list(g) for g in getattr(opt, attr)]
        raise DistributedError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}")

    def _flat_partition(self, group: int) -> torch.Tensor:
        """This rank's fp32 master partition of parameter group ``group`` (the inner optimizer's only parameter)."""
        return self.ds.optimizer.optimizer.param_groups[group]["params"][0]

    def _inner_state(self, group: int) -> dict:
        return self.ds.optimizer.optimizer.state[self._flat_partition(group)]

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.runtime.distributed:
            self._guard("consolidate", dist.all_reduce, t)

    @torch.no_grad()
    def _gather_group(self, group: int, source: torch.Tensor) -> list[torch.Tensor]:
        """Full float32 tensors of group ``group``'s parameters from a partitioned flat ``source`` [partition]."""
        params = self._groups[group]
        sizes = [p.numel() for p in params]
        buf = torch.zeros(sum(sizes), dtype=torch.float32, device=source.device)
        offset = 0
        for p, n in zip(params, sizes):
            hp = p._hp_mapping
            if hp is not None:
                lp_a, hp_a = hp.lp_fragment_address, hp.hp_fragment_address
                buf.narrow(0, offset + lp_a.start, lp_a.numel).copy_(source.narrow(0, hp_a.start, hp_a.numel))
            offset += n
        self._all_reduce(buf)  # each element is owned by exactly one rank: the sum is exact
        return [t.view_as(p) for t, p in zip(buf.split(sizes), params)]

    @torch.no_grad()
    def _scatter_group(self, group: int, full: list[torch.Tensor], target: torch.Tensor) -> None:
        """Copy this rank's fragments of the full tensors ``full`` (one per parameter) into the flat ``target``."""
        for p, value in zip(self._groups[group], full):
            hp = p._hp_mapping
            if hp is None:
                continue
            lp_a, hp_a = hp.lp_fragment_address, hp.hp_fragment_address
            src = value.detach().reshape(-1).narrow(0, lp_a.start, lp_a.numel)
            target.narrow(0, hp_a.start, hp_a.numel).copy_(src.to(target.device, target.dtype))

    # ------------------------------------------------------------------ training
    def step(self, loss: torch.Tensor) -> None:
        """``engine.backward(loss)`` (gradient reduction, 1/GA loss scaling) and ``engine.step()``.

        The optimizer steps at gradient-accumulation boundaries only.

        Raises:
            DistributedError: when a gradient collective fails (a rank died or hangs).
        """
        self._guard("backward", self.ds.backward, loss)
        self._guard("step", self.ds.step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated float32 state dict, same keys as the plain model, on the CPU. *Collective*."""
        sd = {k: v.detach() for k, v in self.module.state_dict().items()}
        if self._partitioned:
            for g in range(len(self._groups)):
                full = self._gather_group(g, self._flat_partition(g))
                for name, value in zip(self._names[g], full):
                    sd[name] = value
        return {k: (v.float() if v.is_floating_point() else v).cpu().clone() for k, v in sd.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a wrapper-free float32 state dict (strict) into the model and DeepSpeed's fp32 master partitions.

        Raises:
            RuntimeError: missing or unexpected keys, or shape mismatches (torch's message).
        """
        self.module.load_state_dict(state, strict=True)
        if self._partitioned:
            for g in range(len(self._groups)):
                self._scatter_group(g, [state[n] for n in self._names[g]], self._flat_partition(g))

    def optimizer_state(self) -> dict:
        """The optimizer state gathered into torch's ``Optimizer.state_dict()`` format. *Collective*.

        Parameters are numbered in the order the optimizer factory received them; partitioned
        state (e.g. SGD's ``momentum_buffer``) is gathered to full per-parameter tensors on the CPU.
        """
        if not self._partitioned:
            return super().optimizer_state()
        inner = self.ds.optimizer.optimizer
        state: dict[int, dict] = {}
        groups_out = []
        index = 0
        for g, params in enumerate(self._groups):
            flat = self._flat_partition(g)
            own = inner.state.get(flat, {})
            keys = sorted(own)
            # every rank must take part in the same gathers: agree on the keys
            if self.runtime.distributed:
                all_keys = self.runtime.all_gather_object(keys)
                if any(k != keys for k in all_keys):
                    raise DistributedError(f"ranks disagree on the optimizer state keys: {all_keys}")
            ids = list(range(index, index + len(params)))
            for k in keys:
                v = own[k]
                if torch.is_tensor(v) and v.shape == flat.shape:
                    for i, t in zip(ids, self._gather_group(g, v)):
                        state.setdefault(i, {})[k] = t.cpu().clone()
                else:
                    for i in ids:
                        state.setdefault(i, {})[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
            hyper = {k: v for k, v in inner.param_groups[g].items() if k != "params"}
            groups_out.append({**hyper, "params": ids})
            index += len(params)
        return {"state": state, "param_groups": groups_out}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore torch-format optimizer state (from any engine and world size) into DeepSpeed's partitions.

        Raises:
            ValueError: when the number of groups, of parameters per group, or a tensor shape does not match.
        """
        if not state:
            return
        if not self._partitioned:
            return super().load_optimizer_state(state)
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self._groups) or any(
                len(s["params"]) != len(p) for s, p in zip(saved_groups, self._groups)):
            raise ValueError(
                "the optimizer state does not fit this optimizer: saved groups of "
                f"{[len(s['params']) for s in saved_groups]} parameters, this one has {[len(g) for g in self._groups]}"
            )
        inner = self.ds.optimizer.optimizer
        saved_state = {int(k): v for k, v in state["state"].items()}
        for g, (saved, params) in enumerate(zip(saved_groups, self._groups)):
            flat = self._flat_partition(g)
            per_param = [saved_state.get(int(i), {}) for i in saved["params"]]
            keys = sorted({k for s in per_param for k in s})
            target_state = inner.state[flat]
            for k in keys:
                values = [s.get(k) for s in per_param]
                if all(torch.is_tensor(v) and v.shape == p.shape for v, p in zip(values, params)):
                    if k not in target_state or not torch.is_tensor(target_state[k]) or target_state[k].shape != flat.shape:
                        target_state[k] = torch.zeros_like(flat)
                    self._scatter_group(g, values, target_state[k])
                elif any(v is None for v in values):
                    raise ValueError(f"optimizer state {k!r} is missing for some parameters of group {g}")
                else:  # replicated (e.g. a step counter): the same for every parameter
                    v = values[0]
                    target_state[k] = v.clone().to(flat.device) if torch.is_tensor(v) else v
            for k, v in saved.items():
                if k != "params":
                    inner.param_groups[g][k] = v
