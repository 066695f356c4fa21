"""Everything distributed, and the only package that imports ``torch.distributed`` or ``deepspeed``.

- :mod:`rift_dist.parallel.runtime` — environment -> process group -> collectives -> ``shard(n)``.
- :mod:`rift_dist.parallel.engine` — the engine protocol stage code trains through (forward, ``step``,
  ``save``, ``resume``, ``gather_state``; consolidated state dicts), the plain one-process engine.
- :mod:`rift_dist.parallel.ddp`, :mod:`rift_dist.parallel.deepspeed` — the two engines.
- :mod:`rift_dist.parallel.batchnorm` — BatchNorm with global-batch statistics on any backend.
- :func:`parallelize` — the one call that wraps a model for training.

Model, attack and stage code talk to a ``Runtime`` and an ``Engine``; swapping DDP for DeepSpeed is one
config key (``distributed.engine``).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from rift_dist.parallel import ddp
from rift_dist.parallel.batchnorm import convert_sync_batchnorm
from rift_dist.parallel.engine import Engine
from rift_dist.parallel.runtime import DistributedError, Runtime

# Engines other than DDP live in modules built on runtime/engine (they subclass :class:`Engine`); they are named
# here and imported when chosen, so DeepSpeed stays optional.  Each provides
# ``build_engine(runtime, model, make_optimizer) -> Engine``.
ENGINE_PLUGINS: dict[str, str] = {"deepspeed": "rift_dist.parallel.deepspeed"}


def parallelize(runtime: Runtime, model: nn.Module,
                make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Engine:
    """Wrap ``model`` for training, building its optimizer with ``make_optimizer(trainable params)``.

    Picks the engine from ``distributed.engine``: ``ddp`` (:mod:`rift_dist.parallel.ddp`; plain in one
    process) or ``deepspeed`` (:mod:`rift_dist.parallel.deepspeed`, also in one process).  With
    ``distributed.sync_bn`` and more than one rank -- or on the CPU in one process too, so that the rank
    count does not change the BatchNorm arithmetic (see :class:`rift_dist.parallel.batchnorm.AllReduceBatchNorm`)
    -- BatchNorm layers become synchronised first (:func:`convert_sync_batchnorm`).  The model must already
    be on ``runtime.device``.

    Raises:
        DistributedError: an unknown engine, DeepSpeed asked for but not installed, or a failed set-up collective.
    """
    cfg = runtime.cfg.distributed if runtime.cfg is not None else None
    if cfg is not None and cfg.engine not in ("ddp", "deepspeed"):
        raise DistributedError(f"distributed.engine is {cfg.engine!r}; use ddp or deepspeed")
    if runtime.sync_bn or (cfg is not None and cfg.sync_bn and runtime.device.type == "cpu"):
        # on the CPU also in one process: the same BatchNorm arithmetic whatever the rank count
        model = convert_sync_batchnorm(model, runtime.device)
    if cfg is not None and cfg.engine in ENGINE_PLUGINS:
        return importlib.import_module(ENGINE_PLUGINS[cfg.engine]).build_engine(runtime, model, make_optimizer)
    return ddp.build_engine(runtime, model, make_optimizer)
