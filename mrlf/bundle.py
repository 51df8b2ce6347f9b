"""Model bundles: a folder of ordinary checkpoints plus ``bundle.json``, which says what each file is
and with which settings the generation CLI runs them by default.

The miniature world's trained bundle (``train/mini_world.py``) ships inside this package
(``mrlf/world/``) and is what ``python -m mrlf.generate`` uses when no ``--base`` is given:

    bundle.json          {"prior": ..., "source_unet": ..., "controlnet": ..., "labels": ..., "generation": {...}}
    prior.safetensors    the prior pipeline U^P (U-Net, VAE, text encoder; our native pipeline file)
    unet_s.safetensors   the source U-Net U^S (for the Style Swap knob --style)
    controlnet.safetensors, oracle.safetensors, style_classifier.safetensors
    labels/*_labelTrainIds.png   label maps to generate from

Every file loads through the ordinary loaders (``ldm.checkpoint``, ``controlnet.checkpoint``,
``segmentation.models``); nothing here is special-cased. ``generation`` holds defaults for the
options of ``mrlf.generate`` (size, steps, window, stride, threshold, weather words, ...); options given
on the command line win.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "world"
BUNDLE_FILE = "bundle.json"
FILES = ("prior", "source_unet", "controlnet", "oracle", "style_classifier", "labels")
GENERATION_KEYS = ("size", "steps", "window", "stride", "threshold", "weather_words", "weather_prob",
                   "view_batch", "guidance", "guidance_start", "guidance_end", "num_samples", "rcs_min_pixels",
                   "rcs_temperature")
_COUNTS = {"size", "steps", "window", "stride", "view_batch", "num_samples"}  # positive integers
_SIZES = {"threshold", "rcs_min_pixels"}  # non-negative integers; the rest are numbers but weather_words
_FRACTIONS = {"weather_prob", "guidance_start", "guidance_end"}  # in [0, 1]


def _bad_generation_value(key: str, v) -> bool:
    if key == "weather_words":
        return not (isinstance(v, list) and v and all(isinstance(w, str) and w for w in v))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True
    if key in _COUNTS | _SIZES:
        return not isinstance(v, int) or v < (1 if key in _COUNTS else 0)
    return not math.isfinite(v) or (key in _FRACTIONS and not 0 <= v <= 1)


class BundleError(ValueError):
    """A bundle folder whose bundle.json is missing, unreadable or names files that are not there."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    files: dict  # role -> Path (every role of FILES the bundle has)
    generation: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # anything else bundle.json holds (how it was made, numbers)

    def __getitem__(self, role: str) -> Path:
        if role not in self.files:
            raise BundleError(f"{self.root}: the bundle has no {role} (it has {', '.join(self.files)})")
        return self.files[role]


def load_bundle(root: str | os.PathLike = SHIPPED) -> Bundle:
    root = Path(root)
    path = root / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {BUNDLE_FILE})")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: unreadable ({e})") from e
    if not isinstance(d, dict) or not isinstance(d.get("generation", {}), dict):
        raise BundleError(f"{path}: not a bundle description (a JSON object, its generation settings one too)")
    files = {}
    for role in FILES:
        if d.get(role):
            p = root / d[role]
            if not p.exists():
                raise BundleError(f"{path}: {role} is {d[role]!r}, but {p} does not exist")
            files[role] = p
    unknown = set(d.get("generation", {})) - set(GENERATION_KEYS)
    if unknown:
        raise BundleError(f"{path}: unknown generation settings {sorted(unknown)}; known: {', '.join(GENERATION_KEYS)}")
    bad = [f"{k}={v!r}" for k, v in d.get("generation", {}).items() if _bad_generation_value(k, v)]
    if bad:
        raise BundleError(f"{path}: generation settings of the wrong type or range: {', '.join(bad)}")
    info = {k: v for k, v in d.items() if k not in FILES and k != "generation"}
    return Bundle(root, files, dict(d.get("generation", {})), info)


def shipped_bundle() -> Bundle | None:
    """The bundle in this package, or None when it is not there (a checkout before the world was trained)."""
    return load_bundle(SHIPPED) if (SHIPPED / BUNDLE_FILE).is_file() else None
