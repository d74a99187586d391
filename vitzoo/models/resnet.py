"""Width-scaled CIFAR ResNets (ResNet-18, ResNet-50): the classic zoos' ResNet-18 and the phase-transition zoos.

One family, one definition: stage widths ``w, 2w, 4w, 8w`` (bottleneck expansion 4 for ResNet-50), the CIFAR
stem (3x3 stride-1 convolution, no max-pool), global average pooling and a linear classifier. ``w = 64`` is the
standard network: the classic zoos' ResNet-18 is ``resnet(18, width=64)`` (11,173,962 parameters at 10 classes),
the phase zoos sweep ``w`` from 2 (11,420) to 256 (docs/phase-zoos.md#models).

Key names follow torchvision/timm (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``),
so torchvision's ``resnet18()`` / ``resnet50()`` state dicts of the same width differ only in the stem and the
classifier. The pool is adaptive, so the same weights take 32 px (CIFAR, SVHN) and 64 px (TinyImageNet) inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Blocks per stage of each depth.
LAYERS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}

#: The standard ResNet's first stage width (and the default of ``model.width``).
STANDARD_WIDTH = 64


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act()
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand by 4 (ResNet-50+)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = act()
        self.downsample = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act3(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A CIFAR ResNet of stage widths ``w, 2w, 4w, 8w`` (times the block's expansion)."""

    def __init__(self, depth: int = 18, width: int = STANDARD_WIDTH, in_chans: int = 3, num_classes: int = 10,
                 act: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0) -> None:
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"ResNet depth must be one of {', '.join(map(str, LAYERS))}; got {depth}")
        if width < 1:
            raise ValueError(f"model.width must be a positive integer; got {width}")
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if depth < 50 else Bottleneck
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act()
        cin = width
        for i, n in enumerate(LAYERS[depth], start=1):
            planes, stride = width * 2 ** (i - 1), 1 if i == 1 else 2
            blocks = []
            for b in range(n):
                blocks.append(block(cin, planes, stride if b == 0 else 1, act))
                cin = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.num_features = cin
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


def num_params(depth: int, width: int, in_chans: int = 3, num_classes: int = 10) -> int:
    """Parameters of ``ResNet(depth, width)`` without allocating it (a meta-device build): the storage
    estimate of `vitzoo plan` for the w = 256 networks (~180M / ~375M parameters)."""
    with torch.device("meta"):
        return sum(p.numel() for p in ResNet(depth, width, in_chans, num_classes).parameters())
