"""Prompts from label maps, as DGInStyle words them for its ControlNet and its generation.

- ``class_stack(label)``: the class names present, ascending train id, space-joined; void (255,
  and 19) excluded. This is the ControlNet training caption and the bare generation prompt.
- ``weather_prompt(classes, rng, config)``: with probability ``config.weather_prob`` the template
  "A city street scene with {classes}, in {weather} weather." with a word from
  ``config.weather_words``; otherwise the bare class stack.

Random draws, from the supplied ``np.random.Generator``: always exactly one ``rng.random()``
(compared ``< weather_prob``), then one ``rng.choice(weather_words)`` only when the weather branch
is taken. The original used the unseeded global numpy RNG here (prompts not reproducible); we use the per-sample
Generator, and the faithful per-sample order is: crop placement draws first
(``segmentation.rcs.place_crop``), then these weather draws, from the same Generator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from segmentation.labels import CLASS_NAMES, IGNORE, NUM_CLASSES, VOID_CHANNEL, LabelError, read_png_indices

DEFAULT_WEATHER = ("snowy", "rainy", "sunny", "foggy", "night")
DEFAULT_TEMPLATE = "A city street scene with {classes}, in {weather} weather."


@dataclass(frozen=True)
class PromptConfig:
    """How generation prompts are built. ``template`` is formatted with ``classes`` and
    ``weather``; ``negative_prompt`` is passed through to guidance ("" = the original's
    unconditional branch)."""

    weather_prob: float = 0.5
    weather_words: tuple[str, ...] = DEFAULT_WEATHER
    template: str = DEFAULT_TEMPLATE
    negative_prompt: str = ""

    def __post_init__(self):
        object.__setattr__(self, "weather_words", tuple(self.weather_words))
        if not 0.0 <= self.weather_prob <= 1.0:
            raise ValueError(f"weather_prob must be in [0, 1], got {self.weather_prob}")
        if self.weather_prob > 0 and not self.weather_words:
            raise ValueError("weather_words is empty but weather_prob > 0")


@dataclass(frozen=True)
class Prompt:
    text: str
    weather: Optional[str]
    classes: str
    negative: str = ""


def _label_array(label) -> np.ndarray:
    if isinstance(label, (str, os.PathLike)):
        return read_png_indices(label)
    if isinstance(label, Image.Image):
        return np.array(label)
    if isinstance(label, torch.Tensor):
        return label.detach().cpu().numpy()
    return np.asarray(label)


def present_classes(label) -> list[int]:
    """Train ids present in ``label`` (path, PIL image, ndarray or tensor), ascending; 255 and 19
    (void, as the original's mutated labels hold it) are skipped; other values raise ``LabelError``."""
    a = _label_array(label)
    if not np.issubdtype(a.dtype, np.integer):
        raise LabelError(f"label must have an integer dtype, got {a.dtype}")
    values = np.flatnonzero(np.bincount(a.ravel(), minlength=256)) if a.dtype == np.uint8 else np.unique(a)
    bad = [int(v) for v in values if not (0 <= v <= VOID_CHANNEL or v == IGNORE)]
    if bad:
        raise LabelError(f"label values must be in 0..19 and 255; found {bad}")
    return [int(v) for v in values if v < NUM_CLASSES]


def class_stack(label) -> str:
    """e.g. "road sidewalk building ... traffic light ... bus" (ascending train id)."""
    return " ".join(CLASS_NAMES[c] for c in present_classes(label))


def weather_prompt(classes: str, rng: np.random.Generator,
                   config: PromptConfig | None = None) -> tuple[str, Optional[str]]:
    """(prompt, weather word or None) for a class stack. Draws ``rng.random()`` and, if it is
    below ``weather_prob``, ``rng.choice(weather_words)``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    cfg = config or PromptConfig()
    if rng.random() < cfg.weather_prob:
        w = str(rng.choice(cfg.weather_words))
        return cfg.template.format(classes=classes, weather=w), w
    return classes, None


def make_prompt(label, rng: np.random.Generator, config: PromptConfig | None = None) -> Prompt:
    """The generation prompt of a (crop) label: class stack, then ``weather_prompt``."""
    cfg = config or PromptConfig()
    classes = class_stack(label)
    text, w = weather_prompt(classes, rng, cfg)
    return Prompt(text=text, weather=w, classes=classes, negative=cfg.negative_prompt)
