"""Fused GroupNorm (+ optional SiLU) in Triton: fp32 statistics, output in the input dtype.

SD-1.5 normalises (B, C, H, W) tensors with 32 groups: at batch 2 that is only 64 groups, each of
C/32 * H*W elements (40960 at 64x64 latents, 320 channels). One program per group would leave most of
an H100's 132 multiprocessors idle, so the reduction is split:
  1. ``_gn_stats``: one program per (group, chunk of BLOCK elements) writes the chunk's mean and
     sum of squared deviations (M2). Chunk-local means avoid the cancellation of sum/sum-of-squares;
  2. ``_gn_norm``: one program per (group, chunk) merges its group's partials (Chan et al.'s pairwise
     rule, in fp32), then normalises its chunk, applies the per-channel affine and optionally SiLU.
When a group fits in one chunk, step 2 computes the statistics itself and step 1 is skipped.
The backward follows the same plan: per-(sample, channel) partial sums, a small reduction in PyTorch,
then one elementwise pass for dx.
Measured on an H100 (BENCHMARKS.md, batch 2, eager): 1.7x faster than native fp16 ``F.group_norm``
+ SiLU and 2.4x faster than ``GroupNorm32`` on 2x960x64x64, slower on the smaller SD tensors,
where every path is bound by CPU launch overhead rather than bytes.

This module imports triton at the top: import it only through ``ldm.kernels``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ldm.kernels.common import DTYPES, empty, empty_like

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEFAULT_BLOCK = 2048  # elements per program: 10 chunks per group (640 programs) at SD's 64x64 level


@triton.jit
def _gn_stats(X, PMEAN, PM2, GROUP_SIZE, NUM_CHUNKS, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    x = tl.load(X + g.to(tl.int64) * GROUP_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(GROUP_SIZE - c * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, 0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(PMEAN + g * NUM_CHUNKS + c, mean)
    tl.store(PM2 + g * NUM_CHUNKS + c, tl.sum(d * d, 0))


@triton.jit
def _gn_norm(X, Y, W, B, PMEAN, PM2, MEAN, RSTD,
             GROUP_SIZE, HW, CPG, G, NUM_CHUNKS, eps,
             SILU: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    g = tl.program_id(0)  # b * G + group
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    base = g.to(tl.int64) * GROUP_SIZE
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    if ONE_PASS:  # the whole group is this chunk
        mean = tl.sum(x, 0) / GROUP_SIZE
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(d * d, 0) / GROUP_SIZE
    else:  # merge the partials of all chunks of this group
        ci = tl.arange(0, BLOCK_C)
        cm = ci < NUM_CHUNKS
        pmean = tl.load(PMEAN + g * NUM_CHUNKS + ci, mask=cm, other=0.0)
        pm2 = tl.load(PM2 + g * NUM_CHUNKS + ci, mask=cm, other=0.0)
        n = tl.where(cm, tl.minimum(GROUP_SIZE - ci * BLOCK, BLOCK), 0).to(tl.float32)
        mean = tl.sum(n * pmean, 0) / GROUP_SIZE
        dm = pmean - mean
        var = (tl.sum(pm2, 0) + tl.sum(n * dm * dm, 0)) / GROUP_SIZE
    rstd = 1.0 / tl.sqrt(var + eps)
    if c == 0:
        tl.store(MEAN + g, mean)
        tl.store(RSTD + g, rstd)
    ch = (g % G) * CPG + offs // HW
    w = tl.load(W + ch, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + ch, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_partial(X, DY, W, B, MEAN, RSTD, PS1, PS2, HW, C, CPG, NUM_CHUNKS,
                    SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Per (sample, channel) row and chunk of H*W: sum(dz) and sum(dz * xhat), dz = dL/d(pre-SiLU output)."""
    row = tl.program_id(0)  # b * C + channel
    c = tl.program_id(1)
    ch = row % C
    g = (row // C) * (C // CPG) + ch // CPG
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = row.to(tl.int64) * HW
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - tl.load(MEAN + g)) * tl.load(RSTD + g)
    if SILU:
        z = xhat * tl.load(W + ch).to(tl.float32) + tl.load(B + ch).to(tl.float32)
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    dz = tl.where(mask, dz, 0.0)
    tl.store(PS1 + row * NUM_CHUNKS + c, tl.sum(dz, 0))
    tl.store(PS2 + row * NUM_CHUNKS + c, tl.sum(dz * xhat, 0))


@triton.jit
def _gn_bwd_dx(X, DY, DX, W, B, MEAN, RSTD, C1, C2, GROUP_SIZE, HW, CPG, G,
               SILU: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (dz * w - mean(dz * w) - xhat * mean(dz * w * xhat)), means over the group."""
    g = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    base = g.to(tl.int64) * GROUP_SIZE
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + g)
    rstd = tl.load(RSTD + g)
    ch = (g % G) * CPG + offs // HW
    w = tl.load(W + ch, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + tl.load(B + ch, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    dx = rstd * (dz * w - tl.load(C1 + g) - xhat * tl.load(C2 + g))
    tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _block(n: int, block: int | None) -> int:
    return triton.next_power_of_2(min(n, block or DEFAULT_BLOCK))


def _forward(x, num_groups, weight, bias, eps, silu, block):
    B, C = x.shape[:2]
    HW = x[0, 0].numel()
    G = num_groups
    group_size = (C // G) * HW
    BLOCK = _block(group_size, block)
    chunks = triton.cdiv(group_size, BLOCK)
    y = empty_like(x)
    mean = empty(B * G, torch.float32, x.device)
    rstd = empty(B * G, torch.float32, x.device)
    pmean = empty((B * G, chunks), torch.float32, x.device)
    pm2 = empty((B * G, chunks), torch.float32, x.device)
    if chunks > 1:
        _gn_stats[(B * G, chunks)](x, pmean, pm2, group_size, chunks, BLOCK=BLOCK, num_warps=4)
    _gn_norm[(B * G, chunks)](x, y, weight, bias, pmean, pm2, mean, rstd, group_size, HW, C // G, G, chunks, eps,
                              SILU=silu, ONE_PASS=chunks == 1, BLOCK=BLOCK,
                              BLOCK_C=max(2, triton.next_power_of_2(chunks)), num_warps=4)
    return y, mean, rstd


def _backward(x, dy, weight, bias, mean, rstd, num_groups, silu, block):
    B, C = x.shape[:2]
    HW = x[0, 0].numel()
    G, CPG = num_groups, C // num_groups
    BLOCK = _block(HW, block)
    chunks = triton.cdiv(HW, BLOCK)
    ps1 = empty((B * C, chunks), torch.float32, x.device)
    ps2 = empty((B * C, chunks), torch.float32, x.device)
    _gn_bwd_partial[(B * C, chunks)](x, dy, weight, bias, mean, rstd, ps1, ps2, HW, C, CPG, chunks,
                                     SILU=silu, BLOCK=BLOCK, num_warps=4)
    s1 = ps1.sum(1).view(B, C)  # sum over H*W of dz, per sample and channel
    s2 = ps2.sum(1).view(B, C)  # ... of dz * xhat
    w = weight.float()
    group_size = CPG * HW
    c1 = (s1 * w).view(B, G, CPG).sum(2).reshape(-1) / group_size
    c2 = (s2 * w).view(B, G, CPG).sum(2).reshape(-1) / group_size
    dx = empty_like(x)
    BLOCK = _block(group_size, block)
    _gn_bwd_dx[(B * G, triton.cdiv(group_size, BLOCK))](x, dy, dx, weight, bias, mean, rstd, c1, c2,
                                                        group_size, HW, CPG, G, SILU=silu, BLOCK=BLOCK,
                                                        num_warps=4)
    return dx, s2.sum(0), s1.sum(0)


class GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, block):
        y, mean, rstd = _forward(x, num_groups, weight, bias, eps, silu, block)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.args = (num_groups, silu, block)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        num_groups, silu, block = ctx.args
        dx, dw, db = _backward(x, dy.contiguous(), weight, bias, mean, rstd, num_groups, silu, block)
        return dx, dw.to(weight.dtype), db.to(bias.dtype), None, None, None, None


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False,
               block: int | None = None):
    """GroupNorm(num_groups) over (B, C, *) in fp32 statistics, then optionally SiLU; output in x's dtype.

    ``block`` sets the elements per program (a power of two; default 2048); tests use it to split a
    group's reduction into several chunks at small shapes.
    """
    if x.dim() < 2:
        raise ValueError(f"group_norm expects (B, C, *), got {tuple(x.shape)}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"{C} channels are not divisible by {num_groups} groups")
    if x.dtype not in DTYPES:
        raise ValueError(f"dtype {x.dtype} not supported; supported: {DTYPES}")
    if not x.is_cuda and not INTERPRET:
        raise ValueError("group_norm runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if weight is None:
        weight = torch.ones(C, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(C, dtype=x.dtype, device=x.device)
    return GroupNormFn.apply(x.contiguous(), weight, bias, num_groups, float(eps), bool(silu), block)
