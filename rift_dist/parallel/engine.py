"""The engine protocol: what stage code trains through (forward, ``step``, ``save``, ``resume``, ``gather_state``).

:class:`Engine` is the plain (one process) engine and the base of the others (DDP in
:mod:`rift_dist.parallel.ddp`, DeepSpeed in :mod:`rift_dist.parallel.deepspeed`); stage code never calls a
collective to save or resume: "gather on every rank, write on the main one, barrier" is :meth:`Engine.save`
and :meth:`Engine.save_weights`.  State dicts are consolidated and wrapper-free (the plain model's keys), so
a checkpoint written by one engine on W ranks resumes under any engine on any number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rift_dist import checkpoint
from rift_dist.models import unwrap
from rift_dist.parallel.runtime import Runtime, is_comm_failure

class Engine:
    """A model ready for training: one forward per backward, ``step(loss)``, consolidated state dict.

    The plain (one process) and DDP engine; :class:`rift_dist.parallel.deepspeed.DeepSpeedEngine`
    has the same interface.  Methods marked *collective* must be called on every rank.

    Attributes:
        module: the unwrapped model (use it for attacks and evaluation).
        optimizer: the optimizer (None for evaluation-only engines); its ``param_groups`` set the lr.
        wrapped: what the forward runs through (the DDP wrapper, or ``module``).
        runtime: the :class:`rift_dist.parallel.runtime.Runtime` (None for a plain engine built without one).
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

    # ------------------------------------------------------------------ the collective dance, in one place
    def gather_state(self) -> dict:
        """{"model": consolidated state dict, "optimizer": optimizer state}, the resumable state of this engine.

        *Collective* (DeepSpeed gathers partitioned weights and optimizer state): call it on every rank.
        """
        return {"model": self.state_dict(), "optimizer": self.optimizer_state()}

    def resume(self, state: dict) -> None:
        """Load a checkpoint written by :meth:`save` (any engine, any number of ranks): weights, then optimizer.

        Raises:
            RuntimeError / ValueError: the state does not fit the model or the optimizer (torch's message).
        """
        self.load_state_dict(state["model"])  # also DeepSpeed's fp32 master partitions
        self.load_optimizer_state(state["optimizer"])

    def save(self, manager: "checkpoint.CheckpointManager", checkpoint_id: int, **fields) -> None:
        """Checkpoint the resumable state: gather on every rank, write on the main one, barrier.

        Writes ``{"model", "optimizer", **fields}`` through ``manager.save(state, checkpoint_id)`` on the main
        process.  *Collective*: call it on every rank.

        Raises:
            CheckpointError: the disk is full (from :func:`rift_dist.checkpoint.save_atomic`).
            DistributedError: a rank died or hangs.
        """
        state = self.gather_state()
        if self.runtime is None or self.runtime.is_main:
            manager.save({**state, **fields}, checkpoint_id)
        if self.runtime is not None:
            self.runtime.barrier()

    def save_weights(self, path: str | Path) -> None:
        """Write the consolidated model state dict to ``path`` (atomically) on the main process.

        *Collective* (the gather under DeepSpeed): call it on every rank; no barrier (the file is read by
        the main process only, or after the stage's final barrier).
        """
        weights = self.state_dict()
        if self.runtime is None or self.runtime.is_main:
            checkpoint.save_atomic(weights, path)

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
