"""Building blocks shared by the SD networks (CompVis names).

Fused Triton kernels (``ldm.kernels``) for GroupNorm(+SiLU) and the GEGLU feed-forward are opt-in:
``LDM_FUSED=groupnorm,geglu`` (or ``all``) in the environment, ``set_fused(...)`` or
``with use_fused("groupnorm"): ...``. They apply to CUDA tensors only (elsewhere the PyTorch path
runs) and are off by default because on an H100, launched eagerly, they lost at most SD shapes
(BENCHMARKS.md); under CUDA graphs the launch cost that hurt them is gone.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldm import kernels

FUSIONS = ("groupnorm", "geglu")


def _parse_fused(value: str) -> frozenset:
    names = {n.strip() for n in value.split(",") if n.strip()} - {"none"}
    if "all" in names:
        names = set(FUSIONS)
    unknown = names - set(FUSIONS)
    if unknown:
        raise ValueError(f"fused kernels {sorted(unknown)} unknown; expected a comma list of {FUSIONS}, 'all' or 'none'")
    return frozenset(names)


_fused = _parse_fused(os.environ.get("LDM_FUSED", ""))


def set_fused(*names: str) -> None:
    """Switch the fused kernels: ``set_fused("groupnorm", "geglu")``, ``set_fused("all")``, ``set_fused()`` (none)."""
    global _fused
    _fused = _parse_fused(",".join(names))


def get_fused() -> frozenset:
    return _fused


def fused(name: str) -> bool:
    return name in _fused


@contextmanager
def use_fused(*names: str):
    """Temporarily switch the fused kernels: ``with use_fused("all"): ...``."""
    old = _fused
    set_fused(*names)
    try:
        yield
    finally:
        set_fused(*old)


def may_overwrite(fresh: torch.Tensor, other=None) -> bool:
    """Whether `fresh`, a tensor the calling code has just made and nobody else holds, may receive
    the result of an elementwise op (with `other`) in place.

    Only with autograd off (no_grad / inference_mode): with grad enabled backward may need the old
    values, so training keeps the out-of-place ops. The result must also keep fresh's dtype.
    Never pass a tensor a caller handed in (a forward's input, the context, a reused skip).
    """
    return not torch.is_grad_enabled() and (other is None or torch.result_type(fresh, other) == fresh.dtype)


def add(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """a + b, written into `into` (a or b, a fresh tensor: see `may_overwrite`) when autograd is off.

    a + b takes a's memory layout, so the sum goes into b only where a and b share one; otherwise,
    and with grad enabled, it is the out-of-place a + b. Same values, dtype and strides either way.
    """
    other = b if into is a else a
    if may_overwrite(into, other) and (into is a or (a.shape, a.stride()) == (b.shape, b.stride())):
        return into.add_(other)
    return a + b


def silu(fresh: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor (a norm's output), in place when `may_overwrite(fresh)`."""
    return F.silu(fresh, inplace=may_overwrite(fresh))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (CompVis GroupNorm32); output in the input dtype.

    For a large fp16/bf16 input with autograd off, the fp32 copy and fp32 result are made a few
    groups at a time and written into the output, so the fp32 temporaries stay near `chunk_numel`
    elements instead of two fp32 copies of x (the VAE decoder at 1024^2). Groups are normalised
    independently, so the values are those of the one-shot computation.
    """

    chunk_numel = 2**22

    def forward(self, x):
        if fused("groupnorm") and kernels.group_norm_supported(x):
            return kernels.group_norm_module(self, x)  # fp32 statistics inside the kernel
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        if not self._chunked(x):
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        out = torch.empty_like(x)
        per_group = x.shape[1] // self.num_groups
        step = per_group * max(1, self.num_groups * self.chunk_numel // x.numel())  # channels: whole groups
        for c in range(0, x.shape[1], step):
            s = slice(c, c + step)
            out[:, s] = F.group_norm(x[:, s].float(), x[:, s].shape[1] // per_group,
                                     None if w is None else w[s], None if b is None else b[s], self.eps)
        return out

    def _chunked(self, x) -> bool:
        # Large contiguous fp16/bf16 inputs with autograd off only; training keeps the one-shot op.
        return (x.dtype in (torch.float16, torch.bfloat16) and x.numel() > self.chunk_numel
                and x.is_contiguous() and not torch.is_grad_enabled())


def norm_silu(norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)): one fused kernel when the "groupnorm" fusion is on and x suits it."""
    if fused("groupnorm") and kernels.group_norm_supported(x):
        return kernels.group_norm_module(norm, x, silu=True)
    return silu(norm(x))


class NormSiLUSequential(nn.Sequential):
    """[GroupNorm32, SiLU, *rest], indices as in the checkpoints; the first two run as `norm_silu`."""

    def forward(self, x):
        x = norm_silu(self[0], x)
        for layer in self[2:]:
            x = layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, in fp32.

    The order is [cos, sin] (diffusers: flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepBlock(nn.Module):
    """Marker base: a block whose forward is `forward(x, emb)`."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to ResBlocks and `context` to SpatialTransformers."""

    def forward(self, x, emb, context=None):
        from ldm.attention import SpatialTransformer

        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(TimestepBlock):
    """U-Net residual block: GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-(dropout)-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = NormSiLUSequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))  # shared emb: not in place
        # Dropout at index 2 keeps the conv at out_layers.3 as in the checkpoints.
        self.out_layers = NormSiLUSequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = add(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None], into=h)
        out = self.out_layers(h)
        return add(self.skip_connection(x), out, into=out)  # never into x, the caller's


class Downsample(nn.Module):
    """U-Net downsample: 3x3 conv, stride 2, padding 1 (CompVis name `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
