"""Samplers by name: what pipelines and the command line choose from.

A sampler is one function over the denoiser contract, plus the noise level of its states:

    sample(eps_fn, x, num_inference_steps, schedule, *, callback=None, **options) -> final latent
    levels(num_inference_steps, schedule, **grid_options) -> Levels

x is unit-variance noise. After step i the sample function calls callback(i, t, x, x0) with its
state x and the predicted clean latent; a returned tensor replaces x. ``levels`` says where that
state sits (``Levels``: x = scale·(√ᾱ·x0 + √(1-ᾱ)·noise)), so a callback that writes content into
x, as latent inpainting does, noises it to the right level with ``samplers.ddim.noised``,
whichever sampler runs. ``levels`` takes the grid options of its ``sample`` (DDIM: timesteps;
Euler and DPM++: spacing).

A new sampler is one more entry: ``SAMPLERS["name"] = Sampler(my_sample, my_levels)``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .ddim import ddim_levels, ddim_sample
from .schedule import Levels
from .solvers import dpmpp_2m_levels, dpmpp_2m_sample, euler_levels, euler_sample


class Sampler(NamedTuple):
    """A sample function and the levels of its states (see the module docstring)."""

    sample: Callable[..., torch.Tensor]
    levels: Callable[..., Levels]


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(ddim_sample, ddim_levels),
    "euler": Sampler(euler_sample, euler_levels),
    "dpmpp_2m": Sampler(dpmpp_2m_sample, dpmpp_2m_levels),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
