"""Flash attention in Triton for SD-1.5's shapes: head dims 40/64/80/128/160, any query and key lengths.

softmax(q k^T / sqrt(d)) v, forward and backward, with an online softmax and fp32 accumulation
(FlashAttention-2, Dao 2023; the layout of the kernels follows triton's tutorial
python/tutorials/06-fused-attention.py). What SD-1.5 needs that the tutorial does not give:
  - head dims 40, 80, 160 are padded to the next power of two (64, 128, 256) *inside* the kernel:
    the head-dim lanes past ``HEAD_DIM`` are masked on load (read as 0, so they add 0 to every dot)
    and on store; no padded copy of q, k or v is ever made;
  - query and key lengths are independent (cross-attention has 77 keys) and need not be multiples
    of the tiles: the key tail is masked to -inf in the scores, the query tail on load and store;
  - any strides: q, k, v are (B, H, N, D) views, e.g. ``x.view(B, N, H, D).transpose(1, 2)`` straight
    from the projections. The output is allocated as (B, N, H, D) and returned as its (B, H, N, D)
    view, so the caller's ``b h n d -> b n (h d)`` is free; gradients take the strides of the inputs;
  - causal (CLIP) uses the bottom-right alignment of ``ldm.attention.math_attention``: query i sees
    keys j <= i + M - N (the usual mask when N == M).

This module imports triton at the top: import it only through ``ldm.kernels`` (which does so lazily).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ldm.kernels.common import DTYPES, empty, empty_like

HEAD_DIMS = (40, 64, 80, 128, 160)  # SD-1.5: 40/80/160; CLIP: 64; 128 for other models
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# LDM_TRITON_AUTOTUNE=0: no tuning, the first config of each table row (quick GPU test runs).
AUTOTUNE = os.environ.get("LDM_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
LOG2E = 1.4426950408889634  # scores are kept in log2 units so the kernels use exp2


# ----------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim.
# Larger head dims need smaller tiles: at BLOCK_D = 256 a 128x64 K and V tile pair is already
# 64 KB of shared memory per pipeline stage. Untested on hardware beyond what BENCHMARKS.md shows.
_FWD_TABLE = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
}
# Backward, (BLOCK_M, BLOCK_N): the dk/dv kernel keeps a BLOCK_N x BLOCK_D tile of k, v, dk, dv in
# registers and walks the queries BLOCK_M at a time; the dq kernel does the converse.
_BWD_TABLE = {
    64: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
    128: [(32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 2), (16, 64, 4, 3)],
    256: [(16, 32, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2), (16, 64, 8, 2)],
}
_INTERPRET_CONFIG = (32, 32, 4, 1)  # one small config on the CPU interpreter: no tuning, fast tests


def _configs(table):
    if INTERPRET:
        m, n, w, s = _INTERPRET_CONFIG
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)]
    seen = sorted({c for cs in table.values() for c in (cs if AUTOTUNE else cs[:1])})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in seen]


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _prune(table):
    """Keep the configs listed for this padded head dim whose tiles are not larger than the sequence."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if len(configs) == 1:
            return configs
        wanted = set(table[args["BLOCK_D"]] if AUTOTUNE else table[args["BLOCK_D"]][:1])
        n_max, m_max = _pow2(args["N_CTX"]), _pow2(args["M_CTX"])
        keep = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        fits = [c for c in keep if c.kwargs["BLOCK_M"] <= n_max and c.kwargs["BLOCK_N"] <= m_max]
        if fits:
            return fits
        smallest = min(keep, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        return [smallest]

    return prune


_KEY = ["N_CTX", "M_CTX", "HEAD_DIM", "CAUSAL"]


# ----------------------------------------------------------------------------------------------
# Forward
@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d, N_CTX, M_CTX,
               qk_scale, stride_kn, stride_vn,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax. MASK: this block has masked keys (tail or diagonal)."""
    keys = start_n + offs_n
    kp = k_ptrs + start_n * stride_kn  # [BLOCK_D, BLOCK_N]
    vp = v_ptrs + start_n * stride_vn  # [BLOCK_N, BLOCK_D]
    if MASK:
        k = tl.load(kp, mask=(keys[None, :] < M_CTX) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(vp, mask=(keys[:, None] < M_CTX) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(kp)
        v = tl.load(vp)
    else:
        k = tl.load(kp, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(vp, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    qk = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
    if MASK:
        valid = keys[None, :] < M_CTX
        if CAUSAL:
            valid = valid & (keys[None, :] <= offs_m[:, None] + (M_CTX - N_CTX))
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every row sees key 0 in the first block
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.autotune(configs=_configs(_FWD_TABLE), key=_KEY, prune_configs_by={"early_config_prune": _prune(_FWD_TABLE)})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              H, N_CTX, M_CTX, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M  # query blocks of one head are neighbours: k, v stay in L2
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_CTX
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # k^T tile
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, n_full) need no mask: inside M and (causal) visible to every row of this block.
    if CAUSAL:
        hi = tl.minimum(M_CTX, start_m + BLOCK_M + M_CTX - N_CTX)
        n_full = tl.maximum(tl.minimum(M_CTX, start_m + 1 + M_CTX - N_CTX), 0) // BLOCK_N * BLOCK_N
    else:
        hi = M_CTX
        n_full = M_CTX // BLOCK_N * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                   N_CTX, M_CTX, qk_scale, stride_kn, stride_vn,
                                   HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC)
    for start_n in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                   N_CTX, M_CTX, qk_scale, stride_kn, stride_vn,
                                   HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC)

    acc = acc / l_i[:, None]
    tl.store(LSE + bh * N_CTX + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)  # log2 units
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dk/dv per key block and dq per query block (FA-2).
@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    H, N_CTX,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_CTX) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N_CTX + offs_m, tl.sum(o * do, 1), mask=offs_m < N_CTX)


@triton.autotune(configs=_configs(_BWD_TABLE), key=_KEY, prune_configs_by={"early_config_prune": _prune(_BWD_TABLE)})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, N_CTX, M_CTX, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * N_CTX
    DELTA += bh * N_CTX

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < M_CTX) & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # queries i < start_n - (M - N) see none of these keys
        lo = tl.maximum(start_n - (M_CTX - N_CTX), 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N_CTX, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_CTX
        qt = tl.load(Q + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # q^T: [BLOCK_D, BLOCK_M]
        do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # P^T
        valid = row_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + (M_CTX - N_CTX))
        pt = tl.where(valid, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)

    dk = dk * sm_scale
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs(_BWD_TABLE), key=_KEY, prune_configs_by={"early_config_prune": _prune(_BWD_TABLE)})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                 H, N_CTX, M_CTX, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N_CTX
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    lse = tl.load(LSE + bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N_CTX + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = M_CTX
    if CAUSAL:
        hi = tl.minimum(M_CTX, start_m + BLOCK_M + M_CTX - N_CTX)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_mask = (offs_n[None, :] < M_CTX) & d_ok[:, None]
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=kt_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])
        valid = offs_n[None, :] < M_CTX
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (M_CTX - N_CTX))
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Python wrappers
def _check(q, k, v, causal):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention expects (B, H, N, D) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, M, D) = ({B}, {H}, M, {D}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported; supported: {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: all must be one of {DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("flash_attention runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    M = k.shape[2]
    if N == 0 or M == 0:
        raise ValueError("empty query or key sequence")
    if causal and N > M:
        raise ValueError(f"causal attention with more queries ({N}) than keys ({M}) leaves rows with no key")
    return B, H, N, M, D


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: full-precision dots


def _forward(q, k, v, causal):
    B, H, N, M, D = _check(q, k, v, causal)
    o = empty((B, N, H, D), q.dtype, q.device).transpose(1, 2)  # (B, H, N, D) view
    lse = empty((B * H, N), torch.float32, q.device)
    sm_scale = D ** -0.5
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    H, N, M, sm_scale * LOG2E,
                    HEAD_DIM=D, BLOCK_D=_pow2(D), CAUSAL=causal, DOT_PREC=_dot_prec(q.dtype))
    return o, lse


def _backward(q, k, v, o, lse, do, causal):
    B, H, N, M, D = q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    BLOCK_D = _pow2(D)
    delta = empty((B * H, N), torch.float32, q.device)
    block = 32 if BLOCK_D >= 256 else 64
    _attn_bwd_delta[(triton.cdiv(N, block), B * H)](o, do, delta, *o.stride(), *do.stride(), H, N,
                                                    HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=block)
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)  # same strides as the inputs
    sm_scale = D ** -0.5
    common = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=causal, DOT_PREC=_dot_prec(q.dtype))
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, N, M, sm_scale, sm_scale * LOG2E, **common)
    _attn_bwd_dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, N, M, sm_scale, sm_scale * LOG2E, **common)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        o, lse = _forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal)
        return dq, dk, dv, None


def flash_attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(D)) v for q (B, H, N, D), k, v (B, H, M, D), any strides -> (B, H, N, D)."""
    return FlashAttention.apply(q, k, v, causal)
