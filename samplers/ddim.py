"""DDIM (Song et al. 2020, eq. 12 and 16) as pure functions, plus DDPM forward noising.

``ddim_step`` is stateless: it takes ᾱ_t and ᾱ_prev. ``ddim_sample`` is the plain loop over any
``eps_fn(x, t) -> eps`` (MRLF's tiled canvas is one such eps_fn); conditioning (text, ControlNet
hint, CFG) is bound by the caller, see ``samplers.guidance``.

Numerics follow diffusers ``DDIMScheduler.step`` operation by operation (0-d float32
coefficients), so a float32 run matches it to the last bit on the same device.

Noise convention: every random tensor is drawn by ``randn`` on the generator's device
(a private CPU ``torch.Generator`` in this project) and then moved to the target device,
so a seed gives the same numbers on CPU and CUDA.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .schedule import SD15, Levels, Schedule

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class DDIMOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t'}
    pred_x0: torch.Tensor  # x0 predicted from (x_t, eps), after optional clipping


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def randn(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Parity trap: drawing on CPU and moving (not drawing on CUDA) is what makes a seed give the
    same latents on every device; it is also what diffusers' ``randn_tensor`` does for a CPU
    generator. The draw happens in ``dtype`` (as diffusers), so fp16 noise is not fp32 noise
    rounded.

    ``generator`` may be a list with one generator per batch element: element i is drawn from
    generator i with shape (1, *shape[1:]), so a sample's noise does not depend on its batch.
    ``None`` uses torch's global CPU generator.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


# --------------------------------------------------------------------------------------
# Pure step functions
# --------------------------------------------------------------------------------------


def _coef(a, x: torch.Tensor) -> torch.Tensor:
    """ᾱ as a tensor on x's device: 0-d for a scalar (as diffusers), (B, 1, ..., 1) per sample."""
    if isinstance(a, torch.Tensor):
        a = a.to(device=x.device)
        if not a.is_floating_point():
            raise TypeError("alpha must be a float, got an integer tensor (a timestep?)")
        a = a.double() if x.dtype == torch.float64 else a.float()
    else:
        a = torch.tensor(float(a), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if a.ndim == 1 and x.ndim > 1:
        a = a.reshape(-1, *([1] * (x.ndim - 1)))
    return a


def predict_x0(x: torch.Tensor, eps: torch.Tensor, a_t) -> torch.Tensor:
    """x0 = (x - √(1-ᾱ_t)·ε) / √ᾱ_t."""
    a_t = _coef(a_t, x)
    return ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).to(x.dtype)


def eps_from_v(x: torch.Tensor, v: torch.Tensor, a_t) -> torch.Tensor:
    """ε of a v-prediction model (Salimans & Ho 2022; SD-2.x 768 models): v = √ᾱ_t·ε - √(1-ᾱ_t)·x0
    and x = √ᾱ_t·x0 + √(1-ᾱ_t)·ε give ε = √ᾱ_t·v + √(1-ᾱ_t)·x."""
    a_t = _coef(a_t, x)
    return (a_t**0.5 * v + (1 - a_t) ** 0.5 * x).to(v.dtype)


def ddim_sigma(a_t, a_prev, eta: float = 0.0):
    """σ_t(η) = η·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)), the std of the fresh noise (eq. 16)."""
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    return eta * variance**0.5


def ddim_step_with_x0(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t,
    a_prev,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> DDIMOutput:
    """One DDIM update x_t -> x_{t'} for ε-prediction; returns (x_{t'}, predicted x0).

    a_t, a_prev: ᾱ_t and ᾱ_{t'} as floats, 0-d tensors, or per-sample (B,) tensors
    (use ``Schedule.alpha_bar`` / ``step_alphas``, which apply the final-alpha rule).
    eta > 0 needs ``noise`` (unit normal, x's shape), drawn by the caller, e.g. with ``randn``.
    clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (diffusers ``clip_sample``; off for
    SD-1.5). As in diffusers, the direction term keeps the unclipped ε.
    """
    a_t, a_prev = _coef(a_t, x), _coef(a_prev, x)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    std = ddim_sigma(a_t, a_prev, eta)
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor (draw it with samplers.randn)")
        prev = prev + std * noise.to(device=x.device, dtype=x.dtype)
    return DDIMOutput(prev.to(x.dtype), x0.to(x.dtype))


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t,
    a_prev,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """x_{t'} = √ᾱ_{t'}·x0 + √(1-ᾱ_{t'}-σ²)·ε + σ·noise. See ``ddim_step_with_x0``."""
    return ddim_step_with_x0(x, eps, a_t, a_prev, eta, noise, clip_x0).prev_sample


def prev_timestep(t: int, num_inference_steps: int, num_train_timesteps: int = 1000) -> int:
    """t' = t - N // n, negative on the last step. diffusers steps by N // n for every spacing,
    also "trailing" / "linspace" where that is not the gap to the next grid point; so do we."""
    return int(t) - num_train_timesteps // int(num_inference_steps)


def step_alphas(schedule: Schedule, t: int, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t'}) for a DDIM step from t; ᾱ_{t'} = final_alpha_cumprod when t' < 0.

    Parity trap: for SD-1.5 the last step (t=1 with 20 steps) goes to ᾱ_0 = 0.99915, not to 1.
    """
    t_prev = prev_timestep(t, num_inference_steps, schedule.num_train_timesteps)
    return schedule.alpha_bar(t), schedule.alpha_bar(t_prev)


def windowed_eta(t, eta: float, window: tuple[int, int] | None = None) -> float:
    """η at timestep t: ``eta`` inside the open window lo < t < hi, 0 outside it (no window: everywhere).

    DIFF's inversion adds fresh noise (η = 1) only for 10 < t < 250 and is deterministic elsewhere.
    """
    if window is None:
        return eta
    lo, hi = window
    return eta if lo < float(t) < hi else 0.0


def ddim_invert_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t,
    a_next,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step from t to a noisier t' (inversion: ᾱ_{t'} < ᾱ_t), with x0 predicted from (x, ε):

        x_{t'} = √ᾱ_{t'}·x0 + σ·noise + √max(1 - ᾱ_{t'} - σ², 1e-10)·ε,
        σ = η·√((1 - r)·(1 - ᾱ_{t'}) / (1 - ᾱ_t)),  r = min(ᾱ_t, ᾱ_{t'}) / max(ᾱ_t, ᾱ_{t'}).

    r is the ratio of the smaller ᾱ to the larger, so σ is eq. 16's σ in either direction: for a
    denoising pair (ᾱ_{t'} > ᾱ_t) this is ``ddim_step``. Going up, σ² may exceed 1 - ᾱ_{t'} (where
    ᾱ_{t'} < ᾱ_t²), hence the floor, as in the DIFF / shape-guided-diffusion inversion this follows.
    η = 0 is the deterministic DDIM inversion. eta > 0 needs ``noise`` (unit normal, x's shape).
    a_t, a_next: floats, 0-d tensors or per-sample (B,) tensors (``Schedule.alpha_bar``).
    """
    a_t, a_next = _coef(a_t, x), _coef(a_next, x)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    r = torch.minimum(a_t, a_next) / torch.maximum(a_t, a_next)
    std = eta * ((1 - r) * (1 - a_next) / (1 - a_t)) ** 0.5
    out = a_next**0.5 * x0 + (1 - a_next - std**2).clamp_min(1e-10) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor (draw it with samplers.randn)")
        out = out + std * noise.to(device=x.device, dtype=x.dtype)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------
# Forward (training / re-noising)
# --------------------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, schedule: Schedule = SD15) -> torch.Tensor:
    """DDPM forward process q(x_t | x0) = √ᾱ_t·x0 + √(1-ᾱ_t)·noise.

    t: an int, a 0-d tensor, or a per-sample (B,) integer tensor. Like diffusers, ᾱ is cast to
    x0's dtype before the square roots.
    """
    ac = schedule.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    t = torch.as_tensor(t, device=x0.device)
    if t.is_floating_point():
        raise TypeError("add_noise needs integer timesteps")
    a = ac[t].flatten()
    a = a.reshape(-1, *([1] * (x0.ndim - 1))) if t.ndim > 0 else a.reshape(())
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar, scale=1.0) -> torch.Tensor:
    """x0 noised to level ᾱ in a sampler's state space: scale·(√ᾱ·x0 + √(1-ᾱ)·noise).

    alpha_bar, scale: floats or 0-d tensors, e.g. ``Levels.alpha_bar[i]`` and ``Levels.scale[i]``
    to put content into the state a sampler returned after step i. As ``add_noise``, ᾱ is cast
    to x0's dtype first, so with scale 1 and ᾱ = ``alphas_cumprod[t]`` both agree to the last bit.
    """
    a = torch.as_tensor(alpha_bar, device=x0.device, dtype=x0.dtype)
    return torch.as_tensor(scale, device=x0.device, dtype=x0.dtype) * (a**0.5 * x0 + (1 - a) ** 0.5 * noise)


# --------------------------------------------------------------------------------------
# Timestep selection
# --------------------------------------------------------------------------------------


def img2img_timesteps(num_inference_steps: int, strength: float, schedule: Schedule = SD15) -> torch.Tensor:
    """The tail of the n-step grid that img2img runs, as diffusers' ``get_timesteps``.

    init = min(int(n·strength), n); the first n - init timesteps are skipped. strength 1 keeps
    all n (and starts from the noisiest t, so the init image only leaks in through ᾱ_{t_0}).
    The DDIM stride stays N // n (not N // len(tail)): pass the same ``num_inference_steps``
    to ``ddim_sample``.
    """
    n = int(num_inference_steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init = min(int(n * strength), n)
    t_start = max(n - init, 0)
    ts = schedule.timesteps(n)[t_start:]
    if len(ts) == 0:
        raise ValueError(f"strength {strength} with {n} steps leaves no denoising step")
    return ts


def img2img_start(
    x0: torch.Tensor,
    num_inference_steps: int,
    strength: float,
    schedule: Schedule = SD15,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{t_0}, timesteps): the init latent noised to the first kept timestep, and the tail.

    As diffusers' img2img ``prepare_latents``: one draw of x0's shape (CPU generator), then
    ``add_noise`` at timesteps[0] for every sample.
    """
    ts = img2img_timesteps(num_inference_steps, strength, schedule)
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    t0 = ts[:1].repeat(x0.shape[0])
    return add_noise(x0, noise.to(device=x0.device, dtype=x0.dtype), t0, schedule), ts


# --------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------


def ddim_levels(
    num_inference_steps: int = 20,
    schedule: Schedule = SD15,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
) -> Levels:
    """Where ``ddim_sample``'s state sits after each step: ᾱ_{t - N//n} (the final alpha after
    the last step), in the VP latent itself (scale 1). Same grid arguments as ``ddim_sample``."""
    if timesteps is None:
        timesteps = schedule.timesteps(num_inference_steps)
    a = torch.stack([step_alphas(schedule, t, num_inference_steps)[1] for t in torch.as_tensor(timesteps).tolist()])
    return Levels(a, torch.ones_like(a))


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    num_inference_steps: int = 20,
    schedule: Schedule = SD15,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    clip_x0: float | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run DDIM from x (unit-variance noise, or an img2img start) and return the final latent.

    eps_fn(x, t) -> ε, with t a Python int; bind text/ControlNet/CFG with a closure or
    ``functools.partial`` (``samplers.guidance.cfg``).
    timesteps: defaults to ``schedule.timesteps(num_inference_steps)``; pass a tail (img2img)
    to start later. The stride to t' is always N // num_inference_steps.
    eta > 0 draws one ``randn(x.shape)`` per step from ``generator`` (after the model call).
    callback(i, t, x_prev, x0) runs after each step; if it returns a tensor, that replaces
    x_prev (latent inpainting / blending hooks in there; ``ddim_levels`` says which noise
    level x_prev is at).
    """
    if timesteps is None:
        timesteps = schedule.timesteps(num_inference_steps)
    for i, t in enumerate(torch.as_tensor(timesteps).tolist()):
        eps = eps_fn(x, t)
        a_t, a_prev = step_alphas(schedule, t, num_inference_steps)
        noise = randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        x, x0 = ddim_step_with_x0(x, eps, a_t, a_prev, eta, noise, clip_x0)
        if callback is not None:
            out = callback(i, t, x, x0)
            if out is not None:
                x = out
    return x
