"""Segmentation networks written here: MiT backbones, SegFormer / DAFormer / DeepLabV3+ heads, HRDA, DIFF."""
from .build import build_segmentor, load_segmentor
from .diff import DIFFBackbone, DIFFSegmentor, DiffusionFeatures
from .heads import DAFormerHead, SegFormerHead
from .hrda import HRDAHead, HRDASegmentor
from .mit import (MIT_CONFIGS, MiTConfig, MixVisionTransformer, export_pretrained, load_pretrained,
                  read_mit_state_dict)
from .resnet import DeepLabV3PlusHead, ResNet
from .segmentor import PRESETS, DIFFConfig, HRDAConfig, Segmentor, SegmentorConfig, save_segmentor, strip_prefixes

__all__ = [
    "DAFormerHead", "SegFormerHead", "DIFFBackbone", "DIFFConfig", "DIFFSegmentor", "DiffusionFeatures", "HRDAHead",
    "HRDASegmentor", "MIT_CONFIGS", "MiTConfig", "MixVisionTransformer", "export_pretrained", "load_pretrained",
    "read_mit_state_dict", "DeepLabV3PlusHead", "ResNet", "PRESETS", "HRDAConfig", "Segmentor", "SegmentorConfig",
    "build_segmentor", "load_segmentor", "save_segmentor", "strip_prefixes",
]
