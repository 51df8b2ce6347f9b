"""The Style Swap knob: U-Net weights interpolated between the prior U^P and the source U^S.

DGInStyle trains its ControlNet on U^S (SD-1.5 fine-tuned on GTA) and samples with U^P (SD-1.5):
alpha = 0 is that swap, alpha = 1 keeps U^S (no swap), values between trade the prior's style
diversity against the source U-Net the ControlNet was trained with; `keep` leaves chosen parts at U^S
whatever alpha is (a partial swap). The blend is done in place, tensor by tensor, from an mmap'd
source file: no second full U-Net ever sits on the device.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

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


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def unet_parts(unet: UNetModel) -> list[str]:
    """The U-Net's parts as key prefixes: "input_blocks.N", "middle_block", "output_blocks.N", "out", ..."""
    parts = []
    for key in unet.state_dict():
        head = key.split(".")
        part = ".".join(head[:2]) if head[0] in ("input_blocks", "output_blocks") else head[0]
        if part not in parts:
            parts.append(part)
    return parts


@torch.no_grad()
def blend_unet_(unet: UNetModel, source, alpha: float, keep: Sequence[str] = ()) -> UNetModel:
    """In place: w <- w_P + alpha * (w_S - w_P) for every U-Net tensor (computed in fp32).

    keep: key prefixes (our CompVis names: "out", "output_blocks.5", "middle_block.1.proj_in", ...)
    whose tensors take U^S's weights whatever alpha is. Keeping the shallowest decoder level (SD-1.5:
    output_blocks.9-11 and out; the miniature world: output_blocks.4, 5 and out) lets the layer that
    reads the ControlNet's finest residuals read them as it did in training, while the rest is U^P's.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"style alpha must be in [0, 1], got {alpha}")
    keep = tuple(keep)
    if alpha == 0.0 and not keep:
        return unet
    state = unet.state_dict()
    unknown = [p for p in keep if not any(_under(k, (p,)) for k in state)]
    if unknown:
        raise ValueError(f"no U-Net tensor under {', '.join(unknown)}; its parts: {' '.join(unet_parts(unet))}")
    src = source_state_dict(source)
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "U^S state dict"
    checkpoint.check_state_dict(unet, src, source=name)  # one clear error for a foreign or partial U^S
    for key, w in state.items():
        a = 1.0 if _under(key, keep) else alpha
        if a == 0.0:
            continue
        s = src[key].to(device=w.device, dtype=torch.float32)
        w.copy_(s if a == 1.0 else w.float().lerp_(s, a))  # alpha 1 is exactly U^S
    return unet
