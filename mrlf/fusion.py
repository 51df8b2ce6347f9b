"""One MultiDiffusion timestep: every view of the latent canvas denoised, batched, then averaged.

All views read the same (previous) canvas; each gets its own guided eps and DDIM update;
the updates are averaged where views overlap (uniform weights = the original's plain average).
Views go through the networks `view_batch` at a time, so 81 views cost about 81/view_batch
batched calls instead of 81 single ones; numerically this equals the one-view loop up to
float rounding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mrlf.tiles import View, accumulate_views, crop_views, fuse
from samplers import ddim_step
from samplers.guidance import Split, guided_eps


def controlled_model(unet, controlnet=None, control_scale: float = 1.0, guess_mode: bool = False) -> Callable:
    """model_fn(x, t, context, hint) -> eps for `samplers.guidance`: ControlNet residuals into the U-Net.

    Guess mode (as diffusers' pipelines): the ControlNet sees only the conditional half of a
    guided batch; the unconditional half gets no residuals.
    """

    def model_fn(x, t, context, hint=None):
        if controlnet is None or hint is None:
            return unet(x, t, context)
        xs, ts, cs, hs = x, t, context, hint
        half = guess_mode and x.shape[0] % 2 == 0 and x.shape[0] > 1
        if half:
            n = x.shape[0] // 2
            xs, cs, hs = x[n:], context[n:], hint[n:]
            ts = t[n:] if torch.is_tensor(t) and t.ndim else t
        control = controlnet(xs, hs, ts, cs, scale=control_scale, guess_mode=guess_mode)
        if half:
            control = [torch.cat([torch.zeros_like(c), c]) for c in control]
        return unet(x, t, context, control=control)

    return model_fn


def fused_step(model_fn, z: torch.Tensor, t: int | torch.Tensor, a_t: float, a_prev: float, views: Sequence[View], *,
               context: Split, guidance: float, hint: torch.Tensor | None = None, hint_factor: int = 8,
               view_batch: int = 8, weights: torch.Tensor | None = None, eta: float = 0.0,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """Advance the canvas z (B, C, H, W) from t to the previous timestep over all views.

    t: the timestep, an int or a 0-d tensor (handed to model_fn unchanged).
    context: Split(uncond, cond), each (B, 77, D); hint: (B, K, f*H, f*W) or None.
    noise: (B, C, H, W) canvas noise for eta > 0 (cropped per view, so overlaps agree).
    """
    B, _, H, W = z.shape
    tiles = []
    for i in range(0, len(views), view_batch):
        chunk = views[i:i + view_batch]
        v = len(chunk)
        x = crop_views(z, chunk).flatten(0, 1)  # (v*B, C, h, w), view-major
        kwargs = {"context": Split(context.uncond.repeat(v, 1, 1), context.cond.repeat(v, 1, 1))}
        if hint is not None:
            kwargs["hint"] = crop_views(hint, [c.scaled(hint_factor) for c in chunk]).flatten(0, 1)
        eps = guided_eps(model_fn, x, t, guidance, **kwargs)
        n = crop_views(noise, chunk).flatten(0, 1) if noise is not None else None
        tiles.append(ddim_step(x, eps, a_t, a_prev, eta=eta, noise=n).unflatten(0, (v, B)))
    value, count = accumulate_views(torch.cat(tiles), views, (H, W), weights)
    return fuse(value, count).to(z.dtype)
