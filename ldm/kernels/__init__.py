"""Triton kernels for SD-1.5's shapes: flash attention, fused GroupNorm(+SiLU), fused GEGLU.

Nothing here imports triton at module import: CPU-only installs import ``ldm`` (and this package)
without it. Each function imports its kernel module on first use.

                                            flash_attention(q, k, v, causal=False)  # head dims 40..160
    group_norm_supported(x) -> bool         group_norm(x, num_groups, weight, bias, eps, silu=False)
                                            group_norm_module(norm, x, silu=False)  # an nn.GroupNorm
    geglu_supported(h) -> bool              geglu(h, bias=None); geglu_linear(x, weight, bias)

The layers take a kernel only where ``ldm.ops`` says so: attention when ``attention=triton``, the
GroupNorm and GEGLU kernels when they are in ``fused`` and their ``*_supported`` predicate is True,
which is only for CUDA tensors of a supported shape and dtype, with triton importable and
``triton=on``. The predicates stay False on CPU even under ``TRITON_INTERPRET=1``: the interpreter is
for tests, which call the kernels directly. With ``triton=off`` the kernel functions raise.
Benchmarks: ``python bench/kernels.py``.
"""
from __future__ import annotations

import functools

import torch

from ldm import ops
from ldm.kernels.common import DTYPES


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing compiler, driver)
        return False
    return True


def _usable(t: torch.Tensor) -> bool:
    return ops.state().triton and t.is_cuda and t.dtype in DTYPES and triton_available()


def _require_triton(what: str) -> None:
    if not ops.state().triton:
        raise RuntimeError(f"{what}: Triton kernels are off (triton=off in LDM_OPS or ops.use)")
    if not triton_available():
        raise RuntimeError(f"{what}: triton does not import here, so its kernels cannot run")


# ------------------------------------------------------------------------------------- attention
def flash_attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(D)) v, q (B, H, N, D), k, v (B, H, M, D), any strides; differentiable."""
    _require_triton("flash_attention")
    from ldm.kernels import flash

    return flash.flash_attention(q, k, v, causal)


# ------------------------------------------------------------------------------------- group norm
def group_norm_supported(x: torch.Tensor) -> bool:
    """True for a contiguous CUDA (B, C, *) tensor (channels_last falls back to PyTorch)."""
    return x.dim() >= 2 and x.is_contiguous() and _usable(x)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False,
               block: int | None = None):
    """GroupNorm with fp32 statistics, then optionally SiLU, in one fused pass; output in x's dtype."""
    _require_triton("group_norm")
    from ldm.kernels import groupnorm as gn

    return gn.group_norm(x, num_groups, weight, bias, eps, silu, block)


def group_norm_module(norm: torch.nn.GroupNorm, x, silu: bool = False):
    """``norm(x)`` (then SiLU if asked) for an ``nn.GroupNorm`` (e.g. ``GroupNorm32``), fused."""
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)


# ------------------------------------------------------------------------------------- GEGLU
def geglu_supported(h: torch.Tensor) -> bool:
    return h.dim() >= 1 and h.shape[-1] % 2 == 0 and h.stride(-1) == 1 and _usable(h)


def geglu(h, bias=None):
    """``a * gelu(g)`` for ``a, g = (h + bias).chunk(2, -1)`` (exact GELU), fused; differentiable."""
    _require_triton("geglu")
    from ldm.kernels import fused_geglu as gg

    return gg.geglu(h, bias)


def geglu_linear(x, weight, bias=None):
    """GEGLU of ``x @ weight^T + bias`` (an ``nn.Linear(dim, 2F)``): cuBLAS matmul, bias in the kernel."""
    return geglu(torch.nn.functional.linear(x, weight), bias)
