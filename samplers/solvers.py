"""Euler and DPM-Solver++(2M) over the same ``eps_fn(x, t) -> eps`` contract as DDIM.

Both step along discrete σ grids, σ_t = √((1-ᾱ_t)/ᾱ_t) of the variance-exploding view
x = x0 + σ·n (Karras et al. 2022) interpolated from the training schedule (grids from
``samplers.schedule``). Euler's state is that σ-space latent, DPM-Solver's the VP latent
itself (``euler_levels`` / ``dpmpp_2m_levels`` give each step's level and scale). They follow
diffusers' ``EulerDiscreteScheduler`` (ancestral off, s_churn 0) and
``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint, final σ = 0) operation by
operation, so float32 runs match them.

Like ``ddim_sample``, the loops take unit-variance noise and return the final latent; the
model always sees a VP-scaled input, so the same ``eps_fn`` (with ``samplers.guidance.cfg``)
works for all three samplers.
"""
from __future__ import annotations

import torch

from .ddim import Callback, EpsFn
from .schedule import SD15, Levels, Schedule


def euler_timesteps(
    num_inference_steps: int, schedule: Schedule = SD15, spacing: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps float32 (n,), sigmas float32 (n+1,)) as diffusers ``EulerDiscreteScheduler``:
    DDIM's grid, but float and, for "linspace", not rounded (fractional timesteps)."""
    timesteps = schedule.timesteps(num_inference_steps, spacing, integer=False)
    return timesteps, schedule.sigma_grid(timesteps)


def euler_levels(num_inference_steps: int = 20, schedule: Schedule = SD15, *, spacing: str | None = None) -> Levels:
    """Where ``euler_sample``'s state sits after each step: σ_{i+1}, in σ-space (x0 + σ·noise)."""
    return Levels.from_sigmas(euler_timesteps(num_inference_steps, schedule, spacing)[1][1:], scaled=True)


def euler_init_sigma(sigmas: torch.Tensor, spacing: str) -> torch.Tensor:
    """Std of the starting latent. Parity trap (diffusers): σ_max for "linspace"/"trailing",
    but √(σ_max² + 1) for "leading" (the latter is the exact VP→VE scale)."""
    s = sigmas.max()
    return s if spacing in ("linspace", "trailing") else (s**2 + 1) ** 0.5


@torch.no_grad()
def euler_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    num_inference_steps: int = 20,
    schedule: Schedule = SD15,
    *,
    spacing: str | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler (first-order, deterministic) from unit-variance noise x; returns the final latent.

    eps_fn sees x/√(σ²+1) and a float timestep. callback(i, t, x_next, x0) runs after each step
    (x_next in σ-space, at the level ``euler_levels`` gives); a returned tensor replaces x_next.
    """
    spacing = spacing or schedule.timestep_spacing
    timesteps, sigmas = euler_timesteps(num_inference_steps, schedule, spacing)
    x = x * euler_init_sigma(sigmas, spacing).to(x.device)
    sigmas = sigmas.to(x.device)
    for i, t in enumerate(timesteps.tolist()):
        sigma = sigmas[i]
        eps = eps_fn(x / ((sigma**2 + 1) ** 0.5), t)
        sample = x.float()
        x0 = sample - sigma * eps
        derivative = (sample - x0) / sigma
        x = (sample + derivative * (sigmas[i + 1] - sigma)).to(eps.dtype)
        if callback is not None:
            out = callback(i, t, x, x0)
            if out is not None:
                x = out
    return x


def dpm_timesteps(
    num_inference_steps: int, schedule: Schedule = SD15, spacing: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps int64 (n,), sigmas float32 (n+1,)) as diffusers ``DPMSolverMultistepScheduler``.

    Note the grids differ from DDIM's: "linspace" and "leading" are built on n+1 points with the
    last dropped (20 leading steps with offset 1: 941, 894, ..., 48).
    """
    timesteps = schedule.timesteps(num_inference_steps, spacing, extra_point=True)
    return timesteps, schedule.sigma_grid(timesteps)


def dpmpp_2m_levels(num_inference_steps: int = 20, schedule: Schedule = SD15, *, spacing: str | None = None) -> Levels:
    """Where ``dpmpp_2m_sample``'s state sits after each step: σ_{i+1}, in the VP latent."""
    return Levels.from_sigmas(dpm_timesteps(num_inference_steps, schedule, spacing)[1][1:], scaled=False)


def _alpha_sigma_lambda(sigma: torch.Tensor):
    """VE σ -> (α_t, σ_t, λ_t) of the VP process: α = 1/√(σ²+1), σ_t = σ·α, λ = log α - log σ_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


@torch.no_grad()
def dpmpp_2m_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    num_inference_steps: int = 20,
    schedule: Schedule = SD15,
    *,
    spacing: str | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, midpoint form) from unit-variance noise x.

    First step first-order (no history), and the last step too: with a final σ of 0 diffusers
    always ends with a first-order step, which returns the predicted x0 exactly.
    eps_fn sees x itself (VP space) and an int timestep. callback(i, t, x_next, x0) as in
    ``euler_sample`` (x_next at the level ``dpmpp_2m_levels`` gives).
    """
    timesteps, sigmas = dpm_timesteps(num_inference_steps, schedule, spacing)
    sigmas = sigmas.to(x.device)
    n = len(timesteps)
    x0_prev = None
    for i, t in enumerate(timesteps.tolist()):
        eps = eps_fn(x, t)
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[i])
        x0 = (x - sigma_s0 * eps) / alpha_s0
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
        h = lambda_t - lambda_s0
        sample = x.float()  # diffusers upcasts the sample (not x0) for the update
        if x0_prev is None or i == n - 1:
            x_next = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            lambda_s1 = _alpha_sigma_lambda(sigmas[i - 1])[2]
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - x0_prev)
            x_next = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        x0_prev = x0
        x = x_next.to(eps.dtype)
        if callback is not None:
            out = callback(i, t, x, x0)
            if out is not None:
                x = out
    return x
