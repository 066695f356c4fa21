"""The number of a training checkpoint: one place that encodes and decodes it (issue 12).

Adversarial training and fine-tuning number their resumable checkpoints ``epoch * STEPS_PER_EPOCH + step``
(``step`` = the next step of that epoch; 0 = the epoch's start), so that the newest checkpoint sorts last and
its number says where a resumed run continues.  The files are ``<stage>/checkpoints/ckpt-<number:09d>.pt``
(:class:`rift_dist.checkpoint.CheckpointManager`).  Imports nothing of the package.
"""

from __future__ import annotations

import re

STEPS_PER_EPOCH = 1_000_000
"""Room for steps per epoch in a checkpoint number (an epoch has far fewer steps)."""


def checkpoint_id(epoch: int, step: int = 0) -> int:
    """The number of the checkpoint taken before step ``step`` of epoch ``epoch`` (both 0-based).

    Raises:
        ValueError: a negative epoch or step, or a step that does not fit (>= STEPS_PER_EPOCH).
    """
    if epoch < 0 or not 0 <= step < STEPS_PER_EPOCH:
        raise ValueError(f"checkpoint position epoch={epoch}, step={step} out of range (0 <= step < {STEPS_PER_EPOCH})")
    return int(epoch) * STEPS_PER_EPOCH + int(step)


def checkpoint_position(number: int) -> tuple[int, int]:
    """(epoch, step) of checkpoint number ``number`` (the inverse of :func:`checkpoint_id`)."""
    return int(number) // STEPS_PER_EPOCH, int(number) % STEPS_PER_EPOCH


def checkpoint_name(number: int) -> str:
    """The file name of checkpoint ``number``: ``ckpt-<number:09d>.pt``."""
    return f"ckpt-{int(number):09d}.pt"


_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_number(name: str) -> int | None:
    """The number of checkpoint file ``name`` (the inverse of :func:`checkpoint_name`), or None for another file."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def newest_checkpoint_position(folder) -> tuple[int, int] | None:
    """(epoch, next step) of the newest checkpoint file in ``folder`` (a ``pathlib.Path``), or None when it
    holds none (or does not exist)."""
    numbers = [n for p in folder.iterdir() if (n := checkpoint_number(p.name)) is not None] if folder.is_dir() else []
    return checkpoint_position(max(numbers)) if numbers else None
