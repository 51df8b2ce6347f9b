"""Segmentors from a config, a preset name or a weight file: the one place that picks the model class
a config needs (``Segmentor``, ``HRDASegmentor`` when the config has ``hrda`` set, ``DIFFSegmentor``
when it has ``diff``)."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch

from ldm.weights import CheckpointError, load_into

from .diff import DIFFSegmentor
from .hrda import HRDASegmentor
from .segmentor import PRESETS, Segmentor, SegmentorConfig, read_segmentor_file


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
    if cfg.diff is not None:
        return DIFFSegmentor(cfg)
    return HRDASegmentor(cfg) if cfg.hrda is not None else Segmentor(cfg)


def load_segmentor(path: str | os.PathLike, config: SegmentorConfig | str | Mapping | None = None,
                   device: str | torch.device = "cpu") -> Segmentor:
    """Build the segmentor described in the file (or by ``config`` when the file has none) and
    load its weights strictly; errors name the file and the missing / unexpected keys. A DIFF
    file holds the trained parts; building it loads the frozen diffusion weights its config
    refers to and checks their fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    sd, cfg = read_segmentor_file(path)
    if config is not None:
        cfg = config
    if cfg is None:
        raise CheckpointError(f"{path}: the file carries no segmentor config; pass one (a preset name: "
                              f"{', '.join(PRESETS)})")
    return load_into(build_segmentor(cfg), sd, source=path).to(device).eval()
