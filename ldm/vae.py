"""The SD-1.x first-stage autoencoder (CompVis ``AutoencoderKL``), names equal to the checkpoint keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.attention import attention
from ldm.config import AutoencoderConfig
from ldm.layers import GroupNorm32, Upsample, norm_silu, residual


def _norm(groups: int, ch: int) -> GroupNorm32:
    return GroupNorm32(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(groups, out_ch)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        # conv1's output gets no name, so it is freed as soon as norm2 has read it
        h = self.conv2(self.dropout(norm_silu(self.norm2, self.conv1(norm_silu(self.norm1, x)))))
        return residual(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs in the checkpoints."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(m(y), "b c h w -> b 1 (h w) c") for m in (self.q, self.k, self.v))
        y = rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=h, w=w)
        return residual(x, self.proj_out(y))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), an empty `attn` list as in CompVis, and a resampler."""

    def __init__(self, blocks, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, resample_name, resample)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, chs = cfg.norm_groups, cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = chs[0]
        for i, out_ch in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, out_ch, g))
                ch = out_ch
            last = i == len(chs) - 1
            self.down.append(_Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = _Mid(ch, g)
        self.norm_out = _norm(g, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, chs = cfg.norm_groups, cfg.channels
        ch = chs[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, g)
        levels = []
        for i in reversed(range(len(chs))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, chs[i], g))
                ch = chs[i]
            levels.append(_Level(blocks, Upsample(ch) if i else None, "upsample"))
        self.up = nn.ModuleList(reversed(levels))  # CompVis order: up[0] is the full-resolution level
        self.norm_out = _norm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); logvar clamped to [-30, 20] as in CompVis."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise. The noise is drawn on the generator's device (CPU by convention) and moved,
        so results match across devices; a list gives one generator per sample (batch-independent draws)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {self.mean.shape[0]}")
            noise = torch.cat([self._noise(self.mean.shape[1:], g) for g in generator])
        else:
            noise = self._noise(self.mean.shape, generator, batched=True)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def _noise(self, shape, generator, batched: bool = False) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        shape = tuple(shape) if batched else (1, *shape)
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def _check(self, x: torch.Tensor, channels: int, factor: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"expected {what} (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"{what} size {tuple(x.shape[-2:])} must be a multiple of {factor}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], (B, 3, H, W) with H, W multiples of the downsample factor -> posterior."""
        self._check(x, self.cfg.in_channels, self.cfg.downsample_factor, "images")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in about [-1, 1].

        In fp16 the decoder's activations can exceed the fp16 range on some latents; if the
        result is not finite, the decode is redone with fp32 copies of the weights.
        """
        self._check(z, self.cfg.latent_channels, 1, "latents")
        out = self.decoder(self.post_quant_conv(z))
        if z.dtype == torch.float16 and not torch.isfinite(out).all():
            out = self._decode_fp32(z).to(z.dtype)
        return out

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior) of images x, decoding a posterior sample (or the mean), as CompVis'
        AutoencoderKL.forward; what training calls, so that DDP sees one forward."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mode()), post

    def _decode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        pq = self.post_quant_conv
        z = F.conv2d(z.float(), pq.weight.float(), pq.bias.float())
        params = {k: v.float() for k, v in self.decoder.named_parameters()}
        return torch.func.functional_call(self.decoder, params, (z,))
