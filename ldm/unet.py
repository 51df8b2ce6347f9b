"""The SD-1.x denoising U-Net (CompVis ``UNetModel``), attribute names equal to the checkpoint keys.

`EncoderHalf` (time embedding, input blocks, middle block) is shared with ControlNet,
which is the encoder half plus zero convs; `UNetModel` adds the decoder half.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import SpatialTransformer
from ldm.config import UNetConfig
from ldm.layers import (Downsample, GroupNorm32, NormSiLUSequential, ResBlock, TimestepEmbedSequential, Upsample, add,
                        timestep_embedding)


def _as_timesteps(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t


class EncoderHalf(nn.Module):
    """time_embed + input_blocks + middle_block, the part a ControlNet copies."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        ch0, temb = cfg.channels[0], cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(ch0, temb), nn.SiLU(), nn.Linear(temb, temb))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch0, 3, padding=1))])
        self.skip_channels = [ch0]  # channels of each skip tensor, in push order (12 for SD-1.5)
        ch = ch0
        last = len(cfg.channels) - 1
        for level, (out_ch, attn, heads) in enumerate(zip(cfg.channels, cfg.attention_levels, cfg.num_heads)):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, temb, out_ch, cfg.norm_groups)]
                ch = out_ch
                if attn:
                    layers.append(self._transformer(ch, heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, temb, ch, cfg.norm_groups),
            self._transformer(ch, cfg.num_heads[-1]),
            ResBlock(ch, temb, ch, cfg.norm_groups))

    def _transformer(self, ch: int, heads: int) -> SpatialTransformer:
        c = self.cfg
        return SpatialTransformer(ch, heads, c.transformer_depth, c.context_dim, c.norm_groups,
                                  c.use_linear_projection)

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def time_embedding(self, t, x: torch.Tensor) -> torch.Tensor:
        t = _as_timesteps(t, x.shape[0], x.device)
        t_emb = timestep_embedding(t, self.cfg.channels[0])
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))

    def check_input(self, x: torch.Tensor) -> None:
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected latents (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be a multiple of {f}")

    def encode(self, x, emb, context, hint=None):
        """Run the input and middle blocks; `hint` (ControlNet) is added after the first conv.

        Returns (skips, h): the list of skip tensors and the middle-block output.
        """
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if i == 0 and hint is not None:
                h = add(h, hint, into=h)  # h is block 0's fresh output, not yet a skip
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        return skips, h


class UNetModel(EncoderHalf):
    """eps-prediction U-Net: forward(x, t, context, control=None) -> eps.

    `control` is the list of ControlNet residuals: one per skip (12 for SD-1.5) then the
    middle-block residual, added to the skips and to the middle output.
    """

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__(cfg)
        temb = cfg.time_embed_dim
        skip_channels = list(self.skip_channels)
        ch = cfg.channels[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            out_ch, attn, heads = cfg.channels[level], cfg.attention_levels[level], cfg.num_heads[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), temb, out_ch, cfg.norm_groups)]
                ch = out_ch
                if attn:
                    layers.append(self._transformer(ch, heads))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = NormSiLUSequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context, control=None):
        self.check_input(x)
        n_skips = len(self.skip_channels)
        if control is not None and len(control) != n_skips + 1:
            raise ValueError(f"control must hold {n_skips + 1} residuals, got {len(control)}")
        emb = self.time_embedding(t, x)
        skips, h = self.encode(x, emb, context)
        if control is not None:  # into our own skips, not into the caller's residuals
            skips = [add(s, c.to(s.dtype), into=s) for s, c in zip(skips, control)]
            h = add(h, control[-1].to(h.dtype), into=h)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context)
        return self.out(h)
