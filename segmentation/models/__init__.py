"""Segmentation networks written here: MiT backbones, SegFormer / DAFormer / DeepLabV3+ heads."""
from .heads import DAFormerHead, SegFormerHead
from .mit import (MIT_CONFIGS, MiTConfig, MixVisionTransformer, export_pretrained, load_pretrained,
                  read_mit_state_dict)
from .resnet import DeepLabV3PlusHead, ResNet
from .segmentor import (PRESETS, Segmentor, SegmentorConfig, build_segmentor, load_segmentor,
                        save_segmentor, strip_prefixes)

__all__ = [
    "DAFormerHead", "SegFormerHead", "MIT_CONFIGS", "MiTConfig", "MixVisionTransformer", "export_pretrained",
    "load_pretrained", "read_mit_state_dict", "DeepLabV3PlusHead", "ResNet", "PRESETS", "Segmentor",
    "SegmentorConfig", "build_segmentor", "load_segmentor", "save_segmentor", "strip_prefixes",
]
