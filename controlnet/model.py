"""ControlNet (Zhang et al. 2023) for the SD-1.x U-Net, lllyasviel/CompVis names (`control_model.*`).

It is the U-Net's encoder half (shared code, `ldm.unet.EncoderHalf`) plus:
  - `input_hint_block`: a small conv encoder from the conditioning image (20-channel one-hot
    labels for DGInStyle, 3-channel images for the usual hints) down to the latent grid;
  - `zero_convs`: one zero-initialised 1x1 conv per skip tensor, and `middle_block_out`.
`forward` returns the residuals `UNetModel.forward(..., control=...)` adds to its skips and middle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ldm.config import UNetConfig, _ConfigMixin
from ldm.layers import may_overwrite
from ldm.unet import EncoderHalf, TimestepEmbedSequential, UNetModel


@dataclass(frozen=True)
class ControlNetConfig(_ConfigMixin):
    unet: UNetConfig = UNetConfig()
    hint_channels: int = 20  # DGInStyle: 19 train classes + void; 3 for image hints
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        if self.hint_channels < 1 or not self.hint_block_channels:
            raise ValueError("ControlNetConfig needs hint_channels >= 1 and hint_block_channels")

    @property
    def hint_downsample_factor(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "hint_channels": self.hint_channels,
                "hint_block_channels": list(self.hint_block_channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ControlNetConfig: unknown config fields {sorted(unknown)}")
        unet = UNetConfig.from_dict(d.pop("unet", {}))
        if "hint_block_channels" in d:
            d["hint_block_channels"] = tuple(d["hint_block_channels"])
        return cls(unet=unet, **d)

    @classmethod
    def tiny(cls, hint_channels: int = 20) -> "ControlNetConfig":
        return cls(unet=UNetConfig.tiny(), hint_channels=hint_channels, hint_block_channels=(8, 8, 16, 16))


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def guess_mode_scales(n: int) -> torch.Tensor:
    """Per-residual scales of guess mode: 10**linspace(-1, 0, n), deepest (middle) residual at 1.0.

    This is diffusers' rule; lllyasviel's apps use 0.825**(12-i), nearly the same curve for n=13.
    """
    return torch.logspace(-1, 0, n)


class ControlNet(EncoderHalf):
    def __init__(self, cfg: ControlNetConfig = ControlNetConfig()):
        super().__init__(cfg.unet)
        self.control_cfg = cfg
        hc = cfg.hint_block_channels
        layers = [nn.Conv2d(cfg.hint_channels, hc[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(hc[:-1], hc[1:]):  # each stage: same-size conv, then a stride-2 conv
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(hc[-1], cfg.unet.channels[0], 3, padding=1)))
        self.input_hint_block = nn.Sequential(*layers)  # convs at 0, 2, 4, ..., 14 for SD-1.5
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(zero_module(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        mid = cfg.unet.channels[-1]
        self.middle_block_out = TimestepEmbedSequential(zero_module(nn.Conv2d(mid, mid, 1)))

    @classmethod
    def from_unet(cls, unet: UNetModel, hint_channels: int = 20,
                  hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)) -> "ControlNet":
        """A ControlNet whose encoder half is a copy of `unet`'s; hint encoder default-initialised, zero convs zero."""
        cfg = ControlNetConfig(unet=unet.cfg, hint_channels=hint_channels, hint_block_channels=hint_block_channels)
        param = next(unet.parameters())
        net = cls(cfg).to(device=param.device, dtype=param.dtype)
        for name in ("time_embed", "input_blocks", "middle_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(self, x, hint, t, context, scale: float | list[float] = 1.0, guess_mode: bool = False):
        """Latents x (B,4,h,w), hint (B,C,f*h,f*w) -> list of residuals (one per skip, then the middle one).

        `scale` multiplies every residual (a list gives one scale per residual); guess mode
        additionally ramps the scales from 0.1 (shallowest) to 1 (middle).
        """
        self.check_input(x)
        cfg, f = self.control_cfg, self.control_cfg.hint_downsample_factor
        if hint.ndim != 4 or hint.shape[1] != cfg.hint_channels:
            raise ValueError(f"expected a hint (B, {cfg.hint_channels}, H, W), got {tuple(hint.shape)}")
        if hint.shape[-2:] != (x.shape[-2] * f, x.shape[-1] * f):
            raise ValueError(f"hint size {tuple(hint.shape[-2:])} must be {f}x the latent size {tuple(x.shape[-2:])}")
        emb = self.time_embedding(t, x)
        guided_hint = self.input_hint_block(hint.to(x.dtype))
        skips, h = self.encode(x, emb, context, hint=guided_hint)
        outs = [zc(s, emb, context) for zc, s in zip(self.zero_convs, skips)]
        outs.append(self.middle_block_out(h, emb, context))
        n = len(outs)
        scales = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(scales) != n:
            raise ValueError(f"scale must be a float or {n} floats, got {len(scales)}")
        if guess_mode:
            scales = [s * g for s, g in zip(scales, guess_mode_scales(n).tolist())]
        return [o.mul_(s) if may_overwrite(o) else o * s for o, s in zip(outs, scales)]  # outs are fresh
