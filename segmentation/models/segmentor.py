"""Encoder-decoder segmentors, their presets, and self-describing weight files.

A ``Segmentor`` is ``backbone`` + ``decode_head`` (mmseg's attribute names, so parameter names
read ``backbone.block1.0.attn.q.weight`` and ``decode_head.fuse_layer...``); ``forward(x)``
returns logits at the input size (bilinear, align_corners=False). The whole model is described
by a ``SegmentorConfig``, stored in every file we write, so loading never depends on a file name.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import CheckpointError, check_state_dict, read_state_dict

from .heads import DAFormerHead, SegFormerHead
from .mit import MIT_CONFIGS, MixVisionTransformer, load_pretrained
from .resnet import RESNET_DEPTHS, DeepLabV3PlusHead, ResNet

HEADS = ("daformer", "segformer", "deeplabv3plus")


@dataclass(frozen=True)
class SegmentorConfig:
    backbone: str = "mit_b5"  # mit_b0..mit_b5, mit_tiny, resnet18, resnet34, resnet_tiny
    head: str = "daformer"  # daformer | segformer | deeplabv3plus
    num_classes: int = 19
    embed_dim: int = 256  # per-level embedding width (DAFormer 256, SegFormer 768 / 256 for B0-B1)
    channels: int = 256  # fused width (DAFormer ASPP, DeepLabV3+)
    dilations: tuple[int, ...] = (1, 6, 12, 18)
    dropout: float = 0.1
    drop_path_rate: float = 0.1

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
        if self.backbone not in MIT_CONFIGS and self.backbone not in RESNET_DEPTHS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of "
                             f"{sorted(MIT_CONFIGS) + sorted(RESNET_DEPTHS)}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

    @classmethod
    def from_dict(cls, d: Mapping) -> "SegmentorConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SegmentorConfig fields {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, SegmentorConfig] = {
    "daformer_mitb5": SegmentorConfig("mit_b5", "daformer"),  # DGInStyle exp 60
    "segformer_mitb5": SegmentorConfig("mit_b5", "segformer", embed_dim=768),  # exp 62
    "segformer_mitb0": SegmentorConfig("mit_b0", "segformer", embed_dim=256),
    "daformer_mitb0": SegmentorConfig("mit_b0", "daformer"),
    "deeplabv3plus_r18": SegmentorConfig("resnet18", "deeplabv3plus", dilations=(6, 12, 18)),
    # CPU smoke-test sizes
    "tiny": SegmentorConfig("mit_tiny", "daformer", embed_dim=32, channels=32, drop_path_rate=0.0),
    "tiny_segformer": SegmentorConfig("mit_tiny", "segformer", embed_dim=32, drop_path_rate=0.0),
    "tiny_deeplab": SegmentorConfig("resnet_tiny", "deeplabv3plus", channels=32, dilations=(2, 4, 6)),
}


class Segmentor(nn.Module):
    def __init__(self, cfg: SegmentorConfig | str = "daformer_mitb5"):
        super().__init__()
        cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
        self.cfg = cfg
        if cfg.backbone in MIT_CONFIGS:
            self.backbone = MixVisionTransformer(replace(MIT_CONFIGS[cfg.backbone], drop_path_rate=cfg.drop_path_rate))
        else:
            self.backbone = ResNet(cfg.backbone)
        cin = self.backbone.out_channels
        if cfg.head == "daformer":
            self.decode_head = DAFormerHead(cin, cfg.num_classes, cfg.embed_dim, cfg.channels, cfg.dilations, cfg.dropout)
        elif cfg.head == "segformer":
            self.decode_head = SegFormerHead(cin, cfg.num_classes, cfg.embed_dim, cfg.dropout)
        else:
            self.decode_head = DeepLabV3PlusHead(cin, cfg.num_classes, cfg.channels, cfg.dilations, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes, H, W) logits."""
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def load_backbone(self, path) -> "Segmentor":
        """Load ImageNet-pretrained backbone weights (official ``mit_b*.pth`` layout), strictly."""
        if not isinstance(self.backbone, MixVisionTransformer):
            raise CheckpointError(f"{path}: pretrained loading is implemented for MiT backbones, not {self.cfg.backbone}")
        load_pretrained(self.backbone, path)
        return self


def build_segmentor(cfg: SegmentorConfig | str | Mapping, **overrides) -> Segmentor:
    """A segmentor from a preset name, a config or a config dict; ``overrides`` replace fields."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise KeyError(f"unknown segmentor preset {cfg!r}; known: {', '.join(PRESETS)}")
        cfg = PRESETS[cfg]
    elif isinstance(cfg, Mapping):
        cfg = SegmentorConfig.from_dict(cfg)
    if overrides:
        cfg = SegmentorConfig.from_dict({**asdict(cfg), **overrides})
    return Segmentor(cfg)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
CONFIG_KEY = "segmentor_config"


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) present on every key."""
    sd = dict(sd)
    for p in ("module.", "_orig_mod."):
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def save_segmentor(model: Segmentor, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a slim inference file: safetensors with the config JSON in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    model = getattr(model, "module", model)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(sd, str(tmp), metadata={CONFIG_KEY: json.dumps(asdict(model.cfg))})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read_any(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, config dict or None) of a segmentor file we wrote: a safetensors export, or a
    training checkpoint (a torch file with ``model`` and ``model_config``, possibly nested under
    ``extra``/``config``)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] == b"PK\x03\x04":  # a torch.save zip: maybe a training checkpoint with non-tensor fields
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
        if isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):
            cfg = _find_config(obj)
            return strip_prefixes(obj["model"]), cfg
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping):
            return strip_prefixes(obj["state_dict"]), _find_config(obj)
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return strip_prefixes(obj), None
        raise CheckpointError(f"{path}: no model state dict found (keys: {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    sd, meta = read_state_dict(path)
    cfg = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    return strip_prefixes(sd), cfg


def _find_config(obj: Mapping) -> dict | None:
    for holder in (obj, obj.get("extra"), obj.get("config")):
        if isinstance(holder, Mapping):
            for key in ("model_config", CONFIG_KEY):
                if isinstance(holder.get(key), Mapping):
                    return dict(holder[key])
    return None


def load_segmentor(path: str | os.PathLike, config: SegmentorConfig | str | Mapping | None = None,
                   device: str | torch.device = "cpu") -> Segmentor:
    """Build the segmentor described in the file (or by ``config`` when the file has none) and
    load its weights strictly; errors name the file and the missing / unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    sd, cfg = _read_any(path)
    if config is not None:
        cfg = config
    if cfg is None:
        raise CheckpointError(f"{path}: the file carries no segmentor config; pass one (a preset name: "
                              f"{', '.join(PRESETS)})")
    model = build_segmentor(cfg)
    check_state_dict(model, sd, source=path)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()
