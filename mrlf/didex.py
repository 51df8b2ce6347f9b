"""DIDEX's pseudo-target domain: prompts from source label maps, and images generated from them.

    python -m mrlf.didex --source gta:data/gta --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --out data/didex_ptd                          # img2img, DIDEX's settings
    python -m mrlf.didex --source gta:data/gta --generator controlnet --base ... \\
        --controlnet path/to/ControlNet_UNet-S --out data/didex_cn  # labels kept: DGInStyle data too
    torchrun --nproc_per_node=8 -m mrlf.didex ...                  # shards samples over ranks
    python -m mrlf.didex --source folder:some/folder --out /tmp/ptd # tiny random model, a smoke run

DIDEX (Niemeijer et al., WACV 2024) turns every source image into an image of a "pseudo-target
domain" described by a prompt, then adapts a segmentor to that domain by self-training
(train/train_uda.py). Its prompt (the default template, ``rand_location_uni_cls_rand_cond``):

    "A high quality photo; " + location ";" + road type ", " + least-often class ", " + the image's
    classes ", " + condition
    e.g. "A high quality photo; India;City, bus, road, sidewalk, building, sky, car, Night/Darkness"

with a location of 5 (europe, germany, China, USA, India), a road type of 3 (none, Highway, City)
and one of 21 conditions (weather, light, time of day, seasons). The class list names the classes
present in the source label (ascending train id, void excluded). The least-often class comes from
a class-balancing histogram over the sequence of source labels: for each image, +1 for every class
present, then the class with the lowest count (the first on ties) is named and gets +1, so rare
classes are asked for. ``--template`` selects any of the original's variants (`TEMPLATES`), and
``--exclude-classes`` keeps classes out of the balancing (the SYNTHIA script: terrain, truck, train).

Unlike the original (prompts drawn from OS entropy), sample i's prompt comes from its own seed
(`mrlf.generate.sample_seed(--seed, i)`): a ``np.random.Generator`` draws the location, the road
type and then the condition; a CPU ``torch.Generator`` with the same seed draws the diffusion noise.
Any sample regenerates alone, bit-identically (``--only i``), on any rank, after any resume.

Generators (``--generator``):
  - ``img2img`` (DIDEX): the source image, resized by ``--scale`` (0.5: the original halves GTA
    images) and edge-padded to the model's size multiple, re-noised to ``--strength`` 0.9 and
    denoised with DDIM, 25 steps, guidance 9, eta 0. DIDEX ran SD-2's depth-to-image model; our
    substitute is SD-1.5 img2img with those settings.
  - ``txt2img``: the prompt alone, from noise, at the same size.
  - ``controlnet``: our label ControlNet with the source label as the hint (beyond DIDEX): the
    image keeps the label's layout, so the output is labelled and serves as DGInStyle data as well
    (``--strength`` < 1 also starts from the source image, like DIDEX's depth-conditioned img2img).
The result, its padding cropped, is resized back to the source size. Outputs (mrlf.generate's
machinery): images/, manifest.jsonl (id, seed, prompt and its parts, source files, settings,
timing per sample) and, for controlnet, labels/ (the source label) and vis/. Every file is written
atomically and a sample counts as done once its manifest line is written: re-running resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ldm.checkpoint import DTYPES
from ldm import cli
from mrlf.generate import (Output, add_control_arguments, add_guidance_window_arguments, add_style_arguments,
                           check_control_arguments, check_guidance_window, check_style_arguments, device_and_dtype,
                           keep_source_setting, load_models, sample_id, sample_seed)
from mrlf.pipeline import Pipeline, SamplingSettings, from_pil
from segmentation.datasets import SegDataset, pair_class_stats, parse_spec
from segmentation.labels import CLASS_NAMES, IGNORE, NUM_CLASSES, TRAIN_ID_SUFFIX
from segmentation.transforms import resize_label

# The original's vocabulary (its dataset_creation scripts).
BASE_PROMPT = "A high quality photo; "
LOCATIONS = ("europe", "germany", "China", "USA", "India")
ROAD_TYPES = ("", "Highway", "City")
CONDITIONS = ("rain", "Fog/Mist", "Snowy", "Sunny", "Overcast", "Stormy", "overexposure", "underexposure", "evening",
              "morning", "Night/Darkness", "Backlighting", "Artificial Lighting", "Harsh Light", "Dappled Light",
              "Sun Flare", "Hazy/Haze", "Spring", "Autumn", "Winter", "Summer")
GENERATORS = ("img2img", "txt2img", "controlnet")
# DIDEX's sampling: DDIM, 25 steps, guidance 9, eta 0, img2img strength 0.9
DIDEX_SAMPLING = SamplingSettings(steps=25, guidance_scale=9.0, eta=0.0, strength=0.9)


@dataclass(frozen=True)
class Template:
    """How one of the original's scripts words its prompt.

    locations: how many of `LOCATIONS` it draws from: 2 (europe, germany) or all 5.
    joined: "location;" + road type, as the newer scripts write it ("europe;" with no road type);
        otherwise the older scripts' list ("europe", "europe;Highway", "europe;City").
    least: name the least-often class of the balancing histogram before the class list.
    condition: "" (none), "before" or "after" the class list.
    train_name: the name of class 16 (two scripts say "tram/ train/ trolley")."""

    locations: int
    joined: bool
    least: bool
    condition: str
    train_name: str = "train"


# Named after the original's scripts (GTA5_to_PTD_<name>.py); the first is DIDEX's final recipe.
TEMPLATES = {
    "rand_location_uni_cls_rand_cond": Template(5, joined=True, least=True, condition="after"),
    "uni_cls_rand_cond": Template(2, joined=True, least=True, condition="after"),
    "rand_location_uni_cls": Template(5, joined=True, least=True, condition=""),
    "rand_location": Template(5, joined=True, least=False, condition=""),
    "rand_cond": Template(2, joined=False, least=False, condition="before"),
    "uni_cls": Template(2, joined=False, least=True, condition="", train_name="tram/ train/ trolley"),
}
DEFAULT_TEMPLATE = "rand_location_uni_cls_rand_cond"


@dataclass(frozen=True)
class PromptConfig:
    """The prompt engine's settings: a template of `TEMPLATES` and the vocabularies it draws from
    (``locations`` None: the template's, the first 2 or all 5 of `LOCATIONS`)."""

    template: str = DEFAULT_TEMPLATE
    base: str = BASE_PROMPT
    locations: tuple[str, ...] | None = None
    road_types: tuple[str, ...] = ROAD_TYPES
    conditions: tuple[str, ...] = CONDITIONS
    negative_prompt: str = ""

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown DIDEX template {self.template!r}; known: {', '.join(TEMPLATES)}")
        for name in ("locations", "road_types", "conditions"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
                if not v:
                    raise ValueError(f"{name} is empty")

    @property
    def places(self) -> tuple[str, ...]:
        return self.locations if self.locations is not None else LOCATIONS[:TEMPLATES[self.template].locations]


@dataclass(frozen=True)
class Prompt:
    text: str
    location: str
    road_type: str
    condition: str | None
    least_class: str | None
    classes: str  # the class list as it appears in the prompt


def class_names(classes: Iterable[int], template: Template) -> list[str]:
    return [template.train_name if c == 16 else CLASS_NAMES[c] for c in classes]


def make_prompt(classes: Sequence[int], least: int | None, rng: np.random.Generator,
                config: PromptConfig = PromptConfig()) -> Prompt:
    """The prompt of an image with train ids ``classes`` (present, ascending) and its least-often
    class ``least`` (from `ClassBalancer`; unused by templates that do not name it). Draws from
    ``rng``, in this order: the location, the road type, then (templates with one) the condition,
    each uniformly (``rng.integers``)."""
    t = TEMPLATES[config.template]
    location = config.places[int(rng.integers(len(config.places)))]
    road = config.road_types[int(rng.integers(len(config.road_types)))]
    condition = config.conditions[int(rng.integers(len(config.conditions)))] if t.condition else None
    scene = f"{location};{road}" if t.joined or road else location
    listed = ", ".join(class_names(classes, t))
    least_name = class_names([least], t)[0] if t.least and least is not None else None
    parts = [config.base + scene]
    if least_name is not None:
        parts.append(least_name)
    if t.condition == "before":
        parts.append(condition)
    parts.append(listed)
    if t.condition == "after":
        parts.append(condition)
    return Prompt(", ".join(parts), location, road, condition, least_name, listed)


class ClassBalancer:
    """DIDEX's class-balancing histogram over a sequence of label maps.

    ``update(present)``: +1 for every class present, then the class with the lowest count (the
    first on ties) is the image's least-often class and gets +1; it is returned. ``exclude``d
    classes (absent from the source dataset) are never named."""

    def __init__(self, exclude: Iterable[int] = ()):
        self.hist = np.zeros(NUM_CLASSES)
        exclude = list(exclude)
        if len(set(exclude)) >= NUM_CLASSES:
            raise ValueError("every class is excluded from the balancing")
        self.hist[exclude] = np.inf

    def update(self, present: Sequence[int]) -> int:
        self.hist[list(present)] += 1
        least = int(np.argmin(self.hist))
        self.hist[least] += 1
        return least


def least_classes(presence: Iterable[Sequence[int]], exclude: Iterable[int] = ()) -> list[int]:
    """The least-often class of each image of a sequence (`ClassBalancer`)."""
    balancer = ClassBalancer(exclude)
    return [balancer.update(p) for p in presence]


# --------------------------------------------------------------------------------------------
# Jobs and images
# --------------------------------------------------------------------------------------------
def plan(dataset: SegDataset, n: int | None, seed: int, shuffle: bool, exclude: Iterable[int] = (),
         cache: bool = True) -> list[dict]:
    """The samples: ``{"pair", "classes", "least"}`` for sample i = 0 .. n - 1 (default: one per
    source pair), over the pairs in sorted order (``shuffle``: a permutation drawn from ``seed``),
    cycling when n exceeds them. Classes come from the labels' cached class statistics; the
    balancing histogram runs over the samples in order, so it is the same on every rank and resume."""
    stats, rows = pair_class_stats(dataset, cache, "DIDEX's prompts")
    present = {int(i): [int(c) for c in np.flatnonzero(stats.counts[j])] for j, i in enumerate(rows)}
    order = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    n = len(dataset) if n is None else n
    pairs = [int(order[i % len(order)]) for i in range(n)]
    least = least_classes([present[p] for p in pairs], exclude)
    return [{"pair": p, "classes": present[p], "least": c} for p, c in zip(pairs, least)]


def generation_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int, int, int]:
    """(h, w, padded h, padded w): the source size times ``scale`` (truncated, as the original's
    int(size * 0.5)) and the next multiples of ``multiple``, at least two of them."""
    h, w = max(int(height * scale), 1), max(int(width * scale), 1)
    pad = lambda v: max(-(-v // multiple), 2) * multiple  # noqa: E731
    return h, w, pad(h), pad(w)


def prepare_inputs(image: np.ndarray, label: np.ndarray, scale: float, multiple: int):
    """The init image ((1, 3, H', W') in [-1, 1]; bicubic resize, edge padding) and the hint label
    ((H', W'), nearest resize, void padding) at the padded generation size, and the unpadded (h, w)."""
    h, w, ph, pw = generation_size(*label.shape, scale, multiple)
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    padded = np.pad(small, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    hint = np.full((ph, pw), IGNORE, dtype=np.uint8)
    hint[:h, :w] = resize_label(label, (h, w))
    return from_pil(Image.fromarray(padded)), hint, (h, w)


def back_to_source(image: Image.Image, hw: tuple[int, int], size: tuple[int, int], squeeze: bool) -> Image.Image:
    """The generated image at the source size (W, H): its padding cropped first, or (``squeeze``,
    the original's way) the whole padded image resized, padding included."""
    if not squeeze:
        image = image.crop((0, 0, hw[1], hw[0]))
    return image.resize(size, Image.BICUBIC)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m mrlf.didex", __doc__)
    src = p.add_argument_group("inputs")
    src.add_argument("--source", required=True, metavar="LAYOUT:PATH",
                     help="labelled source images, e.g. gta:data/gta or folder:PATH (segmentation.datasets layouts)")
    src.add_argument("--source-split", default="train", help="split for split-based layouts")
    src.add_argument("-n", "--num-samples", type=cli.positive_int, default=None,
                     help="samples (default: one per source image; more cycle over them)")
    src.add_argument("--shuffle", action="store_true", help="visit the source images in a seeded random order")
    m = p.add_argument_group("models")
    m.add_argument("--base", help="SD-1.5 file, folder or local HF cache id (default: tiny random model)")
    m.add_argument("--controlnet", help="label ControlNet (for --generator controlnet)")
    add_style_arguments(m)
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("generation (defaults: DIDEX's)")
    g.add_argument("--generator", choices=GENERATORS, default="img2img",
                   help="img2img from the source image, txt2img from noise, or the label ControlNet")
    g.add_argument("--scale", type=cli.positive, default=0.5, help="source size factor for generation")
    g.add_argument("--strength", type=cli.real(0, 1, open_min=True), default=None,
                   help="img2img strength (default 0.9 for img2img, 1 = from noise for the others)")
    g.add_argument("--steps", type=cli.positive_int, default=None, help="DDIM steps (default 25; 4 with the tiny model)")
    g.add_argument("--guidance", type=cli.finite, default=DIDEX_SAMPLING.guidance_scale,
                   help="classifier-free guidance scale")
    add_guidance_window_arguments(g)
    g.add_argument("--eta", type=cli.non_negative, default=DIDEX_SAMPLING.eta, help="DDIM eta")
    add_control_arguments(g)
    g.add_argument("--squeeze-padding", action="store_true",
                   help="resize the padded result to the source size, padding included (the original's way)")
    q = p.add_argument_group("prompts")
    q.add_argument("--template", choices=sorted(TEMPLATES), default=DEFAULT_TEMPLATE, help="prompt template")
    q.add_argument("--base-prompt", default=BASE_PROMPT, help="the prompt's opening")
    q.add_argument("--locations", nargs="+", help="default: the template's (europe, germany[, China, USA, India])")
    q.add_argument("--road-types", nargs="+", help="default: '' Highway City")
    q.add_argument("--conditions", nargs="+", help="default: DIDEX's 21 conditions")
    q.add_argument("--exclude-classes", type=cli.integer(0, NUM_CLASSES - 1), nargs="+", default=[], metavar="ID",
                   help="never name these train ids as the least-often class (SYNTHIA: 9 14 16)")
    q.add_argument("--negative-prompt", default="", help="negative prompt of classifier-free guidance")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs/didex_demo", help="output folder (resumable)")
    o.add_argument("--seed", type=cli.integer(0), default=0, help="global seed; sample i uses sample_seed(seed, i)")
    o.add_argument("--only", type=cli.non_negative_int, nargs="+", help="generate only these sample indices")
    o.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.controlnet and not args.base:
        p.error("--controlnet needs --base")
    if args.generator == "controlnet" and args.base and not args.controlnet:
        p.error("--generator controlnet needs --controlnet")
    check_style_arguments(args, p)
    if args.style_source is not None and not args.base:
        p.error("--style-source needs --base (the tiny random model has no U^S to blend)")
    if args.controlnet and args.generator != "controlnet":
        p.error(f"--controlnet is used by --generator controlnet only, not {args.generator}")
    check_control_arguments(args, p)
    check_guidance_window(args, p)
    control = [f"--{k.replace('_', '-')} {getattr(args, k):g}"
               for k in ("control_scale", "control_start", "control_end")
               if getattr(args, k) != getattr(SamplingSettings, k)]
    if control and args.generator != "controlnet":
        p.error(f"{', '.join(control)}: the ControlNet options need --generator controlnet, not {args.generator}")
    args.strength = args.strength if args.strength is not None else (0.9 if args.generator == "img2img" else 1.0)
    if not 0.0 < args.strength <= 1.0 or (args.generator == "txt2img" and args.strength < 1.0):
        p.error("--strength must be in (0, 1]; txt2img starts from noise (1)")
    if args.generator == "img2img" and args.strength == 1.0:
        p.error("img2img with --strength 1 ignores the source image: use --generator txt2img")
    args.steps = args.steps or (4 if args.base is None else DIDEX_SAMPLING.steps)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = device_and_dtype(args.device, args.dtype)
    sampling = SamplingSettings(steps=args.steps, guidance_scale=args.guidance, control_scale=args.control_scale,
                                control_start=args.control_start, control_end=args.control_end,
                                guidance_start=args.guidance_start, guidance_end=args.guidance_end,
                                eta=args.eta, strength=args.strength)
    prompt_cfg = PromptConfig(args.template, args.base_prompt, args.locations, args.road_types or ROAD_TYPES,
                              args.conditions or CONDITIONS, args.negative_prompt)
    layout, path = parse_spec(args.source)
    dataset = SegDataset(path, layout, args.source_split)
    out = Output(Path(args.out))
    jobs = plan(dataset, args.num_samples, args.seed, args.shuffle, args.exclude_classes)
    indices = list(dict.fromkeys(args.only)) if args.only else range(len(jobs))
    bad = [i for i in indices if not 0 <= i < len(jobs)]
    if bad:
        raise SystemExit(f"error: --only {bad}: there are {len(jobs)} samples")

    def sid(i: int) -> str:
        return sample_id(i, {"file": dataset.pairs[jobs[i]["pair"]][1]}, args.seed)

    # the settings every sample of the folder shares (run.json): a resumed run must match them
    settings = {"generator": args.generator, "sampling": asdict(sampling), "scale": args.scale,
                "squeeze_padding": args.squeeze_padding, "prompt": asdict(prompt_cfg),
                "exclude_classes": args.exclude_classes, "shuffle": args.shuffle, "base": args.base,
                "controlnet": args.controlnet, "style_source": args.style_source, "style": args.style,
                "dtype": str(dtype), "seed": args.seed, "num_samples": len(jobs), **keep_source_setting(args)}
    out.run(settings, len(jobs), indices, sid, bool(args.only), rank, world,
            lambda todo, done: _generate(args, out, dataset, jobs, todo, done, sid, settings, sampling, prompt_cfg,
                                         device, dtype, rank, world))
    return 0


def _generate(args, out, dataset, jobs, todo, done, sid, settings, sampling, prompt_cfg, device, dtype, rank, world):
    sd, cn = load_models(args, device, dtype)
    pipe = Pipeline(sd, cn if args.generator == "controlnet" else None)
    multiple = sd.latent_factor * sd.unet.cfg.downsample_factor
    progress = cli.Progress(len(todo), f"rank {rank}" if world > 1 else "", "samples", enabled=not args.no_progress)
    for i in todo:
        job, seed = jobs[i], sample_seed(args.seed, i)
        tic = time.perf_counter()
        prompt = make_prompt(job["classes"], job["least"], np.random.default_rng(seed), prompt_cfg)
        image_path, label_path = dataset.pairs[job["pair"]]
        image, label = dataset.load(job["pair"])
        init, hint, hw = prepare_inputs(image, label, args.scale, multiple)
        result = pipe.generate(prompt.text, hint if args.generator == "controlnet" else None,
                               height=init.shape[-2], width=init.shape[-1], seeds=[seed],
                               negative_prompt=prompt_cfg.negative_prompt, settings=sampling,
                               init_images=init if sampling.strength < 1 else None)[0]
        result = back_to_source(result, hw, (label.shape[1], label.shape[0]), args.squeeze_padding)
        labelled = args.generator == "controlnet"
        record = {"id": sid(i), "index": i, "seed": seed, "global_seed": args.seed, "prompt": prompt.text,
                  "location": prompt.location, "road_type": prompt.road_type, "condition": prompt.condition,
                  "least_class": prompt.least_class, "classes": job["classes"], "template": args.template,
                  "generator": args.generator, "source_image": str(image_path), "source_label": str(label_path),
                  "generation_size": [int(init.shape[-1]), int(init.shape[-2])],
                  "image": f"images/{sid(i)}.png", "settings": {**settings, "device": device.type},
                  "timing_s": {"total_s": time.perf_counter() - tic}}
        if labelled:
            record["label"] = f"labels/{sid(i)}{TRAIN_ID_SUFFIX}"
        # --only a done sample: its files again, no second manifest line
        out.write(sid(i), result, label if labelled else None, None if sid(i) in done else record)
        done.add(sid(i))
        progress.update(1, sid(i))
    progress.close()


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
