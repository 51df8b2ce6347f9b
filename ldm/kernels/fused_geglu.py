"""Fused GEGLU (Shazeer 2020) in Triton: (bias +) split + exact-GELU gate + product, one pass.

SD-1.5's feed-forward computes ``a, g = proj(x).chunk(2, -1); a * gelu(g)`` on (B, N, 2F) tensors
(F = 4 * channels: 1280..5120). In PyTorch that is a GELU kernel (read F, write F) and a product
(read 2F, write F) after the projection; fused, it is one read of 2F and one write of F, in fp32
registers. ``geglu(h, bias)`` takes the projection *without* its bias (``x @ W^T``) and adds the bias
in the kernel; with ``bias=None`` it takes the full projection.
Measured on an H100 (BENCHMARKS.md, batch 2, eager): faster only at the 64x64 level (2x4096x320:
0.072 vs 0.105 ms); at the smaller levels the ~70 us launch cost from Python dominates and it loses.
So ``ldm.unet.GEGLU`` takes it only when asked (``LDM_OPS=fused=geglu``, ``ops.use(fused="geglu")``);
decide with the bench at view-batch sizes (``--batch 32``) or under CUDA graphs, where launches stop
dominating.

This module imports triton at the top: import it only through ``ldm.kernels``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ldm.kernels.common import DTYPES, empty

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SQRT1_2 = tl.constexpr(0.7071067811865476)  # kernels may read only constexpr globals
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _geglu_fwd(H, BIAS, OUT, F, stride_h, stride_o, HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    a = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(H + row * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(BIAS + F + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * (0.5 * g * (1.0 + tl.math.erf(g * SQRT1_2)))
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(H, BIAS, DOUT, DH, F, stride_h, stride_do, stride_dh,
               HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    a = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(H + row * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(BIAS + F + cols, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(g * SQRT1_2))
    pdf = tl.math.exp(-0.5 * g * g) * INV_SQRT_2PI
    tl.store(DH + row * stride_dh + cols, (do * g * cdf).to(DH.dtype.element_ty), mask=mask)
    tl.store(DH + row * stride_dh + F + cols, (do * a * (cdf + g * pdf)).to(DH.dtype.element_ty), mask=mask)


def _rows(t):
    return t.reshape(-1, t.shape[-1])  # a view when the last dim is contiguous (checked by the caller)


class GEGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        F2 = h.shape[-1]
        F = F2 // 2
        h2 = _rows(h)
        out = empty((*h.shape[:-1], F), h.dtype, h.device)
        o2 = out.view(-1, F)
        BLOCK_F = min(1024, triton.next_power_of_2(F))
        _geglu_fwd[(h2.shape[0], triton.cdiv(F, BLOCK_F))](h2, bias if bias is not None else h2, o2, F,
                                                         h2.stride(0), o2.stride(0), HAS_BIAS=bias is not None,
                                                         BLOCK_F=BLOCK_F, num_warps=4)
        ctx.save_for_backward(h, bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, bias = ctx.saved_tensors
        F = h.shape[-1] // 2
        h2 = _rows(h)
        do2 = _rows(dout.contiguous())
        dh = empty(h2.shape, h.dtype, h.device)
        BLOCK_F = min(1024, triton.next_power_of_2(F))
        _geglu_bwd[(h2.shape[0], triton.cdiv(F, BLOCK_F))](h2, bias if bias is not None else h2, do2, dh, F,
                                                         h2.stride(0), do2.stride(0), dh.stride(0),
                                                         HAS_BIAS=bias is not None, BLOCK_F=BLOCK_F, num_warps=4)
        dbias = dh.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
        return dh.view(h.shape), dbias


def geglu(h, bias=None):
    """``a * gelu(g)`` with ``a, g = (h + bias).chunk(2, -1)``, exact (erf) GELU, computed in fp32.

    h: (..., 2F), last dim contiguous; bias: (2F,) or None. Returns (..., F) in h's dtype.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dim, got {h.shape[-1]}")
    if h.dtype not in DTYPES:
        raise ValueError(f"dtype {h.dtype} not supported; supported: {DTYPES}")
    if bias is not None and (bias.shape != (h.shape[-1],) or bias.device != h.device):
        raise ValueError(f"bias must be ({h.shape[-1]},) on {h.device}, got {tuple(bias.shape)} on {bias.device}")
    if not h.is_cuda and not INTERPRET:
        raise ValueError("geglu runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if h.stride(-1) != 1:
        h = h.contiguous()
    return GEGLUFn.apply(h, bias)
