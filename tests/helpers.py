"""Shared test utilities."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give *every* parameter and float buffer random values (zero-initialised layers would hide bugs).

    Norm weights are centred on 1 so activations stay in a sane range at any depth.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            continue
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = p.ndim == 1 and any(s in name for s in ("norm", "layer_norm", "ln_", "in_layers.0", "out_layers.0", "out.0"))
        if is_norm and leaf == "weight":
            r = 1.0 + 0.1 * r
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            r = r * (std if p.ndim == 1 else fan_in ** -0.5)
        p.copy_(r.to(p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
