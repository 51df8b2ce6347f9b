"""The Style Swap knob: U-Net weights interpolated between the prior U^P and the source U^S.

DGInStyle trains its ControlNet on U^S (SD-1.5 fine-tuned on GTA) and samples with U^P (SD-1.5):
alpha = 0 is that swap, alpha = 1 keeps U^S (no swap), values between trade the prior's style
diversity against the source U-Net the ControlNet was trained with. The blend is done in place,
tensor by tensor, from an mmap'd source file: no second full U-Net ever sits on the device.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ldm import checkpoint
from ldm.unet import UNetModel


def source_state_dict(source) -> Mapping[str, torch.Tensor]:
    """U^S tensors under our names, from a path (file, folder, local HF cache id), a state dict or a U-Net."""
    if isinstance(source, UNetModel):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    ck = checkpoint.read_checkpoint(checkpoint.resolve_path(os.fspath(source)), components=["unet"])
    return checkpoint.native_state_dict(ck, "unet")


@torch.no_grad()
def blend_unet_(unet: UNetModel, source, alpha: float) -> UNetModel:
    """In place: w <- w_P + alpha * (w_S - w_P) for every U-Net tensor (computed in fp32)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"style alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return unet
    src = source_state_dict(source)
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "U^S state dict"
    checkpoint.check_state_dict(unet, src, source=name)  # one clear error for a foreign or partial U^S
    for key, w in unet.state_dict().items():
        s = src[key].to(device=w.device, dtype=torch.float32)
        w.copy_(s if alpha == 1.0 else w.float().lerp_(s, alpha))  # alpha 1 is exactly U^S
    return unet
