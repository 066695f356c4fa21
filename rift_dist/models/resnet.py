"""ResNet-18/34, CIFAR variant (He et al. 2016; RIFT.md, Models).

3x3 stride-1 stem, no max-pool, four stages of BasicBlocks with widths
(w, 2w, 4w, 8w) (w = 64 in the paper), global average pooling and a linear
head; a 1x1 convolution + BN shortcut where the shape changes.  Parameter names
follow the widely used public CIFAR ResNet (``layer2.1.conv2``,
``layer2.0.shortcut.0``, ``linear``), so module names are the ones RiFT reports.
Works for 32x32 (CIFAR) and 64x64 (Tiny-ImageNet) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rift_dist.models.normalize import Normalize


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Shapes: [B, in_planes, H, W] -> [B, planes, H / stride, W / stride].
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet.

    Args:
        num_blocks: blocks per stage ((2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-34).
        num_classes: size of the output.
        width: channels of the first stage (64 in the paper).
        mean, std: input normalisation (first layer); None = identity.

    Shapes: input float32/bf16 [B, 3, H, W], pixels in [0, 1]; output logits [B, num_classes].
    """

    def __init__(self, num_blocks, num_classes: int = 10, width: int = 64, mean=None, std=None):
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        self.normalize = Normalize(mean, std)
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and apply conv1-bn1-relu: [B, 3, H, W] -> [B, w, H, W]."""
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and the linear layer: [B, 8w, h, w] -> [B, classes]."""
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def units(self) -> list[tuple[str, list[str], callable]]:
        """The network as a chain of units: (unit name, parameter-name prefixes it owns, function).

        ``forward(x)`` equals applying every unit's function in order.  Perturbing a
        module inside unit k leaves the input of unit k unchanged (used by the MRC
        activation cache).
        """
        out = [("stem", ["conv1.", "bn1."], self.stem)]
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(self, lname)):
                out.append((f"{lname}.{i}", [f"{lname}.{i}."], block))
        out.append(("head", ["linear."], self.head))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.head(out)


def resnet18(num_classes: int = 10, width: int = 64, mean=None, std=None) -> ResNet:
    """CIFAR ResNet-18 (21 Conv2d/Linear modules)."""
    return ResNet((2, 2, 2, 2), num_classes, width, mean, std)


def resnet34(num_classes: int = 10, width: int = 64, mean=None, std=None) -> ResNet:
    """CIFAR ResNet-34 (37 Conv2d/Linear modules)."""
    return ResNet((3, 4, 6, 3), num_classes, width, mean, std)
