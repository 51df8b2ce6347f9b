"""Triton kernels for SD-1.5's shapes: flash attention, fused GroupNorm(+SiLU), fused GEGLU.

Nothing here imports triton at module import: CPU-only installs import ``ldm`` (and this package)
without it. Each function imports its kernel module on first use.

    attention_supported(q) -> bool          flash_attention(q, k, v, causal=False)
    group_norm_supported(x) -> bool         group_norm(x, num_groups, weight, bias, eps, silu=False)
                                            group_norm_module(norm, x, silu=False)  # an nn.GroupNorm
    geglu_supported(h) -> bool              geglu(h, bias=None); geglu_linear(x, weight, bias)

The ``*_supported`` predicates are what the model code asks before taking a fused path: they are
True only for CUDA tensors of a supported shape and dtype when triton imports and the kernels are
enabled (``LDM_TRITON=0`` in the environment, or ``with use_kernels(False):``, turns them all off).
They stay False on CPU even under ``TRITON_INTERPRET=1``: the interpreter is for tests, which call
the kernels directly. The layers take the GroupNorm and GEGLU paths only when asked
(``ldm.layers.use_fused`` / ``LDM_FUSED``); attention through ``ldm.attention``'s backend switch.
Benchmarks: ``python -m ldm.kernels.bench``.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

HEAD_DIMS = (40, 64, 80, 128, 160)  # SD-1.5: 40/80/160; CLIP: 64; 128 for other models
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_enabled = os.environ.get("LDM_TRITON", "1") != "0"
_poison = os.environ.get("LDM_TRITON_POISON") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing compiler, driver)
        return False
    return True


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextmanager
def use_kernels(flag: bool):
    """Temporarily switch the fused kernels on or off: ``with use_kernels(False): ...``."""
    old = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(old)


@contextmanager
def poison_outputs(flag: bool = True):
    """For tests: kernel outputs (and their fp32 scratch) start as NaN, so an unwritten element shows."""
    global _poison
    old, _poison = _poison, bool(flag)
    try:
        yield
    finally:
        _poison = old


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _poison else t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and strides (for gradients of strided views)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if _poison else out


def _usable(t: torch.Tensor) -> bool:
    return _enabled and t.is_cuda and t.dtype in DTYPES and triton_available()


# ------------------------------------------------------------------------------------- attention
def attention_supported(q: torch.Tensor) -> bool:
    """True when ``flash_attention`` can take this (B, H, N, D) query: CUDA, head dim in HEAD_DIMS."""
    return q.dim() == 4 and q.shape[-1] in HEAD_DIMS and _usable(q)


def flash_attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(D)) v, q (B, H, N, D), k, v (B, H, M, D), any strides; differentiable."""
    from ldm.kernels import flash

    return flash.flash_attention(q, k, v, causal)


# ------------------------------------------------------------------------------------- group norm
def group_norm_supported(x: torch.Tensor) -> bool:
    """True for a contiguous CUDA (B, C, *) tensor (channels_last falls back to PyTorch)."""
    return x.dim() >= 2 and x.is_contiguous() and _usable(x)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, silu: bool = False,
               block: int | None = None):
    """GroupNorm with fp32 statistics, then optionally SiLU, in one fused pass; output in x's dtype."""
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
    from ldm.kernels import fused_geglu as gg

    return gg.geglu(h, bias)


def geglu_linear(x, weight, bias=None):
    """GEGLU of ``x @ weight^T + bias`` (an ``nn.Linear(dim, 2F)``): cuBLAS matmul, bias in the kernel."""
    return geglu(torch.nn.functional.linear(x, weight), bias)
