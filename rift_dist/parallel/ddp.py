"""DistributedDataParallel as the training engine (``distributed.engine: ddp``, the default).

Across ranks the model runs through ``torch.nn.parallel.DistributedDataParallel`` (gradients averaged over
ranks in the backward); in one process it is the plain :class:`rift_dist.parallel.engine.Engine`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from rift_dist.parallel.engine import Engine
from rift_dist.parallel.runtime import Runtime, is_comm_failure


def build_engine(runtime: Runtime, model: nn.Module,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Engine:
    """Wrap ``model`` for training on ``runtime`` (DDP across ranks; plain in one process).

    The optimizer is ``make_optimizer(trainable parameters)``.  The model must already be on
    ``runtime.device`` (and its BatchNorm converted, which :func:`rift_dist.parallel.parallelize` does).

    Raises:
        DistributedError: when DDP's initial parameter broadcast fails.
    """
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    if not runtime.distributed:
        return Engine(model, optimizer, runtime=runtime)
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Buffers (BN running statistics) are not broadcast at each forward: SyncBN keeps them equal,
    # Engine.sync_buffers averages them otherwise.  Newer torch renamed the switch.
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    try:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
    except Exception as exc:
        if is_comm_failure(exc):
            raise runtime.comm_error("DDP set-up", exc) from exc
        raise
    return Engine(model, optimizer, wrapped, runtime=runtime)
