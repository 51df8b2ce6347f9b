"""SD-1.5 networks (U-Net, VAE, CLIP text encoder), tokenizer and checkpoint I/O, in plain PyTorch."""
from ldm.config import AutoencoderConfig, CLIPTextConfig, UNetConfig
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from ldm.clip import CLIPTextModel

__all__ = ["AutoencoderConfig", "CLIPTextConfig", "UNetConfig", "UNetModel", "AutoencoderKL", "CLIPTextModel"]
