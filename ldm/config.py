"""Architecture configs for the SD-1.5 networks.

One frozen dataclass per network, with an ``SD15`` preset, a ``tiny()`` preset
for tests and a ``mini()`` preset: the miniature world's networks, small enough to train
from scratch on a CPU (``preset(kind, name)`` looks them up by name). Derived sizes (head dims, time-embedding width) are properties, so
they are never passed in twice. A checkpoint that carries its own architecture
(a diffusers ``config.json`` or our safetensors metadata) is turned into one of
these by ``ldm.checkpoint``; presets are only for files that carry none.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class _ConfigMixin:
    """to_dict / from_dict helpers shared by the config dataclasses (JSON-safe)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
        # JSON turns tuples into lists; the dataclasses are frozen and hashable, so convert back.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class UNetConfig(_ConfigMixin):
    """The CompVis ``UNetModel`` of SD-1.x, one entry per resolution level."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # CompVis model_channels * channel_mult
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; the middle block uses the last
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    use_linear_projection: bool = False  # SD-2 style proj_in/proj_out as Linear instead of 1x1 conv

    def __post_init__(self):
        n = len(self.channels)
        _check(n >= 1, "UNetConfig.channels must not be empty")
        _check(len(self.attention_levels) == n, f"attention_levels needs {n} entries")
        _check(len(self.num_heads) == n, f"num_heads needs {n} entries")
        for c, h in zip(self.channels, self.num_heads):
            _check(c % h == 0, f"channels {c} not divisible by {h} heads")
            _check(c % self.norm_groups == 0, f"channels {c} not divisible by {self.norm_groups} groups")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(c // h for c, h in zip(self.channels, self.num_heads))  # 40, 80, 160, 160 for SD-1.5

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(channels=(32, 64, 64), attention_levels=(True, True, False), num_heads=(2, 4, 4),
                   context_dim=32, norm_groups=8)

    @classmethod
    def mini(cls) -> "UNetConfig":
        # 16x16 latents (64 px images): attention at 8x8 and 4x4 only, one ResBlock per level.
        return cls(channels=(32, 48, 64), num_res_blocks=1, attention_levels=(False, True, True), num_heads=(2, 4, 4),
                   context_dim=16, norm_groups=8)


@dataclass(frozen=True)
class AutoencoderConfig(_ConfigMixin):
    """The CompVis ``AutoencoderKL`` (first stage) of SD-1.x."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)
    num_res_blocks: int = 2  # encoder; the decoder uses one more per level
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SD-1.x latent scale: z = 0.18215 * posterior sample

    def __post_init__(self):
        for c in self.channels:
            _check(c % self.norm_groups == 0, f"channels {c} not divisible by {self.norm_groups} groups")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @classmethod
    def tiny(cls) -> "AutoencoderConfig":
        # Keeps SD's 8x downsampling so pipelines built on it see the usual latent sizes.
        return cls(channels=(32, 32, 64, 64), num_res_blocks=1, norm_groups=8)

    @classmethod
    def mini(cls) -> "AutoencoderConfig":
        # 4x downsampling: 64 px images <-> 16x16x4 latents. The scale is measured after training.
        return cls(channels=(16, 32, 64), num_res_blocks=1, norm_groups=8)


@dataclass(frozen=True)
class CLIPTextConfig(_ConfigMixin):
    """The CLIP ViT-L/14 text tower used by SD-1.x (HF ``CLIPTextModel`` layout)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); "gelu" for OpenCLIP-trained towers

    def __post_init__(self):
        _check(self.width % self.heads == 0, f"width {self.width} not divisible by {self.heads} heads")
        _check(self.act in ("quick_gelu", "gelu"), f"unsupported activation {self.act!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        # Full vocabulary so the real tokenizer's ids are valid inputs.
        return cls(width=32, layers=2, heads=4, mlp_width=64)

    @classmethod
    def mini(cls) -> "CLIPTextConfig":
        # SD-1.5's tokenizer and vocabulary (its 49408 x width embedding is most of the weights), a narrow
        # two-layer tower.
        return cls(width=16, layers=2, heads=2, mlp_width=64)


SD15_UNET = UNetConfig()
SD15_VAE = AutoencoderConfig()
SD15_CLIP = CLIPTextConfig()

CONFIGS = {"unet": UNetConfig, "vae": AutoencoderConfig, "text_encoder": CLIPTextConfig}
PRESET_NAMES = ("sd15", "tiny", "mini")


def config_from_text(kind: str, value: str):
    """A component config from the command line: a preset name ("mini", ...) or a JSON object."""
    if value.lstrip().startswith("{"):
        if kind not in CONFIGS:
            raise ValueError(f"unknown component {kind!r}; expected one of {', '.join(CONFIGS)}")
        return CONFIGS[kind].from_dict(json.loads(value))
    return preset(kind, value)


def preset(kind: str, name: str):
    """The `name` preset ("sd15", "tiny", "mini") of a component kind ("unet", "vae", "text_encoder")."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown component {kind!r}; expected one of {', '.join(CONFIGS)}")
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown {kind} preset {name!r}; expected one of {', '.join(PRESET_NAMES)}")
    cls = CONFIGS[kind]
    return cls() if name == "sd15" else getattr(cls, name)()
