"""Noise schedules and samplers over one denoiser contract, ``eps_fn(x, t) -> eps``.

Imports nothing from the rest of the project (torch and numpy only); models are adapted to
the contract by closures, e.g. ``samplers.cfg(unet, 7.5, context=Split(uncond, cond))``.
"""
from .ddim import (
    DDIMOutput,
    add_noise,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    ddim_step_with_x0,
    img2img_start,
    img2img_timesteps,
    predict_x0,
    prev_timestep,
    randn,
    step_alphas,
)
from .guidance import Shared, Split, cfg, cfg_combine, guided_eps
from .schedule import SD15, Schedule, ddim_timesteps, linear_betas, scaled_linear_betas
from .solvers import dpm_timesteps, dpmpp_2m_sample, euler_sample, euler_timesteps

__all__ = [
    "SD15",
    "Schedule",
    "ddim_timesteps",
    "scaled_linear_betas",
    "linear_betas",
    "DDIMOutput",
    "add_noise",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddim_step_with_x0",
    "img2img_start",
    "img2img_timesteps",
    "predict_x0",
    "prev_timestep",
    "randn",
    "step_alphas",
    "Split",
    "Shared",
    "cfg",
    "cfg_combine",
    "guided_eps",
    "euler_sample",
    "euler_timesteps",
    "dpmpp_2m_sample",
    "dpm_timesteps",
]
