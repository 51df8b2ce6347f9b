"""An image classifier on a MiT backbone, with its class names in its weight file.

The miniature world uses it as a measuring instrument: which visual style an image is in (the
prompted one, the source look, ...). ``forward(x)`` takes images in [-1, 1] (B, 3, H, W) of any
size and returns (B, num_classes) logits: the backbone's last feature map, average-pooled, a
LayerNorm and a linear layer. ``save_classifier`` / ``load_classifier`` go through the weight core
(``ldm.weights``: strict loading with one report, atomic safetensors with the config in the metadata).

Measuring with it: ``predict_files`` gives the class probabilities of image files (centre crops, as
validation sees them), ``top1_accuracy`` scores predictions against labels, overall and per class.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from ldm.weights import CheckpointError, load_into, read_state_dict, save_tensors

from .mit import MIT_CONFIGS, MixVisionTransformer

CONFIG_KEY = "classifier.config"


@dataclass(frozen=True)
class ClassifierConfig:
    classes: tuple[str, ...]
    backbone: str = "mit_tiny"
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"a classifier needs two or more distinct class names, got {self.classes}")
        if self.backbone not in MIT_CONFIGS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {sorted(MIT_CONFIGS)}")


class ImageClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = MixVisionTransformer(replace(MIT_CONFIGS[cfg.backbone], drop_path_rate=cfg.drop_path_rate))
        width = self.backbone.out_channels[-1]
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(cfg.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(x)[-1].mean(dim=(2, 3))))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Class probabilities (B, num_classes), in batches, without autograd."""
        return torch.cat([self(x[i:i + batch]).softmax(-1) for i in range(0, len(x), batch)])


def load_centre_crop(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: the image's centre square of side `resolution` (padded by reflection at
    the bottom / right when smaller), the view the classifier is validated on."""
    with Image.open(path) as im:
        a = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    h, w = a.shape[:2]
    ph, pw = max(0, resolution - h), max(0, resolution - w)
    if ph or pw:
        a = np.pad(a, [(0, ph), (0, pw), (0, 0)], mode="reflect" if min(h, w) > 1 else "edge")
        h, w = a.shape[:2]
    y, x = (h - resolution) // 2, (w - resolution) // 2
    crop = a[y:y + resolution, x:x + resolution].copy()  # contiguous and writable
    return (torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


@torch.no_grad()
def predict_files(model: ImageClassifier, files: Sequence[str | os.PathLike], resolution: int,
                  device: str | torch.device = "cpu", batch: int = 64) -> torch.Tensor:
    """Class probabilities (N, num_classes) of image files, on centre crops, in batches (eval mode)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(files), batch):
        x = torch.stack([load_centre_crop(f, resolution) for f in files[i:i + batch]]).to(device)
        out.append(model(x).float().softmax(-1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, len(model.cfg.classes))


def top1_accuracy(pred: torch.Tensor, labels: Sequence[int], classes: Sequence[str]) -> dict:
    """{"accuracy": overall, "per_class": {class: share or None without examples}} of predicted
    class indices `pred` (N,) against `labels`."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    pred = torch.as_tensor(pred, dtype=torch.long)
    correct = torch.bincount(y[pred == y], minlength=len(classes)).float()
    total = torch.bincount(y, minlength=len(classes)).float()
    per = {c: float(correct[k] / total[k]) if total[k] else None for k, c in enumerate(classes)}
    return {"accuracy": float(correct.sum() / total.sum()) if total.sum() else float("nan"), "per_class": per}


def save_classifier(model: ImageClassifier, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: classifier weights are written as .safetensors files")
    return save_tensors(path, model.state_dict(), {CONFIG_KEY: json.dumps(asdict(model.cfg))}, dtype=dtype,
                        overwrite=True)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageClassifier:
    path = Path(path)
    sd, meta = read_state_dict(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path}: not a classifier file (no {CONFIG_KEY!r} in its metadata)")
    try:
        cfg = ClassifierConfig(**json.loads(meta[CONFIG_KEY]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad classifier config ({e})") from e
    return load_into(ImageClassifier(cfg), sd, source=path).to(device).eval()
