"""The SD-1.x denoising U-Net (CompVis ``UNetModel``), attribute names equal to the checkpoint keys.

Read top to bottom: the residual block, the transformer (cross-attention, GEGLU feed-forward,
SpatialTransformer), then the network. `EncoderHalf` (time embedding, input blocks, middle block)
is shared with ControlNet, which is the encoder half plus zero convs; `UNetModel` adds the decoder
half. With autograd off the sums run in place (`ldm.layers`: `residual`, `add_into`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm import kernels, ops
from ldm.attention import attention
from ldm.config import UNetConfig
from ldm.layers import GroupNorm32, Upsample, add_into, may_overwrite, norm_silu, residual, timestep_embedding


# ---------------------------------------------------------------------------------------------- residual block
class NormSiLUSequential(nn.Sequential):
    """[GroupNorm32, SiLU, *rest], indices as in the checkpoints; the first two run as `norm_silu`."""

    def forward(self, x):
        x = norm_silu(self[0], x)
        for layer in self[2:]:
            x = layer(x)
        return x


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-(dropout)-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = NormSiLUSequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))  # shared emb: not in place
        # Dropout at index 2 keeps the conv at out_layers.3 as in the checkpoints.
        self.out_layers = NormSiLUSequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = add_into(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None])  # + the embedding, per channel
        out = self.out_layers(h)
        return residual(self.skip_connection(x), out)


class Downsample(nn.Module):
    """3x3 conv, stride 2, padding 1 (CompVis name `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


# ---------------------------------------------------------------------------------------------- transformer
class CrossAttention(nn.Module):
    """Multi-head attention with CompVis names (to_q/to_k/to_v/to_out.0); context=None is self-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # index 0 kept for checkpoint keys

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        # asked of x: the kernel gets x @ W^T, which has x's device and dtype and is contiguous
        if ops.fused("geglu") and kernels.geglu_supported(x):
            return kernels.geglu_linear(x, self.proj.weight, self.proj.bias)
        x, gate = self.proj(x).chunk(2, dim=-1)
        g = F.gelu(gate)  # exact (erf) GELU on the gate half
        return g.mul_(x) if may_overwrite(g, x) else x * g  # in place: one half-width buffer fewer


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = residual(x, self.attn1(self.norm1(x)))
        x = residual(x, self.attn2(self.norm2(x), context))
        return residual(x, self.ff(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the h*w tokens -> proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 use_linear: bool = False):
        super().__init__()
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)  # 1e-6 here, 1e-5 in the ResBlocks
        proj = (lambda: nn.Linear(channels, channels)) if use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        if not self.use_linear:
            x = self.proj_out(x)
        return add_into(x, x_in)  # the residual connection: x is fresh, x_in the caller's


# ---------------------------------------------------------------------------------------------- the network
class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to ResBlocks and `context` to SpatialTransformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


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
                h = add_into(h, hint)  # h is block 0's fresh output, not yet a skip
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
            skips = [add_into(s, c.to(s.dtype)) for s, c in zip(skips, control)]
            h = add_into(h, control[-1].to(h.dtype))
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context)
        return self.out(h)
