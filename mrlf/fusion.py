"""MultiDiffusion over a latent canvas as a denoiser: every view's guided eps, fused into one.

``tiled_eps`` turns a model into ``eps_fn(z, t)`` for the samplers of ``samplers/``: all views
read the same canvas z, each gets its own guided eps (text guidance, its crop of the ControlNet
hint), and the eps are averaged where views overlap (uniform weights: the original's plain
average; or per-pixel blend weights). Views go through the networks ``view_batch`` at a time, so
81 views cost about 81/view_batch batched calls instead of 81 single ones.

The original averages the views' DDIM updates instead. A step of DDIM (Euler, DPM++ 2M alike)
is affine in eps with coefficients shared by all views, and eta noise cropped from one canvas
noise agrees on overlaps, so the average of the views' updates is one step with the averaged
eps: the same result up to float rounding, and any sampler can run the canvas.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mrlf.tiles import View, crop_views, fuse_views
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


def tiled_eps(model_fn, views: Sequence[View], *, context: Split, guidance: float, hint: torch.Tensor | None = None,
              hint_factor: int = 8, view_batch: int = 8,
              weights: torch.Tensor | None = None) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """eps_fn(z, t) -> the fused guided eps of the canvas z (B, C, H, W), in z's dtype.

    views: windows covering the canvas (`mrlf.tiles.get_views`); one view over the whole canvas
        is plain guided eps, to the last bit.
    context: Split(uncond, cond), each (B, 77, D); hint: (B, K, f*H, f*W) or None, cropped per
        view at hint_factor f.
    weights: per-pixel view weights (`mrlf.tiles.blend_weights`), None for uniform.
    t is handed to model_fn unchanged (an int, a float or a 0-d tensor).
    """

    def eps_fn(z: torch.Tensor, t) -> torch.Tensor:
        B, _, H, W = z.shape
        tiles = []
        for i in range(0, len(views), view_batch):
            chunk = views[i:i + view_batch]
            v = len(chunk)
            x = crop_views(z, chunk).flatten(0, 1)  # (v*B, C, h, w), view-major
            kwargs = {"context": Split(context.uncond.repeat(v, 1, 1), context.cond.repeat(v, 1, 1))}
            if hint is not None:
                kwargs["hint"] = crop_views(hint, [c.scaled(hint_factor) for c in chunk]).flatten(0, 1)
            tiles.append(guided_eps(model_fn, x, t, guidance, **kwargs).unflatten(0, (v, B)))
        return fuse_views(torch.cat(tiles), views, (H, W), weights).to(z.dtype)

    return eps_fn
