"""Classifier-free guidance as a wrapper around any batched denoiser.

    eps_fn = cfg(unet, 7.5, context=Split(uncond_ctx, cond_ctx))
    eps_fn = cfg(controlled_unet, 7.5, context=Split(u, c), hint=hint)   # hint is duplicated
    x = ddim_sample(eps_fn, x, 20)

``model_fn(x, t, **kwargs) -> eps`` is duck-typed (a U-Net, a ControlNet adapter, a test
double). Guidance runs the unconditional and conditional halves in ONE batched call, in
diffusers' order [uncond; cond], and combines ε = ε_u + s·(ε_c - ε_u). A negative prompt is
just a different uncond context.

How each keyword argument is batched for the doubled call:
- ``Split(uncond, cond)``: the two halves differ (the text context): cat([uncond, cond]).
- a plain tensor: per-sample data that is the same for both halves (a ControlNet hint):
  cat([v, v]). Lists/tuples of tensors are handled element by element.
- any non-tensor (floats, None, modules): passed through unchanged.
The timestep t is duplicated only if it is a per-sample tensor; scalars pass through.
With scale 1 the uncond half is skipped: the model sees x and the cond halves only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Split:
    """A conditioning value that differs between the unconditional and conditional halves."""

    uncond: Any
    cond: Any


def _batched(v):
    """The value for the [uncond; cond] call."""
    if isinstance(v, Split):
        if isinstance(v.uncond, torch.Tensor):
            return torch.cat([v.uncond, v.cond])
        if isinstance(v.uncond, (list, tuple)):
            return type(v.uncond)(_batched(Split(u, c)) for u, c in zip(v.uncond, v.cond, strict=True))
        raise TypeError(f"Split halves must be tensors or lists of tensors, got {type(v.uncond).__name__}")
    if isinstance(v, torch.Tensor):
        return torch.cat([v, v]) if v.ndim > 0 else v
    if isinstance(v, (list, tuple)):
        return type(v)(_batched(e) for e in v)
    return v


def _cond_only(v):
    """The value for a conditional-only call (scale 1)."""
    if isinstance(v, Split):
        return v.cond
    if isinstance(v, (list, tuple)):
        return type(v)(_cond_only(e) for e in v)
    return v


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_u + s·(ε_c - ε_u), written as diffusers does (same rounding)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps(model_fn: Callable[..., torch.Tensor], x: torch.Tensor, t, scale: float, /, **kwargs) -> torch.Tensor:
    """Guided ε for x (B, ...) at t: one model call on 2B samples, [uncond; cond].

    The first four parameters are positional-only, so ``kwargs`` may use any name (a
    ControlNet adapter's own ``scale``, for instance).
    """
    if scale == 1.0:
        return model_fn(x, t, **{k: _cond_only(v) for k, v in kwargs.items()})
    t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
    eps = model_fn(torch.cat([x, x]), t2, **{k: _batched(v) for k, v in kwargs.items()})
    eps_u, eps_c = eps.chunk(2)
    return cfg_combine(eps_u, eps_c, scale)


def cfg(model_fn: Callable[..., torch.Tensor], scale: float, /, **kwargs) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Bind guidance and conditioning: returns eps_fn(x, t) for the samplers."""

    def eps_fn(x: torch.Tensor, t) -> torch.Tensor:
        return guided_eps(model_fn, x, t, scale, **kwargs)

    return eps_fn
