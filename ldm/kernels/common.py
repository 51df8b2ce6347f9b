"""What the kernel modules share, without importing triton: the dtypes they take and their output buffers."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_poison = os.environ.get("LDM_TRITON_POISON") == "1"


@contextmanager
def poison_outputs(flag: bool = True):
    """For tests: kernel outputs (and their fp32 scratch) start as NaN, so an unwritten element shows."""
    global _poison
    old, _poison = _poison, bool(flag)
    try:
        yield
    finally:
        _poison = old


def empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _poison else t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and strides (for gradients of strided views)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if _poison else out
