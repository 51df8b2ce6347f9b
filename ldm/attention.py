"""The one attention dispatch: ``attention(q, k, v, causal)`` is the only place that computes
softmax(QK^T/sqrt(d))V, for the U-Net, the VAE and CLIP.

The backend is the ``attention`` field of ``ldm.ops`` (``LDM_OPS=attention=...`` or
``ops.use(attention=...)``):
  - ``math``: plain PyTorch in fp32; the specification the others are tested against;
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash /
    memory-efficient / cuDNN / math kernels by itself);
  - ``triton``: our kernel, ``ldm.kernels.flash_attention`` (head dims 40/64/80/128/160, any
    query/key lengths; CUDA);
  - ``auto`` (the default): SDPA on every device. On an H100 at SD-1.5's shapes PyTorch's cuDNN /
    flash SDPA kernels beat our Triton kernel (BENCHMARKS.md), so Triton runs only when named.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm import kernels, ops


def math_attention(q, k, v, causal: bool = False):
    """Reference path: fp32 scores and softmax, output in the input dtype.

    `causal` aligns the mask bottom-right: query i sees keys j <= i + M - N (the usual mask when N == M).
    """
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    if causal:
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).tril(m - n)
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", p, v.float()).to(q.dtype)


def attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(d)) v for q: (B, H, N, D), k, v: (B, H, M, D) -> (B, H, N, D)."""
    backend = ops.state().attention
    if backend == "math":
        return math_attention(q, k, v, causal)
    if backend == "triton":
        return kernels.flash_attention(q, k, v, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # "sdpa", and "auto"
