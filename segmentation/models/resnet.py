"""A CNN baseline: DeepLabV3+ (Chen et al. 2018) on a small ResNet (BasicBlocks, ResNet-18/34 sizes).

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so its
ImageNet files have the same keys (minus ``fc.*``). The last stage is dilated instead of strided
(output stride 16); the head is ASPP (1x1, three dilated 3x3, image pooling) + a decoder that
fuses the stride-4 features, as in the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import ConvBNReLU

RESNET_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet_tiny": (1, 1, 1, 1)}
RESNET_WIDTHS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512), "resnet_tiny": (16, 24, 32, 48)}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class ResNet(nn.Module):
    """``forward(x)`` -> 4 feature maps at strides 4, 8, 16, 16 (last stage dilated by 2)."""

    def __init__(self, name: str = "resnet18", in_chans: int = 3):
        super().__init__()
        depths, widths = RESNET_DEPTHS[name], RESNET_WIDTHS[name]
        self.name = name
        self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (d, w) in enumerate(zip(depths, widths), 1):
            stride, dilation = {1: (1, 1), 2: (2, 1), 3: (2, 1), 4: (1, 2)}[i]
            blocks = [BasicBlock(cin, w, stride, dilation)] + [BasicBlock(w, w, 1, dilation) for _ in range(d - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = w
        self.out_channels = tuple(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 3, 2, 1)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class DeepLabV3PlusHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_classes: int = 19, channels: int = 256,
                 dilations: Sequence[int] = (6, 12, 18), low_channels: int = 48, dropout: float = 0.1):
        super().__init__()
        c_low, c_high = in_channels[0], in_channels[-1]
        self.aspp = nn.ModuleList([ConvBNReLU(c_high, channels, 1)]
                                  + [ConvBNReLU(c_high, channels, 3, padding=d, dilation=d) for d in dilations])
        self.image_pool = ConvBNReLU(c_high, channels, 1)
        self.bottleneck = ConvBNReLU((len(dilations) + 2) * channels, channels, 1)
        self.c1_bottleneck = ConvBNReLU(c_low, low_channels, 1)
        self.sep_bottleneck = nn.Sequential(ConvBNReLU(channels + low_channels, channels, 3, padding=1),
                                            ConvBNReLU(channels, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        x = feats[-1]
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        x = self.bottleneck(torch.cat([m(x) for m in self.aspp] + [pooled], dim=1))
        low = feats[0]
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.sep_bottleneck(torch.cat([x, self.c1_bottleneck(low)], dim=1))
        return self.conv_seg(self.dropout(x))
