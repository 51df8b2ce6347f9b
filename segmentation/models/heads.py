"""Decode heads: SegFormer's all-MLP head and DAFormer's separable-ASPP context fusion head.

Both follow the mmseg module trees of the original repositories (NVlabs SegFormer
``segformer_head.py``, DAFormer ``daformer_head.py`` + ``aspp_head``/``sep_aspp_head``), with
mmcv's ``ConvModule`` (conv without bias when a norm follows, BN, ReLU) written out as
``ConvBNReLU``. Every parameter of a head lives under ``decode_head.`` in a segmentor, so the
optimizer can find them by the substring ``head`` (lr x 10, as mmseg's ``custom_keys``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule`` with BN (+ ReLU unless ``act=False``); ``conv``/``bn`` as in its keys."""

    def __init__(self, cin, cout, k=1, padding=0, dilation=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.act else x


class SeparableConvBNReLU(nn.Module):
    """mmcv ``DepthwiseSeparableConvModule``: depthwise k x k (BN, ReLU) then pointwise 1x1 (BN, ReLU)."""

    def __init__(self, cin, cout, k=3, dilation=1):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, k, padding=dilation * (k // 2), dilation=dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MLP(nn.Module):
    """Per-pixel linear embedding of a feature map; returns NCHW."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


def _resize(x, size):
    return x if x.shape[-2:] == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegFormerHead(nn.Module):
    """All-MLP decoder: embed each level to ``embed_dim`` (768 for B2..B5, 256 for B0/B1), upsample
    to 1/4, concatenate (c4, c3, c2, c1 order), 1x1 conv + BN + ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int = 19, embed_dim: int = 768, dropout: float = 0.1):
        super().__init__()
        for i, c in enumerate(in_channels, 1):
            setattr(self, f"linear_c{i}", MLP(c, embed_dim))
        self.linear_fuse = ConvBNReLU(4 * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        embedded = [_resize(getattr(self, f"linear_c{i}")(feats[i - 1]), size) for i in (4, 3, 2, 1)]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(embedded, dim=1))))


class DepthwiseSeparableASPP(nn.ModuleList):
    """ASPP branches: 1x1 conv for dilation 1, depthwise-separable 3x3 for the others."""

    def __init__(self, cin: int, channels: int, dilations: Sequence[int]):
        super().__init__(ConvBNReLU(cin, channels, 1) if d == 1 else SeparableConvBNReLU(cin, channels, 3, d)
                         for d in dilations)

    def forward(self, x):
        return [m(x) for m in self]


class ASPPWrapper(nn.Module):
    """DAFormer's fusion: separable ASPP over the concatenated embeddings, no image-pool branch,
    then a 3x3 ConvModule bottleneck."""

    def __init__(self, cin: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = DepthwiseSeparableASPP(cin, channels, dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x):
        return self.bottleneck(torch.cat(self.aspp_modules(x), dim=1))


class DAFormerHead(nn.Module):
    """Per-level MLP embeddings (no norm, no activation) to ``embed_dim`` (256), upsampled to 1/4
    and concatenated in level order, fused by ``ASPPWrapper`` (dilations 1/6/12/18, BN + ReLU),
    dropout 0.1 and a 1x1 classifier ``conv_seg`` (mmseg's ``cls_seg``).

    ``fusion="conv"`` replaces the ASPP by one 1x1 ConvModule (conv, BN, ReLU; keys
    ``fuse_layer.conv`` / ``fuse_layer.bn``): DAFormer's ``fusion_cfg=dict(type='conv',
    kernel_size=1)``, which HRDA uses for its scale-attention head."""

    def __init__(self, in_channels: Sequence[int], num_classes: int = 19, embed_dim: int = 256,
                 channels: int = 256, dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1,
                 fusion: str = "aspp"):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): MLP(c, embed_dim) for i, c in enumerate(in_channels)})
        if fusion == "aspp":
            self.fuse_layer = ASPPWrapper(embed_dim * len(in_channels), channels, dilations)
        elif fusion == "conv":
            self.fuse_layer = ConvBNReLU(embed_dim * len(in_channels), channels, 1)
        else:
            raise ValueError(f"unknown DAFormer fusion {fusion!r} (aspp | conv)")
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([_resize(self.embed_layers[str(i)](f), size) for i, f in enumerate(feats)], dim=1)
        return self.conv_seg(self.dropout(self.fuse_layer(x)))
