"""Input normalisation as the model's first layer (RIFT.md, Models).

Inputs are pixels in [0, 1]; the model subtracts the per-channel mean and
divides by the std itself, so every epsilon stays in pixel units. The statistics of
each data set are ``mean`` / ``std`` of its entry in :data:`rift_dist.data.datasets.DATASETS`.
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``.

    Args:
        mean, std: 3 floats each; ``None`` makes the layer the identity.

    Shapes: input float [B, 3, H, W] in [0, 1]; output the same shape and dtype.
    The statistics are non-persistent buffers, so state dicts have the same keys
    as the bare architecture and follow the model's device.
    """

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.enabled = mean is not None
        if self.enabled:
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"Normalize needs 3 means and 3 stds, got {mean} / {std}")
            if min(std) <= 0:
                raise ValueError(f"Normalize std must be positive, got {std}")
        m = torch.tensor(mean if self.enabled else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        s = torch.tensor(std if self.enabled else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
