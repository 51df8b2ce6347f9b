"""The SD-1.5 noise schedule and the timestep grids of every sampler.

Everything here reproduces diffusers' ``DDIMScheduler`` (0.22 to 0.42) bit for bit in
float32: the betas are built by ``torch.linspace`` in float32 and squared, exactly as
diffusers does, so ``alphas_cumprod`` matches to the last bit. Check values (float32):
ᾱ_0 = 0.99915, ᾱ_1 ≈ 0.998296, ᾱ_50 ≈ 0.951577, ᾱ_951 ≈ 0.008155, ᾱ_999 ≈ 0.004660.

Timesteps lie in [0, num_train_timesteps); ``Schedule.timesteps(n)`` gives them in sampling
order (descending): integers for DDIM and DPM-Solver, float32 (possibly fractional) for Euler.
Every sampler's grid is built here, by ``spaced_timesteps`` and ``Schedule.sigma_grid``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """β_i = linspace(√β_start, √β_end, N)_i², built in float32 like diffusers and CompVis
    (``make_beta_schedule("linear")`` in CompVis is this same "scaled linear" schedule)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    extra_point: bool = False,
    integer: bool = True,
) -> torch.Tensor:
    """Descending timesteps of an n-step grid, as diffusers' schedulers ``set_timesteps``.

    - "leading": k·(N // n) + steps_offset for k = n-1..0. SD-1.5 uses steps_offset 1, so
      20 steps give 951, 901, ..., 51, 1 (not 950..0).
    - "trailing": round(N - k·N/n) - 1 for k = 0..n-1 (starts at N-1 = 999).
    - "linspace": round(linspace(0, N-1, n)) reversed.
    ``steps_offset`` is applied to "leading" only (as in diffusers).

    The schedulers differ in two ways, chosen by the keywords:
    - ``extra_point`` (``DPMSolverMultistepScheduler``): "leading" and "linspace" are built on
      n+1 points and the last one is dropped (20 leading steps with offset 1: 941, 894, ..., 48);
      "trailing" is unchanged.
    - ``integer=False`` (``EulerDiscreteScheduler``): float32 timesteps, and "linspace" is not
      rounded (fractional timesteps). Otherwise int64 (``DDIMScheduler``).
    """
    n, N = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}], got {num_inference_steps}")
    points = n + 1 if extra_point and spacing != "trailing" else n
    if spacing == "leading":
        # Parity trap: the +1 of SD-1.5 (steps_offset=1) shifts the whole grid, 951..1 for 20 steps.
        ts = (np.arange(0, points) * (N // points)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        # np.arange with a float step, exactly as diffusers (the count can differ from n by
        # float rounding for unlucky n; diffusers has the same behaviour).
        ts = np.round(np.arange(N, 0, -N / n)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, N - 1, points)[::-1]
        ts = ts.round() if integer else ts
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if points > n:
        ts = ts[:-1]
    return torch.from_numpy(ts.astype(np.int64 if integer else np.float32))


@dataclass(frozen=True)
class Levels:
    """The noise levels of a sampler's states: after step i its latent is

        x_i = scale[i] · (√alpha_bar[i] · x0 + √(1 - alpha_bar[i]) · noise)

    alpha_bar: (n,) float32 ᾱ of the state after each step (1 once a sampler lands on σ = 0).
    scale: (n,) float32; 1 for samplers that work on the variance-preserving latent (DDIM,
    DPM-Solver), √(σ² + 1) = 1/√ᾱ for Euler, whose state is x0 + σ·noise.
    """

    alpha_bar: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, scaled: bool) -> "Levels":
        """Levels of states at VE σ's; ``scaled`` for a sampler working in σ-space (Euler)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        alpha_bar = 1 / (sigmas**2 + 1)
        return cls(alpha_bar, (sigmas**2 + 1) ** 0.5 if scaled else torch.ones_like(sigmas))


@dataclass(frozen=True)
class Schedule:
    """A discrete DDPM noise schedule plus the DDIM timestep convention.

    Defaults are SD-1.5's (runwayml ``scheduler_config.json`` as DGInStyle loads it into
    ``DDIMScheduler``): scaled-linear 0.00085 to 0.012 over 1000 steps, ``set_alpha_to_one``
    False, ``steps_offset`` 1, "leading" spacing.

    ``betas``, ``alphas_cumprod`` and ``sigmas`` are computed once per instance (float32,
    CPU) and shared: treat them as read-only.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of {SPACINGS}")

    @functools.cached_property
    def betas(self) -> torch.Tensor:
        make = scaled_linear_betas if self.beta_schedule == "scaled_linear" else linear_betas
        return make(self.beta_start, self.beta_end, self.num_train_timesteps)

    @functools.cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = Π_{i≤t} (1 - β_i), float32 (the cumulative product is taken in float32, as diffusers)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @functools.cached_property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """ᾱ used as "previous" alpha by the last DDIM step (when t - N // n < 0).

        Parity trap: SD-1.5 has set_alpha_to_one=False, so this is ᾱ_0 = 0.99915, not 1: the
        final DDIM sample keeps σ = √(1-ᾱ_0) ≈ 0.029 of the predicted noise.
        """
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @functools.cached_property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t), float32: the variance-exploding view used by Euler / DPM-Solver."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    def timesteps(
        self, num_inference_steps: int, spacing: str | None = None, *, extra_point: bool = False, integer: bool = True
    ) -> torch.Tensor:
        """Descending timesteps with this schedule's spacing and offset (``spaced_timesteps``);
        the defaults give DDIM's grid (int64)."""
        return spaced_timesteps(
            num_inference_steps,
            self.num_train_timesteps,
            spacing or self.timestep_spacing,
            self.steps_offset,
            extra_point=extra_point,
            integer=integer,
        )

    def sigma_grid(self, timesteps) -> torch.Tensor:
        """σ at (possibly fractional) timesteps by linear interpolation, then a final σ = 0:
        (n+1,) float32, the grid Euler and DPM-Solver step along (as diffusers)."""
        sigmas = self.sigmas.numpy()
        sigmas = np.interp(torch.as_tensor(timesteps).numpy(), np.arange(0, len(sigmas)), sigmas)
        return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ_t for an int timestep, or final_alpha_cumprod when t < 0 (a 0-d float32 tensor)."""
        t = int(t)
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep {t} out of range [0, {self.num_train_timesteps})")
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod


SD15 = Schedule()
