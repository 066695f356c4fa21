"""WRN-34-10, the pre-activation wide ResNet of TRADES / Bag-of-Tricks-for-AT (RIFT.md, Models).

Depth 34 (5 blocks per group), widen factor 10: widths 16, 160, 320, 640.
Parameter names follow that public code (``block1.layer.3.conv2``,
``convShortcut``, ``fc``) so module names match the ones RiFT reports; the
unused ``sub_block1`` of the TRADES code is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rift_dist.models.normalize import Normalize


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 shortcut when shapes differ.

    Shapes: [B, in_planes, H, W] -> [B, out_planes, H / stride, W / stride].
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``n`` WideBasic blocks, held in ``.layer`` (for the public parameter names)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet for 32x32 / 64x64 inputs.

    Args:
        depth: 6n + 4 (34 -> n = 5).
        widen_factor: k; group widths 16k, 32k, 64k.
        num_classes: output size.
        mean, std: input normalisation; None = identity.

    Shapes: input [B, 3, H, W], pixels in [0, 1]; output logits [B, num_classes].

    Raises:
        ValueError: when depth is not 6n + 4.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, mean=None, std=None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and apply conv1: [B, 3, H, W] -> [B, 16, H, W]."""
        return self.conv1(self.normalize(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU, global average pool and fc: [B, 64k, h, w] -> [B, classes]."""
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def units(self) -> list[tuple[str, list[str], callable]]:
        """The network as a chain of (unit name, parameter-name prefixes, function); see ResNet.units."""
        out = [("stem", ["conv1."], self.stem)]
        for g in ("block1", "block2", "block3"):
            for i, block in enumerate(getattr(self, g).layer):
                out.append((f"{g}.layer.{i}", [f"{g}.layer.{i}."], block))
        out.append(("head", ["bn1.", "fc."], self.head))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = self.block3(self.block2(self.block1(out)))
        return self.head(out)


def wrn34_10(num_classes: int = 10, widen_factor: int = 10, mean=None, std=None) -> WideResNet:
    """WRN-34-10 (35 Conv2d/Linear modules); ``widen_factor`` < 10 gives a narrow copy for tests."""
    return WideResNet(34, widen_factor, num_classes, mean, std)
