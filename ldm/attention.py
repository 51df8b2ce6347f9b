"""Attention: the one dispatch and the transformer blocks of the SD U-Net.

``attention(q, k, v)`` is the only place that computes softmax(QK^T/sqrt(d))V.
Backends:
  - ``math``: plain PyTorch in fp32; the specification the others are tested against;
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash /
    memory-efficient / cuDNN / math kernels by itself);
  - ``triton``: our fused kernel in ``ldm.kernels`` (imported lazily, CUDA only; head dims
    40/64/80/128/160, any query/key lengths).
Choose per call (``backend=``), per process (``set_backend``) or with the environment
variable ``LDM_ATTENTION``. ``auto`` (the default) is the fastest backend measured at SD
shapes: SDPA on CPU and on CUDA.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm import kernels
from ldm.layers import GroupNorm32, add, fused, may_overwrite

BACKENDS = ("auto", "math", "sdpa", "triton")
_backend = os.environ.get("LDM_ATTENTION", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"LDM_ATTENTION={_backend!r}; expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use_backend(name: str):
    """Temporarily switch the attention backend: ``with use_backend("math"): ...``."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def math_attention(q, k, v, causal: bool = False):
    """Reference path: fp32 scores and softmax, output in the input dtype."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    if causal:
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).tril(m - n)
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", p, v.float()).to(q.dtype)


def _resolve(backend: str, q: torch.Tensor) -> str:
    # "auto" is SDPA on every device: on an H100 at SD-1.5's shapes PyTorch's cuDNN / flash SDPA kernels
    # beat our Triton kernel (BENCHMARKS.md), so Triton is used only when asked for by name.
    return "sdpa" if backend == "auto" else backend


def attention(q, k, v, causal: bool = False, backend: str | None = None):
    """softmax(q k^T / sqrt(d)) v for q: (B, H, N, D), k, v: (B, H, M, D) -> (B, H, N, D)."""
    backend = _resolve(backend or _backend, q)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "math":
        return math_attention(q, k, v, causal)
    if backend == "triton":
        from ldm import kernels

        return kernels.flash_attention(q, k, v, causal=causal)
    raise ValueError(f"attention backend {backend!r}; expected one of {BACKENDS}")


class CrossAttention(nn.Module):
    """Multi-head attention with CompVis names (to_q/to_k/to_v/to_out.0); context=None is self-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # index 0 kept for checkpoint keys

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        if fused("geglu") and kernels.geglu_supported(x):  # x's device and dtype decide; proj's output is contiguous
            return kernels.geglu_linear(x, self.proj.weight, self.proj.bias)
        x, gate = self.proj(x).chunk(2, dim=-1)
        g = F.gelu(gate)  # exact (erf) GELU on the gate half
        return g.mul_(x) if may_overwrite(g, x) else x * g  # in place: one half-width buffer fewer


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        # Each residual sum goes into the fresh branch output h, never into x (the caller's input).
        h = self.attn1(self.norm1(x))
        x = add(x, h, into=h)
        h = self.attn2(self.norm2(x), context)
        x = add(x, h, into=h)
        h = self.ff(self.norm3(x))
        return add(x, h, into=h)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the h*w tokens -> proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 use_linear: bool = False):
        super().__init__()
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)  # 1e-6 here, 1e-5 in the ResBlocks
        proj = (lambda: nn.Linear(channels, channels)) if use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        if not self.use_linear:
            x = self.proj_out(x)
        return add(x, x_in, into=x)  # x is fresh here, x_in the caller's
