"""ControlNet for the SD-1.x U-Net (semantic-label and image hints) and its checkpoint formats."""
from controlnet.model import ControlNet, ControlNetConfig, guess_mode_scales

__all__ = ["ControlNet", "ControlNetConfig", "guess_mode_scales"]
