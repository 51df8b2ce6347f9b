"""A small bundle of the four SD-1.x parts: tokenizer, text encoder, U-Net and VAE.

It only maps between prompts/images and the tensors the samplers work on; sampling lives in
`samplers/` and `mrlf/`. Loading reads files, component folders, pipeline folders or a local
Hugging Face cache snapshot (offline; see `ldm.checkpoint.resolve_path`).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.clip import CLIPTextModel
from ldm.config import preset as config_preset
from ldm.tokenizer import Tokenizer
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL


class StableDiffusion(nn.Module):
    def __init__(self, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: Tokenizer | None = None, clip_skip: int = 0):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer or Tokenizer(max_length=text_encoder.cfg.max_length)
        self.clip_skip = clip_skip  # 0: last layer (SD-1.x); 1: penultimate ("clip skip 2")

    @classmethod
    def from_checkpoint(cls, path, dtype: torch.dtype = torch.float32, device="cpu", ema: bool = False,
                        variant: str | None = None, **kwargs) -> "StableDiffusion":
        """Every part from one checkpoint: a CompVis single file, a diffusers pipeline folder, our native
        safetensors, or a model id found in the local Hugging Face cache."""
        from ldm import checkpoint

        parts = checkpoint.load_components(checkpoint.resolve_path(path), dtype=dtype, device=device, ema=ema,
                                           components=("unet", "vae", "text_encoder"), variant=variant)
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], **kwargs)

    @classmethod
    def random(cls, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
               device="cpu") -> "StableDiffusion":
        """Randomly initialised parts of a preset ("tiny", "mini", "sd15"; for tests and smoke runs: the
        images are noise)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            parts = (UNetModel(config_preset("unet", preset)), AutoencoderKL(config_preset("vae", preset)),
                     CLIPTextModel(config_preset("text_encoder", preset)))
        return cls(*parts).to(device=device, dtype=dtype).eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        return self.vae.cfg.downsample_factor

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> text context (B, 77, width), as SD: 77 ids padded with EOS, no attention mask."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, skip=self.clip_skip).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (x 0.18215). `sample=False` takes the posterior mean."""
        posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.vae.cfg.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (clamped)."""
        z = latents.to(self.device, self.vae_dtype) / self.vae.cfg.scaling_factor
        return self.vae.decode(z).clamp(-1, 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype
