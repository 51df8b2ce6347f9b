"""Noise schedules and samplers over one denoiser contract, ``eps_fn(x, t) -> eps``.

Imports nothing from the rest of the project (torch and numpy only); models are adapted to
the contract by closures, e.g. ``samplers.cfg(unet, 7.5, context=Split(uncond, cond))``.
Every sampler is one function over that contract (``samplers.registry`` lists them by name and
describes the step callback and noise levels they share); timestep grids come from
``samplers.schedule`` alone.
"""
from .ddim import (
    DDIMOutput,
    add_noise,
    ddim_levels,
    ddim_sample,
    ddim_sigma,
    ddim_invert_step,
    ddim_step,
    ddim_step_with_x0,
    eps_from_v,
    img2img_start,
    img2img_timesteps,
    noised,
    predict_x0,
    prev_timestep,
    randn,
    step_alphas,
    windowed_eta,
)
from .guidance import Split, cfg, cfg_combine, guided_eps
from .registry import SAMPLERS, Sampler, get_sampler
from .schedule import SD15, Levels, Schedule, linear_betas, scaled_linear_betas, spaced_timesteps
from .solvers import dpm_timesteps, dpmpp_2m_levels, dpmpp_2m_sample, euler_levels, euler_sample, euler_timesteps

__all__ = [
    "SD15",
    "Schedule",
    "Levels",
    "spaced_timesteps",
    "scaled_linear_betas",
    "linear_betas",
    "DDIMOutput",
    "add_noise",
    "noised",
    "ddim_levels",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddim_step_with_x0",
    "ddim_invert_step",
    "eps_from_v",
    "windowed_eta",
    "img2img_start",
    "img2img_timesteps",
    "predict_x0",
    "prev_timestep",
    "randn",
    "step_alphas",
    "Split",
    "cfg",
    "cfg_combine",
    "guided_eps",
    "euler_levels",
    "euler_sample",
    "euler_timesteps",
    "dpmpp_2m_levels",
    "dpmpp_2m_sample",
    "dpm_timesteps",
    "Sampler",
    "SAMPLERS",
    "get_sampler",
]
