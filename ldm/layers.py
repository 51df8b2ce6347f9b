"""What the SD networks share: GroupNorm in fp32, norm + SiLU, the timestep embedding, Upsample,
and the in-place arithmetic of inference.

In-place inference. With autograd off (no_grad / inference_mode) the forwards write sums and
activations into *fresh* tensors: ones the calling code has just made and nobody else holds (a
conv's, a norm's or a branch's output), never a tensor it was handed (its input, the context, a
skip kept for later). That saves an activation-sized buffer at every residual connection and
activation. With autograd on, backward may need the old values, so training takes the out-of-place
ops. Values, dtypes and memory layouts are the same either way (tests/test_inference_memory.py):
an in-place result keeps the fresh tensor's layout, so a sum goes in place only where the
out-of-place sum would have that layout too. The whole mechanism is the three functions below:
`residual(x, h)` (skip + branch), `add_into(h, x)` (add to a fresh tensor) and `may_overwrite`
(the rule, for the few other in-place activations).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm import kernels, ops


def may_overwrite(fresh: torch.Tensor, other=None) -> bool:
    """Whether the fresh tensor `fresh` may receive the result of an elementwise op (with `other`) in place:
    only with autograd off, and only if the result keeps fresh's dtype."""
    return not torch.is_grad_enabled() and (other is None or torch.result_type(fresh, other) == fresh.dtype)


def residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h: a residual connection, x the skip (never written), h a fresh branch output.

    x + h takes x's memory layout, so the sum goes into h only where h has x's shape and strides.
    """
    if may_overwrite(h, x) and (x.shape, x.stride()) == (h.shape, h.stride()):
        return h.add_(x)
    return x + h


def add_into(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h + x for a fresh h (x, e.g. an embedding broadcast over h, is never written); h + x takes
    h's layout, so with autograd off the sum always goes into h."""
    if may_overwrite(h, x):
        return h.add_(x)
    return h + x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (CompVis GroupNorm32); output in the input dtype.

    For a large fp16/bf16 input with autograd off, the fp32 copy and fp32 result are made a few
    groups at a time and written into the output, so the fp32 temporaries stay near `chunk_numel`
    elements instead of two fp32 copies of x (the VAE decoder at 1024^2). Groups are normalised
    independently, so the values are those of the one-shot computation.
    """

    chunk_numel = 2**22

    def forward(self, x):
        if ops.fused("groupnorm") and kernels.group_norm_supported(x):
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
    if ops.fused("groupnorm") and kernels.group_norm_supported(x):
        return kernels.group_norm_module(norm, x, silu=True)
    y = norm(x)
    return F.silu(y, inplace=may_overwrite(y))


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


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (`conv`: the U-Net's and the VAE decoder's key names alike)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
