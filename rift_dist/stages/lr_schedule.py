"""The learning-rate schedule adversarial training and fine-tuning share (RiFT §5.1: multi-step decay)."""

from __future__ import annotations

import torch


def multistep_lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based) under a multi-step schedule (decay after each milestone epoch)."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
