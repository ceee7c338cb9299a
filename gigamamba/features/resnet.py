"""CLAM's truncated ResNet-50 (through layer3, average pooled, 1024-d) in plain torch.nn.

Why it exists: building it through timm costs start-up time on the critical path of every encoder actor
(`import timm` pulls in torchvision, whose ops import torch._dynamo and sympy: ~5.5 s on top of torch on a
16-core GPU node). This module imports torch only.

Its parameter and buffer names are timm's `resnet50` state-dict keys (conv1, bn1, layer1.0.conv1,
layer1.0.downsample.0, ...), so a timm ResNet-50 state dict loads into it with `strict=False`, leaving only
layer4.* and fc.* as unexpected keys.
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = (3, 4, 6)  # ResNet-50's bottleneck counts for layer1..layer3 (layer4, 3 blocks, is dropped)
WIDTHS = (64, 128, 256)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: ResNet "v1.5"), 1x1 expand, plus the shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet50Trunc(nn.Module):
    """ResNet-50 stem + layer1..layer3, global average pooled: (N, 3, H, W) -> (N, 1024)."""

    num_features = WIDTHS[-1] * EXPANSION  # 1024

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for idx, (blocks, width) in enumerate(zip(LAYERS, WIDTHS)):
            stride = 1 if idx == 0 else 2
            layer = [Bottleneck(in_ch, width, stride)]
            in_ch = width * EXPANSION
            layer += [Bottleneck(in_ch, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{idx + 1}", nn.Sequential(*layer))
        # the truncation, spelled as timm-based code did it (model.layer4 = nn.Identity()): no parameters
        self.layer4 = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deterministic under torch.manual_seed: kaiming-normal convs, BN weight 1 / bias 0, except each
        block's last BN weight 0 (zero-init residual, as timm's resnet50 does), so random features stay at
        stem scale rather than growing block by block (fp16 autocast stays far from overflow)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def resnet50_trunc() -> ResNet50Trunc:
    return ResNet50Trunc()
