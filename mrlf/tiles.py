"""MultiDiffusion view geometry for MRLF, in latent coordinates.

The original (``tools/refine.get_views``) places square windows of 64 latents at
0, stride, 2*stride, ... along each axis, row-major, as tuples ``(w0, h0, w1, h1)``.
When ``size - window`` is not a multiple of the stride the right/bottom strip is
never covered and fuses to 0. We add one edge-aligned window at ``size - window``
in that case, so every latent is covered;
where the stride divides, the view list is identical to the original's.

Our convention: a :class:`View` is ``(h0, h1, w0, w1)`` (half-open, latent units),
row-major over h then w like the original; ``View.original`` gives the original
``(w0, h0, w1, h1)`` tuple.

A window larger than the latent is clamped to the latent size on that axis (one
view spanning the whole axis), so a 256-pixel first pass with the usual 64-latent
window is simply one 32-latent view. Pass ``strict=True`` to get an error instead.

Fusion: :func:`accumulate_views` adds per-view tensors into a canvas with per-pixel
weights; :func:`fuse` divides where the count is positive (elsewhere it keeps the
value, 0, as the original does); :func:`fuse_views` does both (``mrlf.fusion`` fuses the
views' eps with it). Uniform weights reproduce the original's plain average;
:func:`blend_weights` also offers a feathered (tent or Gaussian) window, positive
everywhere, as an option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

LATENT_FACTOR = 8  # SD-1.5 VAE: one latent = 8x8 pixels


@dataclass(frozen=True)
class View:
    """A half-open window ``[h0, h1) x [w0, w1)`` (latent units unless scaled)."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def height(self) -> int:
        return self.h1 - self.h0

    @property
    def width(self) -> int:
        return self.w1 - self.w0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``x[..., v.slices[0], v.slices[1]]`` crops this view from an (..., H, W) tensor."""
        return slice(self.h0, self.h1), slice(self.w0, self.w1)

    @property
    def original(self) -> tuple[int, int, int, int]:
        """The original code's tuple order, ``(w0, h0, w1, h1)``."""
        return (self.w0, self.h0, self.w1, self.h1)

    def scaled(self, factor: int = LATENT_FACTOR) -> "View":
        """The same window in a grid ``factor`` times finer (latent -> pixel with 8)."""
        f = int(factor)
        return View(self.h0 * f, self.h1 * f, self.w0 * f, self.w1 * f)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _starts(size: int, window: int, stride: int) -> list[int]:
    """0, stride, 2*stride, ... <= size - window, plus size - window if it was missed."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)  # edge-aligned extra view (not in the original)
    return starts


def get_views(h: int, w: int, window: int | tuple[int, int] = 64, stride: int | tuple[int, int] = 8,
              strict: bool = False) -> list[View]:
    """Windows covering every latent of an ``h x w`` latent grid, row-major.

    ``window`` and ``stride`` may be ints or ``(along_h, along_w)`` pairs. A window
    larger than the grid is clamped to it (or raises when ``strict``). A stride larger
    than the (clamped) window would leave gaps and raises.
    Examples: 128/64/16 -> 25 views, 128/64/8 -> 81, 64/64/64 -> 1, 100/64/16 -> 4.
    """
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    _check(h > 0 and w > 0, f"latent size must be positive, got {h}x{w}")
    _check(wh > 0 and ww > 0 and sh > 0 and sw > 0, f"window {window} and stride {stride} must be positive")
    if strict:
        _check(wh <= h and ww <= w, f"window {wh}x{ww} is larger than the latent {h}x{w}")
    wh, ww = min(wh, h), min(ww, w)
    _check((sh <= wh or wh == h) and (sw <= ww or ww == w),
           f"stride {stride} larger than the window {wh}x{ww} would leave latents uncovered")
    return [View(h0, h0 + wh, w0, w0 + ww) for h0 in _starts(h, wh, sh) for w0 in _starts(w, ww, sw)]


def blend_weights(height: int, width: int, mode: str = "uniform", *, sigma: float = 0.25,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pixel weights ``(height, width)`` of one view.

    - ``"uniform"``: all ones; fusion is the original's plain average.
    - ``"tent"``: separable linear ramp, 1 at the centre and about ``1/n`` at the
      outermost latent of an axis of length n (sampled at i + 0.5), never 0.
    - ``"gaussian"``: separable Gaussian, ``sigma`` relative to the window size; at the
      default 0.25 the edges of an axis weigh about exp(-2) ~ 0.14.
    Feathered weights reduce seams because a view's border latents, which see the
    least context, count less than the centre of an overlapping view.
    """
    _check(height > 0 and width > 0, f"weight window must be positive, got {height}x{width}")

    def axis(n: int) -> torch.Tensor:
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5  # in (-0.5, 0.5)
        if mode == "tent":
            return 1.0 - 2.0 * x.abs()  # 1/n at both ends
        return torch.exp(-0.5 * (x / sigma) ** 2)

    if mode == "uniform":
        return torch.ones(height, width, dtype=dtype, device=device)
    _check(mode in ("tent", "gaussian"), f"unknown blend mode {mode!r} (uniform, tent, gaussian)")
    _check(mode != "gaussian" or sigma > 0, f"gaussian sigma must be positive, got {sigma}")
    wy, wx = axis(height), axis(width)
    wy, wx = wy / wy.max(), wx / wx.max()  # peak 1 for odd and even lengths alike
    return (wy[:, None] * wx[None, :]).to(dtype=dtype, device=device)


def crop_views(x: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Stack the crops of ``x`` (..., H, W) into (V, ..., vh, vw); all views must be the same size."""
    return torch.stack([x[..., v.h0:v.h1, v.w0:v.w1] for v in views])


def accumulate_views(tiles: torch.Tensor, views: Sequence[View], size: tuple[int, int],
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``weights * tiles`` into a canvas: returns ``(value, count)``.

    tiles: (V, ..., vh, vw), one slice per view (e.g. (V, B, C, vh, vw) for a batch).
    weights: None (all ones), (vh, vw) shared by all views, or (V, vh, vw) per view.
    value: (..., H, W); count: (H, W), the summed weights. Accumulation is in at least
    float32 and in view order (a sliced add per view, no atomics), so the result is
    deterministic on every device and equals the original's sequential loop.
    """
    _check(tiles.shape[0] == len(views), f"{tiles.shape[0]} tiles for {len(views)} views")
    H, W = size
    acc = torch.promote_types(tiles.dtype, torch.float32)
    vh, vw = tiles.shape[-2:]
    if weights is None:
        weights = torch.ones(vh, vw, dtype=acc, device=tiles.device)
    weights = weights.to(device=tiles.device, dtype=acc)
    per_view = weights.dim() == 3
    _check(weights.shape[-2:] == (vh, vw) and (not per_view or weights.shape[0] == len(views)),
           f"weights {tuple(weights.shape)} do not match tiles {tuple(tiles.shape)}")
    value = tiles.new_zeros(tiles.shape[1:-2] + (H, W), dtype=acc)
    count = torch.zeros(H, W, dtype=acc, device=tiles.device)
    for i, v in enumerate(views):
        _check(v.height == vh and v.width == vw and v.h0 >= 0 and v.w0 >= 0 and v.h1 <= H and v.w1 <= W,
               f"view {v} does not fit tiles of {vh}x{vw} on a {H}x{W} canvas")
        wi = weights[i] if per_view else weights
        value[..., v.h0:v.h1, v.w0:v.w1] += tiles[i].to(acc) * wi
        count[v.h0:v.h1, v.w0:v.w1] += wi
    return value, count


def fuse(value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``value / count`` where ``count > 0``, else ``value`` (0): the original's normalisation."""
    return torch.where(count > 0, value / count.clamp_min(torch.finfo(count.dtype).tiny), value)


def fuse_views(tiles: torch.Tensor, views: Sequence[View], size: tuple[int, int],
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted average of per-view tensors on an (H, W) canvas, in ``tiles.dtype``."""
    value, count = accumulate_views(tiles, views, size, weights)
    return fuse(value, count).to(tiles.dtype)


__all__ = ["LATENT_FACTOR", "View", "get_views", "blend_weights", "crop_views", "accumulate_views", "fuse",
           "fuse_views"]
