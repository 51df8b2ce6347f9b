"""Encoder-decoder segmentors, their presets, and self-describing weight files.

A ``Segmentor`` is ``backbone`` + ``decode_head`` (mmseg's attribute names, so parameter names
read ``backbone.block1.0.attn.q.weight`` and ``decode_head.fuse_layer...``); ``forward(x)``
returns logits at the input size (bilinear, align_corners=False), ``forward(x, label)`` (or
``forward_train``) the training losses. The whole model is described by a ``SegmentorConfig``,
stored in every file we write, so loading never depends on a file name. A config with ``hrda``
set describes an HRDA multi-resolution segmentor (``segmentation.models.hrda``, a subclass), one
with ``diff`` a DIFF segmentor on a frozen diffusion U-Net (``segmentation.models.diff``);
``build_segmentor`` / ``load_segmentor`` (``segmentation.models.build``) pick the class a config needs.
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

from ldm.weights import CheckpointError, read_state_dict, read_torch, save_tensors, sniff

from .heads import DAFormerHead, SegFormerHead
from .mit import MIT_CONFIGS, MixVisionTransformer, load_pretrained
from .resnet import RESNET_DEPTHS, DeepLabV3PlusHead, ResNet

HEADS = ("daformer", "segformer", "deeplabv3plus")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class HRDAConfig:
    """HRDA (Hoyer et al. 2022) multi-resolution settings; names and defaults as in the official
    ``HRDAEncoderDecoder`` / ``HRDAHead`` configs of DGInStyle exp 61 (``hrda1-512-0.1``)."""
    scales: tuple[float, float] = (1.0, 0.5)  # detail (hr) and context (lr) scales, any order
    hr_crop_size: tuple[int, int] | None = (512, 512)  # training detail crop (h, w); None: whole image
    hr_loss_weight: float = 0.1  # detail CE weight; the fused CE gets 1 - hr - lr weights
    lr_loss_weight: float = 0.0  # context CE weight (on the attention-weighted context logits)
    attention_classwise: bool = True  # one attention map per class (else one for all)
    attention_embed_dim: int = 256  # width of the scale-attention head
    fixed_attention: float | None = None  # a constant attention instead of the learned head
    feature_scale: float = 0.5  # the scale whose backbone features feed feature-distance losses
    crop_coord_divisible: int = 8  # detail crop offsets are multiples of this (in hr pixels)
    hr_slide_inference: bool = True  # detail pass by sliding hr_crop_size windows at test time
    hr_slide_overlapping: bool = True  # their stride is half the window (else the window)
    test_crop: int = 1024  # outer sliding window of the evaluation (mmseg test_cfg crop_size)
    test_stride: int = 512  # and its stride

    def __post_init__(self):
        scales = tuple(float(x) for x in self.scales)
        if len(scales) != 2 or min(scales) <= 0:
            raise ValueError(f"HRDA takes two positive scales (detail, context), got {self.scales}")
        object.__setattr__(self, "scales", scales)
        if self.hr_crop_size is not None:
            crop = (self.hr_crop_size, self.hr_crop_size) if isinstance(self.hr_crop_size, int) else self.hr_crop_size
            object.__setattr__(self, "hr_crop_size", tuple(int(c) for c in crop))
            if len(self.hr_crop_size) != 2 or min(self.hr_crop_size) <= 0:
                raise ValueError(f"hr_crop_size must be (h, w) > 0, got {self.hr_crop_size}")
        if float(self.feature_scale) not in scales:
            raise ValueError(f"feature_scale {self.feature_scale} is not one of the scales {scales}")
        if self.crop_coord_divisible < 1:
            raise ValueError("crop_coord_divisible must be >= 1")
        if self.hr_loss_weight + self.lr_loss_weight > 1:
            raise ValueError("hr_loss_weight + lr_loss_weight must not exceed 1")
        if self.hr_slide_inference and self.hr_crop_size is None:
            raise ValueError("hr_slide_inference needs an hr_crop_size (the window)")

    @classmethod
    def from_dict(cls, d: Mapping) -> "HRDAConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown HRDAConfig fields {sorted(unknown)}")
        return cls(**d)


# DIFF's DDIM inversion grid (0, 1, ..., 23, then sparser up to 160) and the timesteps whose U-Net
# features it reads, in the order their channels are concatenated (steps 33, 29, 25, 22, 18, 14, 11,
# 7 and 3 of the grid).
DIFF_TIMESTEPS = (*range(24), 26, 30, 34, 40, 45, 52, 60, 69, 80, 91, 105, 121, 139, 160)
DIFF_FEATURE_TIMESTEPS = (91, 52, 30, 22, 18, 14, 11, 7, 3)
DIFF_IPKL_CLASSES = (1, 3, 12, 14, 16)  # sidewalk, wall, rider, truck, train: the classes the original prompts
# The miniature world's grid: the same nine feature timesteps, the inversion stepping from one to the next
# (10 U-Net calls per pass instead of 34; 105, the full grid's point after 91, only closes the grid, as
# the inversion stops at 91). On the world's 16x16 latents this moves the features less than the
# inversion's own noise does: for the shipped prior on source scenes, their distance to the full grid's
# is no larger than that between two runs of the full grid with different noise (tests/test_diff.py).
DIFF_WORLD_TIMESTEPS = (0, *sorted(DIFF_FEATURE_TIMESTEPS), 105)


@dataclass(frozen=True)
class DIFFConfig:
    """DIFF (Ji et al. 2024, arXiv 2406.00777): a frozen diffusion U-Net as the backbone.

    The image's latent is pushed along a DDIM inversion over ``timesteps``; at ``feature_timesteps``
    the U-Net decoder's features of its three finest levels (strides 8, 16, 32) are read, fused per
    stride and upsampled to a stride 4..32 pyramid for the decode head (``segmentation.models.diff``).
    Training adds the conditional pass of implicit posterior knowledge learning (IPKL).

    The frozen weights are referred to, not stored: ``unet`` (``vae`` and ``text_encoder`` default
    to the same path: a file, folder or local Hugging Face model id holding them) and
    ``fingerprint`` (``ldm.weights.fingerprint`` of the three), filled in when the model is first
    built and checked whenever it is built again.

    ``prediction_type`` is the U-Net's ("v_prediction" for SD-2.x 768 models; converted to ε for
    the inversion). It is set here because U-Net weight files do not say it: diffusers keeps it
    in the scheduler's config, CompVis in the inference YAML.
    """
    unet: str = ""
    vae: str = ""  # "": the U-Net's path
    text_encoder: str = ""  # "": the U-Net's path
    fingerprint: str = ""  # "": not known yet (a new model)
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    dtype: str = "auto"  # of the frozen networks: auto = fp16 on CUDA (as the original), fp32 elsewhere
    posterior: str = "sample"  # the VAE latent: a posterior "sample" (the original) or its "mean"
    timesteps: tuple[int, ...] = DIFF_TIMESTEPS  # the inversion grid, increasing
    feature_timesteps: tuple[int, ...] = DIFF_FEATURE_TIMESTEPS  # where features are read (grid points)
    eta: float = 1.0  # fresh noise of the inversion steps from t with eta_window[0] < t < eta_window[1]
    eta_window: tuple[int, int] = (10, 250)
    guidance: float = 5.0  # classifier-free guidance of the class prompts
    prompt: str = ""
    negative_prompt: str = ""
    class_prompt: str = "a high quality photo of a city street, {name}"  # {name}: the class name
    ipkl: bool = True  # train with the conditional pass and the consistency loss (else plain CE)
    ipkl_classes: tuple[int, ...] = DIFF_IPKL_CLASSES  # trainIds with a class prompt
    consistency_weight: float = 1.0  # of the MSE between the two passes' logits
    projection_dims: tuple[int, int, int] = (512, 1024, 2048)  # fused widths at strides 8, 16, 32
    fine_dim: int = 256  # the finecoder's stride-4 width
    aggregation_groups: int = 16  # GroupNorm groups of the per-stride bottleneck blocks
    finecoder_groups: int = 32  # and of the finecoder
    eval_seed: int = 0  # eval-mode forwards draw their noise from a generator seeded with this

    def __post_init__(self):
        for name in ("timesteps", "feature_timesteps", "eta_window", "ipkl_classes", "projection_dims"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        ts = self.timesteps
        if len(ts) < 2 or list(ts) != sorted(set(ts)) or ts[0] < 0 or ts[-1] >= 1000:
            raise ValueError(f"DIFF timesteps must increase strictly within [0, 1000), got {ts}")
        if not self.feature_timesteps or len(set(self.feature_timesteps)) != len(self.feature_timesteps) \
                or not set(self.feature_timesteps) <= set(ts[:-1]):
            raise ValueError(f"feature_timesteps {self.feature_timesteps} must be distinct points of the grid "
                             f"where a step starts ({ts[:-1]})")
        choices = {"prediction_type": ("epsilon", "v_prediction"), "dtype": ("auto", "fp32", "fp16", "bf16"),
                   "posterior": ("sample", "mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DIFF {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.eta_window) != 2 or len(self.projection_dims) != 3:
            raise ValueError("DIFF eta_window takes (low, high), projection_dims one width per stride 8, 16, 32")

    @classmethod
    def from_dict(cls, d: Mapping) -> "DIFFConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DIFFConfig fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class SegmentorConfig:
    backbone: str = "mit_b5"  # mit_b0..mit_b5, mit_tiny, mit_mini, resnet18, resnet34, resnet_tiny, diff
    head: str = "daformer"  # daformer | segformer | deeplabv3plus
    num_classes: int = 19
    embed_dim: int = 256  # per-level embedding width (DAFormer 256, SegFormer 768 / 256 for B0-B1)
    channels: int = 256  # fused width (DAFormer ASPP, DeepLabV3+)
    dilations: tuple[int, ...] = (1, 6, 12, 18)
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    hrda: HRDAConfig | None = None  # set: an HRDA multi-resolution segmentor around this model
    diff: DIFFConfig | None = None  # set (with backbone "diff"): the frozen diffusion backbone

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
        if self.backbone not in MIT_CONFIGS and self.backbone not in RESNET_DEPTHS and self.backbone != "diff":
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of "
                             f"{sorted(MIT_CONFIGS) + sorted(RESNET_DEPTHS) + ['diff']}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        for name, kind in (("hrda", HRDAConfig), ("diff", DIFFConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, kind.from_dict(value))
            elif value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, a dict or None, not {type(value).__name__}")
        if (self.backbone == "diff") != (self.diff is not None):
            raise ValueError("the diff backbone and the diff settings go together: backbone='diff' with diff=DIFFConfig(...)")
        if self.diff is not None and self.hrda is not None:
            raise ValueError("DIFF inside HRDA is not implemented")
        if self.diff is not None and not all(0 <= c < self.num_classes for c in self.diff.ipkl_classes):
            raise ValueError(f"ipkl_classes {self.diff.ipkl_classes} are not classes of a {self.num_classes}-class model")

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
    # exp 61: HRDA (context 0.5, detail crop 512, hr loss 0.1, class-wise attention) + DAFormer
    "hrda_daformer_mitb5": SegmentorConfig("mit_b5", "daformer", hrda=HRDAConfig()),
    # the miniature world's segmenter: MiT + DAFormer head at a width for 64-128 px scenes
    "mini": SegmentorConfig("mit_mini", "daformer", embed_dim=48, channels=48, drop_path_rate=0.0),
    # CPU smoke-test sizes
    "tiny": SegmentorConfig("mit_tiny", "daformer", embed_dim=32, channels=32, drop_path_rate=0.0),
    "tiny_hrda": SegmentorConfig("mit_tiny", "daformer", embed_dim=32, channels=32, drop_path_rate=0.0,
                                 hrda=HRDAConfig(hr_crop_size=(32, 32), attention_embed_dim=32,
                                                 test_crop=64, test_stride=32)),
    "tiny_segformer": SegmentorConfig("mit_tiny", "segformer", embed_dim=32, drop_path_rate=0.0),
    "tiny_deeplab": SegmentorConfig("resnet_tiny", "deeplabv3plus", channels=32, dilations=(2, 4, 6)),
    # DIFF on SD-1.5 (the original uses SD-2.1): the DAFormer head on the fused stride 4..32 pyramid
    "diff_sd15": SegmentorConfig("diff", "daformer", diff=DIFFConfig(unet="stable-diffusion-v1-5/stable-diffusion-v1-5")),
    # DIFF's inversion and IPKL with a quarter of its fusion widths, for small U-Nets (the miniature
    # world's prior): give the weights with --diff-unet
    "diff_mini": SegmentorConfig("diff", "daformer", embed_dim=128, channels=128,
                                 diff=DIFFConfig(projection_dims=(128, 256, 512), fine_dim=64)),
    # the miniature world's DIFF (train/reproduce.py): DIFF's feature timesteps on the short grid above,
    # the fusion at half diff_mini's widths and the head at the width of the world's MiT segmenter ("mini").
    # On one CPU thread with the world's prior a 64 px training sample costs 0.30 s (diff_mini: 0.87 s), a
    # 64x128 evaluation scene 0.15 s (diff_mini: 0.53 s)
    "diff_world": SegmentorConfig("diff", "daformer", embed_dim=48, channels=48,
                                  diff=DIFFConfig(timesteps=DIFF_WORLD_TIMESTEPS, projection_dims=(64, 128, 256),
                                                  fine_dim=32)),
    # CPU smoke tests (any U-Net, e.g. ldm's tiny one): 7 inversion steps, features at 3 of them
    "diff_tiny": SegmentorConfig("diff", "daformer", embed_dim=32, channels=32,
                                 diff=DIFFConfig(timesteps=(0, 3, 7, 11, 18, 30, 52, 91), feature_timesteps=(52, 18, 7),
                                                 projection_dims=(32, 32, 64), fine_dim=16, aggregation_groups=4,
                                                 finecoder_groups=8)),
}


def tiny_preset(name: str) -> str:
    """The CPU smoke-test preset of the same kind as preset ``name`` (plain, HRDA or DIFF)."""
    cfg = PRESETS[name]
    return "tiny_hrda" if cfg.hrda is not None else "diff_tiny" if cfg.diff is not None else "tiny"


def build_backbone(cfg: SegmentorConfig) -> nn.Module:
    if cfg.backbone in MIT_CONFIGS:
        return MixVisionTransformer(replace(MIT_CONFIGS[cfg.backbone], drop_path_rate=cfg.drop_path_rate))
    return ResNet(cfg.backbone)


def build_head(cfg: SegmentorConfig, in_channels, *, num_classes: int | None = None,
               width: int | None = None, attention: bool = False) -> nn.Module:
    """The decode head of ``cfg``. ``width`` replaces its embedding / fused width and
    ``attention`` builds it the way HRDA builds its scale-attention head (DAFormer: a 1x1
    ConvModule fusion instead of the ASPP)."""
    n = cfg.num_classes if num_classes is None else num_classes
    if cfg.head == "daformer":
        return DAFormerHead(in_channels, n, width or cfg.embed_dim, width or cfg.channels, cfg.dilations,
                            cfg.dropout, fusion="conv" if attention else "aspp")
    if cfg.head == "segformer":
        return SegFormerHead(in_channels, n, width or cfg.embed_dim, cfg.dropout)
    return DeepLabV3PlusHead(in_channels, n, width or cfg.channels, cfg.dilations, dropout=cfg.dropout)


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """mmseg's segmentation loss: per-pixel cross-entropy in fp32, times ``weight`` (B, H, W) if
    given, averaged over all pixels (DAFormer / HRDA count ignored pixels as 0 in the mean)."""
    loss = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


class Segmentor(nn.Module):
    default_window = (512, 256)  # evaluation sliding window (crop, stride) of the 512 configs

    def __init__(self, cfg: SegmentorConfig | str = "daformer_mitb5"):
        super().__init__()
        cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
        if cfg.hrda is not None or cfg.diff is not None:
            raise ValueError("an HRDA or DIFF config: build it with build_segmentor(cfg)")
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.decode_head = build_head(cfg, self.backbone.out_channels)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, **kwargs):
        """(B, 3, H, W) normalised images -> (B, num_classes, H, W) logits; with ``label`` the
        training losses of ``forward_train`` (so a DDP wrapper sees the training forward)."""
        if label is not None:
            return self.forward_train(x, label, **kwargs)
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, x: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      seg_weight: torch.Tensor | None = None) -> dict:
        """Cross-entropy of the logits at the label size: ``{"loss", "loss_seg", "logits",
        "head_logits", "features"}`` (the head's logits before the resize; the backbone features,
        e.g. for a feature-distance loss). ``seg_weight`` (B, H, W) weights each pixel's loss
        (self-training's pseudo-label confidence)."""
        feats = self.backbone(x)
        head_logits = self.decode_head(feats)
        logits = F.interpolate(head_logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        loss = pixel_cross_entropy(logits, label, ignore_index, seg_weight)
        return {"loss": loss, "loss_seg": loss, "logits": logits, "head_logits": head_logits, "features": feats}

    def feature_input(self, x: torch.Tensor) -> torch.Tensor:
        """The image whose backbone features ``forward_train`` returns as ``features``."""
        return x

    def extract_feat(self, x: torch.Tensor, backbone: nn.Module | None = None):
        """Those features for an image batch ``x``, by ``backbone`` (e.g. a frozen copy) or ours."""
        return (self.backbone if backbone is None else backbone)(self.feature_input(x))

    def load_backbone(self, path) -> "Segmentor":
        """Load ImageNet-pretrained backbone weights (official ``mit_b*.pth`` layout), strictly."""
        if not isinstance(self.backbone, MixVisionTransformer):
            raise CheckpointError(f"{path}: pretrained loading is implemented for MiT backbones, not {self.cfg.backbone}")
        load_pretrained(self.backbone, path)
        return self


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
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: segmentor weights are written as .safetensors files")
    model = getattr(model, "module", model)
    return save_tensors(path, model.state_dict(), {CONFIG_KEY: json.dumps(asdict(model.cfg))}, dtype=dtype,
                        overwrite=True)


def read_segmentor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, config dict or None) of a segmentor file we wrote: a safetensors export, or a
    training checkpoint (a torch file with ``model`` and ``model_config``, possibly nested under
    ``extra``/``config``)."""
    if sniff(path) == "torch":  # maybe a training checkpoint with non-tensor fields
        obj = read_torch(path)
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
