"""Mix Transformer (MiT-B0..B5), the SegFormer encoder (Xie et al. 2021), in the NVlabs key space.

Module names equal the keys of the official ImageNet-pretrained files (NVlabs SegFormer
``mit_b*.pth``, as loaded by DAFormer/HRDA/DGInStyle-SegModel): ``patch_embed1.proj.weight``,
``block1.0.norm1.weight``, ``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``,
``block1.0.attn.sr.weight`` / ``attn.norm`` (only where the reduction ratio is > 1),
``block1.0.mlp.fc1`` / ``mlp.dwconv.dwconv`` / ``mlp.fc2``, ``norm1``..``norm4``. Those files also
carry the ImageNet classifier ``head.weight`` / ``head.bias``, which a backbone does not have:
``load_pretrained`` tolerates exactly those two keys and nothing else.

Per stage i (1..4): an overlapping patch embedding (conv 7x7 stride 4, then 3x3 stride 2),
``depths[i]`` blocks of efficient self-attention (keys/values from a ``sr_ratio``-strided conv,
ratios 8/4/2/1) and Mix-FFN (fc -> depthwise 3x3 conv -> GELU -> fc), a LayerNorm; the output is
reshaped to NCHW. Outputs are at strides 4, 8, 16, 32. LayerNorm eps is 1e-6 as in the
official ``mit_b*`` classes; stochastic depth grows linearly from 0 to ``drop_path_rate`` over all
blocks.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.weights import CheckpointError, load_into, read_state_dict, read_torch, save_tensors


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: tuple[int, int, int, int] = (64, 128, 320, 512)
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    depths: tuple[int, int, int, int] = (3, 6, 40, 3)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    in_chans: int = 3
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("embed_dims", "num_heads", "depths", "sr_ratios"):
            v = getattr(self, name)
            if len(v) != 4:
                raise ValueError(f"MiTConfig.{name} needs 4 entries (one per stage), got {v}")
            object.__setattr__(self, name, tuple(int(x) for x in v))
        for d, h in zip(self.embed_dims, self.num_heads):
            if d % h:
                raise ValueError(f"embed dim {d} is not divisible by {h} heads")


_B1_DIMS = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
# The official mit_b0..b5 classes (NVlabs SegFormer mmseg/models/backbones/mix_transformer.py).
MIT_CONFIGS: dict[str, MiTConfig] = {
    "mit_b0": MiTConfig(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2)),
    "mit_b1": MiTConfig(**_B1_DIMS, depths=(2, 2, 2, 2)),
    "mit_b2": MiTConfig(**_B1_DIMS, depths=(3, 4, 6, 3)),
    "mit_b3": MiTConfig(**_B1_DIMS, depths=(3, 4, 18, 3)),
    "mit_b4": MiTConfig(**_B1_DIMS, depths=(3, 8, 27, 3)),
    "mit_b5": MiTConfig(**_B1_DIMS, depths=(3, 6, 40, 3)),
    # Not an official size: a few thousand parameters for CPU smoke tests.
    "mit_tiny": MiTConfig(embed_dims=(16, 24, 32, 48), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1),
                          drop_path_rate=0.0),
    # Not an official size either: the miniature world's segmenters (trained from scratch on a CPU).
    "mit_mini": MiTConfig(embed_dims=(24, 48, 64, 96), num_heads=(1, 2, 2, 3), depths=(1, 1, 2, 1),
                          drop_path_rate=0.0),
}
# Keys of the official files that the backbone does not have (the ImageNet classifier).
CLASSIFIER_KEYS = ("head.weight", "head.bias")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p, rescale by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (B, HW, C)


class Attention(nn.Module):
    """Efficient self-attention: keys and values come from the sequence spatially reduced by a
    ``sr_ratio``-strided conv (cost N * N/R^2 instead of N^2)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:  # the official files have no sr/norm keys in stage 4 (ratio 1)
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, h: int, w: int):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale hd^-0.5, as qk_scale=None
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h: int, w: int):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: the depthwise 3x3 conv supplies the positional information (no position embedding)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h: int, w: int):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = drop_path

    def forward(self, x, h: int, w: int):
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path, self.training)


class MixVisionTransformer(nn.Module):
    """``forward(x)`` -> 4 feature maps (B, C_i, H/s_i, W/s_i), s = 4, 8, 16, 32."""

    def __init__(self, cfg: MiTConfig | str = "mit_b5"):
        super().__init__()
        cfg = MIT_CONFIGS[cfg] if isinstance(cfg, str) else cfg
        self.cfg = cfg
        n = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * j / (n - 1) if n > 1 else 0.0 for j in range(n)]  # torch.linspace(0, rate, n)
        cur, prev = 0, cfg.in_chans
        for i, (dim, heads, depth, sr) in enumerate(zip(cfg.embed_dims, cfg.num_heads, cfg.depths, cfg.sr_ratios), 1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(patch, stride, prev, dim, cfg.norm_eps))
            setattr(self, f"block{i}", nn.ModuleList(
                Block(dim, heads, cfg.mlp_ratio, sr, cfg.qkv_bias, dpr[cur + j], cfg.norm_eps) for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=cfg.norm_eps))
            cur, prev = cur + depth, dim
        self.apply(_init_weights)
        # SHADE (segmentation.models.shade): set to a StyleHallucination to train with
        # [clean; hallucinated] stage-1 features; no parameters, no state-dict keys
        self.style_hallucination = None

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.cfg.embed_dims

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            if i == 1 and self.training and self.style_hallucination is not None:
                x = torch.cat(self.style_hallucination(x), dim=0)  # the batch doubles from here on
            outs.append(x)
        return outs


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    """The official init: truncated normal (std .02) linears, unit LayerNorms, He-normal convs
    over fan_out / groups."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.zero_()


# --------------------------------------------------------------------------------------------
# Official weight files
# --------------------------------------------------------------------------------------------
def _unwrap(obj: Mapping) -> dict[str, torch.Tensor]:
    """The backbone tensors of an official file, or of an mmseg checkpoint whose keys start with
    ``backbone.`` (then only those are kept)."""
    sd = dict(obj)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def read_mit_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a MiT weight file (``.pth``/``.pt``/``.bin`` read with ``weights_only``, or
    ``.safetensors``); a ``{"state_dict": ...}`` wrapper and a ``backbone.`` prefix are removed."""
    path = Path(path)
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        if "entries are not tensors" not in str(e):
            raise
        obj = read_torch(path)
        inner = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(inner, dict):
            raise
        sd = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    return _unwrap(sd)


def load_pretrained(backbone: MixVisionTransformer, source: str | os.PathLike | Mapping[str, torch.Tensor],
                    *, name: str | None = None) -> MixVisionTransformer:
    """Strictly load official MiT weights (a path or a state dict) into ``backbone``.

    Every backbone key must be present with its shape; the only extra keys allowed are the
    ImageNet classifier's ``head.weight``/``head.bias``. Anything else raises one
    ``CheckpointError`` naming the file and listing missing / unexpected / mis-shaped keys."""
    if isinstance(source, Mapping):
        sd, where = _unwrap(source), name or "<state dict>"
    else:
        sd, where = read_mit_state_dict(source), str(source)
    return load_into(backbone, sd, source=where, allow_unexpected=CLASSIFIER_KEYS, hint=_variant_hint)


def guess_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name the official MiT size whose key set and stage widths match ``sd``, if any."""
    try:
        dims = tuple(int(sd[f"norm{i}.weight"].shape[0]) for i in range(1, 5))
        depths = tuple(1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"block{i}."))
                       for i in range(1, 5))
    except (KeyError, ValueError):
        return None
    for name, c in MIT_CONFIGS.items():
        if c.embed_dims == dims and c.depths == depths:
            return name
    return f"a MiT with embed_dims {dims} and depths {depths}"


def _variant_hint(sd: Mapping[str, torch.Tensor]) -> str | None:
    guess = guess_variant(sd)
    return guess and f"the file looks like {guess}"


def export_pretrained(backbone: MixVisionTransformer, path: str | os.PathLike) -> Path:
    """Write the backbone in the official key layout: a ``.safetensors`` file (config in the
    metadata) or, for any other suffix, a ``torch.save``'d plain state dict like ``mit_b*.pth``."""
    path = Path(path)
    metadata = {"mit_config": json.dumps(asdict(backbone.cfg))} if path.suffix == ".safetensors" else None
    return save_tensors(path, backbone.state_dict(), metadata, overwrite=True)
