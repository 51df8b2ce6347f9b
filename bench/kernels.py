"""Kernel benchmarks (``python -m ldm.kernels.bench``) plus the ControlNet + U-Net step.

    python bench/kernels.py                         # everything ldm.kernels.bench does, and ControlNet
    python bench/kernels.py --write BENCHMARKS.md

``ldm`` may not import ``controlnet`` (the layering tests/test_layering.py enforces), so the ControlNet step is defined here and
handed to ``ldm.kernels.bench.main``; the other options are that module's.
"""
from __future__ import annotations

import sys

import torch

from controlnet.model import ControlNet, ControlNetConfig
from ldm.kernels import bench

GFLOP_PER_SAMPLE = 803 + 283  # one U-Net and one ControlNet forward at 64x64 latents, batch 1


def controlnet_unet_step(device, dtype, batch=2, latent=64):
    """One DGInStyle-style controlled step: ControlNet (20-channel one-hot hint at 8x the latent size), then the U-Net."""
    unet = bench.sd15_unet(device, dtype)
    cn = ControlNet(ControlNetConfig()).to(device, dtype).eval()
    x, t, ctx = bench.step_inputs(device, dtype, batch, latent)
    f = cn.control_cfg.hint_downsample_factor
    hint = torch.randn(batch, 20, latent * f, latent * f, device=device, dtype=dtype)

    def step():
        return unet(x, t, ctx, control=cn(x, hint, t, ctx))

    return step, GFLOP_PER_SAMPLE * 1e9 * batch * (latent / 64) ** 2


if __name__ == "__main__":
    sys.exit(bench.main(sys.argv[1:], steps=[("ControlNet + U-Net", controlnet_unet_step)],
                        prog="python bench/kernels.py"))
