"""DGInStyle dataset generation: label maps in, a labelled, style-diverse dataset out.

    python -m mrlf.generate                     # embedded demo: shipped synthetic labels, tiny random model
    python -m mrlf.generate --labels data/gta/labels -n 6000 \\
        --base stable-diffusion-v1-5/stable-diffusion-v1-5 --controlnet path/to/ControlNet_UNet-S \\
        --out data/dginstyle_gen --device cuda --dtype fp16
    torchrun --nproc_per_node=8 -m mrlf.generate ...   # shards samples over ranks, no duplicates

Jobs come from a label folder (rare-class sampling picks (class, file) pairs), a gen-file JSON
(the original's format) or single label maps, each --images-per-label times; every input is
checked before anything is written. Sample i gets its own seed derived from (--seed, i): a numpy
Generator for the crop and the weather words, then a CPU torch.Generator for the diffusion noise,
so any sample regenerates alone, bit-identically (`--only i`), on any rank, after any resume (same
device and dtype). Outputs: images/, labels/ (void stays 255), vis/ (image | colour label |
overlay), manifest.jsonl and run.json (the settings of every sample in the folder); every file is
written atomically and a sample counts as done only once its manifest line is written, so a
killed run resumes cleanly. Re-running into the folder with other settings (size, steps, seed,
models, inputs, ...) is refused, naming them: resume with the same ones, choose another --out, or
--overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm import cli
from ldm.atomic import atomic_file, clean_stale, write_text
from ldm.checkpoint import DTYPES
from mrlf.bundle import SHIPPED, BundleError, load_bundle, shipped_bundle
from mrlf.jobs import build_jobs, read_gen_file
from mrlf.pipeline import DATASET, DEMO, MRLFSettings, Pipeline, SamplingSettings
from mrlf.prompts import PromptConfig, make_prompt
from samplers import SAMPLERS
from segmentation.labels import TRAIN_ID_SUFFIX, LabelError, colorize, load_label, save_label
from segmentation.rcs import DEFAULT_MIN_PIXELS, DEFAULT_TEMPERATURE, class_stats, place_crop

EXAMPLES = Path(__file__).resolve().parents[1] / "segmentation" / "examples"
RUN_FILE = "run.json"


def sample_seed(seed: int, index: int) -> int:
    """Per-sample seed from (global seed, index): independent streams, stable across shards and resumes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def sample_id(index: int, job: dict, seed: int) -> str:
    """``000012_s0_<label stem>``: the global seed in the id keeps ids of runs with other seeds apart."""
    stem = Path(job["file"]).name.removesuffix(TRAIN_ID_SUFFIX).removesuffix(".png")
    return f"{index:06d}_s{seed}_{stem}"


def make_jobs(args) -> list[dict]:
    """The (label file, class) job of every sample, each repeated --images-per-label times."""
    if args.jobs:
        jobs = read_gen_file(args.jobs)
    elif args.label_maps:
        jobs = [{"class": None, "class_name": None, "file": str(p)} for p in args.label_maps]
    else:
        folder = Path(args.labels or EXAMPLES)
        cache = args.labels is not None and not args.labels_shipped  # never write a cache into the installed package
        stats = class_stats(folder, pattern=args.pattern, cache=cache)
        jobs = build_jobs(stats, args.num_samples, seed=args.seed, temperature=args.rcs_temperature,
                          min_pixels=args.rcs_min_pixels, crop_size=(args.height, args.width))
    return [job for job in jobs for _ in range(args.images_per_label)]


def check_inputs(jobs: list[dict], height: int, width: int, full: bool) -> None:
    """Every label file before anything is generated: readable, at least the crop's size and, with
    `full` (label maps given one by one; folders and gen files are checked when read), valid."""
    for f in dict.fromkeys(job["file"] for job in jobs):
        if full:
            h, w = load_label(f).shape
        else:
            try:
                with Image.open(f) as im:
                    w, h = im.size
            except OSError as e:
                raise LabelError(f"{f}: cannot read label image ({e})") from e
        if h < height or w < width:
            raise LabelError(f"{f}: label {w}x{h} is smaller than the crop {width}x{height} (WxH)")


def crop_label(label: np.ndarray, job: dict, size: tuple[int, int], rng: np.random.Generator, faithful: bool,
               source: str):
    """The (height, width) crop the sample is generated for, and its box (x1, y1, x2, y2)."""
    H, W = label.shape
    ch, cw = size
    if H < ch or W < cw:
        raise ValueError(f"{source}: label {W}x{H} is smaller than the crop size {cw}x{ch}")
    if job["class"] is None:  # a plain label map: centre crop
        y, x = (H - ch) // 2, (W - cw) // 2
        return label[y:y + ch, x:x + cw], (x, y, x + cw, y + ch)
    crop = place_crop(label, int(job["class"]), rng, crop_size=size, faithful=faithful, source=source)
    x1, y1, x2, y2 = crop.box
    return label[y1:y2, x1:x2], crop.box


def _atomic_png(image: Image.Image, path: Path) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def vis_grid(image: Image.Image, label: np.ndarray) -> Image.Image:
    """image | colour label | 50 % overlay, side by side."""
    colour = Image.fromarray(colorize(label))
    grid = Image.new("RGB", (image.width * 3, image.height), "white")
    for i, im in enumerate((image, colour, Image.blend(image.convert("RGB"), colour, 0.5))):
        grid.paste(im, (i * image.width, 0))
    return grid


class RunMismatch(ValueError):
    """An output folder holds samples of other settings than the run asked for."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Settings that run.json gained later, with the value the samples of a folder written before were made
# with: such a folder resumes when they are at that value.
ADDED_SETTINGS = {"sampling.control_start": 0.0, "sampling.control_end": 1.0, "sampling.guidance_start": 0.0,
                  "sampling.guidance_end": 1.0}


def setting_differences(saved: dict, now: dict) -> list[str]:
    """``"sampling.steps: 4 in the folder, 6 now"`` for every setting that differs."""
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    a = ADDED_SETTINGS | a
    return [f"{k}: {json.dumps(a.get(k))} in the folder, {json.dumps(b.get(k))} now"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


class Output:
    """The output folder: images/, labels/, vis/, manifest.jsonl (appended with one write per line)
    and run.json, the settings every sample of the folder was made with."""

    SUBFOLDERS = ("images", "labels", "vis")

    def __init__(self, root: Path):
        self.root = root
        self.created = [p for p in (root, *(root / s for s in self.SUBFOLDERS)) if not p.exists()]
        self.wrote = False
        try:
            for sub in self.SUBFOLDERS:
                (root / sub).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=root).close()
        except OSError as e:
            raise SystemExit(f"error: output folder {root} is not writable: {e}") from e
        for folder in (root, *(root / s for s in self.SUBFOLDERS)):
            clean_stale(folder)  # temporary files of a killed run
        self.manifest = root / "manifest.jsonl"
        self.run_file = root / RUN_FILE
        self.settings: dict | None = None
        if self.manifest.exists() and self.manifest.stat().st_size:
            with open(self.manifest, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a line torn by a kill, so the next record starts clean

    def open_run(self, settings: dict, overwrite: bool = False) -> None:
        """Check `settings` against the folder's run.json (written with the first sample): samples
        of other settings are never mixed in. `overwrite` deletes the folder's samples first."""
        if overwrite:
            for name in (RUN_FILE, "manifest.jsonl"):
                (self.root / name).unlink(missing_ok=True)
            for sub in self.SUBFOLDERS:
                shutil.rmtree(self.root / sub, ignore_errors=True)
                (self.root / sub).mkdir()
        if self.run_file.exists():
            try:
                saved = json.loads(self.run_file.read_text())
            except ValueError as e:
                raise RunMismatch(f"{self.run_file}: unreadable ({e}); choose another --out, or pass --overwrite to "
                                  f"delete the folder's samples and start again") from e
            diff = setting_differences(saved, settings)
            if diff:
                raise RunMismatch(f"{self.root} holds a run with other settings ({'; '.join(diff)}): run with its "
                                  f"settings to resume it, choose another --out, or pass --overwrite to delete its "
                                  f"samples and start again")
        elif self.done():
            raise RunMismatch(f"{self.root} holds samples but no {RUN_FILE} with their settings: choose another "
                              f"--out, or pass --overwrite to delete its samples and start again")
        self.settings = settings

    def done(self) -> set[str]:
        if not self.manifest.exists():
            return set()
        ids = set()
        for line in self.manifest.read_text().splitlines():
            if not line.strip():
                continue
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a killed run: that sample is redone
        return ids

    def write(self, sid: str, image: Image.Image, label: np.ndarray | None, record: dict | None) -> None:
        """The sample's files, then its manifest line (None: the files only, the line exists); an
        unlabelled sample (label None) has no label or vis."""
        if not self.wrote and self.settings is not None and not self.run_file.exists():
            write_text(self.run_file, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        self.wrote = True
        _atomic_png(image, self.root / "images" / f"{sid}.png")
        if label is not None:
            save_label(label, self.root / "labels" / f"{sid}{TRAIN_ID_SUFFIX}")
            _atomic_png(vis_grid(image, label), self.root / "vis" / f"{sid}.png")
        if record is None:
            return
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write: lines from several ranks never interleave
        finally:
            os.close(fd)

    def remove_if_unused(self) -> None:
        """Remove the folders this run created when nothing was written into them (a failed run)."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (another rank wrote), or already gone

    def run(self, settings: dict, n: int, indices, sample_id_of, only: bool, rank: int, world: int, work,
            overwrite: bool = False) -> None:
        """Open the run (`open_run`), then call ``work(todo, done)`` with this rank's samples among
        `indices` that are not done yet (all of them with `only`: --only regenerates); a run that
        wrote nothing removes the folders it created."""
        try:
            self.open_run(settings, overwrite=overwrite)
            done = self.done()
            todo = [i for i in indices if i % world == rank and (only or sample_id_of(i) not in done)]
            print(f"rank {rank}/{world}: {n} samples, {len(todo)} to generate here -> {self.root}", file=sys.stderr)
            if todo:
                work(todo, done)
        finally:
            if not self.wrote:
                self.remove_if_unused()


def load_models(args, device, dtype):
    from controlnet import ControlNet
    from ldm.sd import StableDiffusion

    if args.base is None:  # --random-tiny
        print("=" * 78 + "\nWARNING: no --base checkpoint: using a TINY RANDOMLY INITIALISED model.\n"
              "The images will be NOISE. This run only exercises the pipeline end to end.\n"
              "Pass --base (SD-1.5) and --controlnet (DGInStyle ControlNet) for real data.\n" + "=" * 78,
              file=sys.stderr)
        sd = StableDiffusion.random("tiny", seed=0, dtype=dtype, device=device)
        with torch.random.fork_rng():
            torch.manual_seed(1)  # a non-zero ControlNet, so the label reaches the random U-Net
            cn = ControlNet.from_unet(sd.unet, hint_channels=20, hint_block_channels=(8, 8, 16, 16))
            for p in cn.parameters():
                if p.abs().max() == 0:
                    torch.nn.init.normal_(p, std=0.02)
        return sd, cn.to(device, dtype).eval()
    from controlnet.checkpoint import load_controlnet

    bundle = getattr(args, "bundle", None)  # mrlf.didex's command line has no --bundle
    if bundle:
        print(f"models: the bundle in {bundle}" + (" (the miniature world shipped with this package: a "
              "small world trained from scratch, not SD-1.5; pass --base/--controlnet for real data)"
              if Path(bundle).resolve() == SHIPPED else ""), file=sys.stderr)
    sd = StableDiffusion.from_checkpoint(args.base, dtype=dtype, device=device)
    if args.style_source is not None:
        from mrlf.style import blend_unet_

        blend_unet_(sd.unet, args.style_source, args.style, args.keep_source)
    cn = load_controlnet(args.controlnet, dtype=dtype, device=device) if args.controlnet else None
    return sd, cn


def settings_from_args(args) -> tuple[SamplingSettings, MRLFSettings, PromptConfig]:
    base = DEMO if args.preset == "demo" else DATASET  # an explicit --preset: its keys were left unset above
    over = {k: v for k, v in dict(scale_factor=args.scale_factor, window=args.window, stride=args.stride,
                                  component_threshold=args.threshold, inpaint_level=args.inpaint_level,
                                  posterior=args.posterior, blend=args.blend, view_batch=args.view_batch).items()
            if v is not None}
    fusion = dataclasses.replace(base, **over)
    sampling = SamplingSettings(steps=args.steps, guidance_scale=args.guidance, control_scale=args.control_scale,
                                control_start=args.control_start, control_end=args.control_end,
                                guidance_start=args.guidance_start, guidance_end=args.guidance_end,
                                sampler=args.sampler, eta=args.eta)
    prompts = PromptConfig(weather_prob=args.weather_prob, negative_prompt=args.negative_prompt,
                           **({"weather_words": tuple(args.weather_words)} if args.weather_words else {}))
    return sampling, fusion, prompts


def _where(path: str | None) -> str | None:
    """A path as an absolute one (so a resume from another folder compares equal); other names as given."""
    return None if path is None else (str(Path(path).resolve()) if Path(path).exists() else path)


def run_settings(args, sampling: SamplingSettings, fusion: MRLFSettings, prompts: PromptConfig,
                 dtype: torch.dtype) -> dict:
    """Everything a sample's content depends on (run.json): a folder holds samples of one such record.
    -n is not part of it (more jobs extend the same job list), nor are speed knobs (view batch, graphs)."""
    if args.jobs:
        inputs = {"jobs": _where(args.jobs)}
    elif args.label_maps:
        inputs = {"label_maps": [_where(p) for p in args.label_maps]}
    else:
        inputs = {"labels": _where(str(args.labels or EXAMPLES)), "pattern": args.pattern,
                  "rcs_min_pixels": args.rcs_min_pixels, "rcs_temperature": args.rcs_temperature}
    return {"seed": args.seed, "height": args.height, "width": args.width, "images_per_label": args.images_per_label,
            "inputs": inputs, "faithful": args.faithful, "sampling": asdict(sampling),
            "mrlf": {k: v for k, v in asdict(fusion).items() if k != "view_batch"}, "prompt": asdict(prompts),
            "base": _where(args.base), "bundle": _where(args.bundle), "controlnet": _where(args.controlnet),
            "style_source": _where(args.style_source),
            "style": args.style, "dtype": str(dtype), **keep_source_setting(args)}


def keep_source_setting(args) -> dict:
    # Only when set, so that folders written before --keep-source existed still resume.
    return {"keep_source": list(args.keep_source)} if args.keep_source else {}


def add_style_arguments(g) -> None:
    """Style Swap: U^S, the weight interpolation towards it and the U-Net parts kept at U^S."""
    g.add_argument("--style-source", help="U^S checkpoint for the style knob (U-Net weights interpolated)")
    g.add_argument("--style", type=cli.fraction, default=0.0, help="0 = DGInStyle's swap (U^P), 1 = no swap (U^S)")
    g.add_argument("--keep-source", nargs="+", metavar="PREFIX", default=[],
                   help="U-Net parts (key prefixes: out, output_blocks.11, ...) that keep U^S's weights under the "
                        "swap; e.g. the shallowest decoder level (SD-1.5: output_blocks.9 output_blocks.10 "
                        "output_blocks.11 out), where the ControlNet's finest residuals are read")


def check_style_arguments(args, parser) -> None:
    if args.style_source is None and args.style != 0.0:
        parser.error("--style needs --style-source")
    if args.style_source is None and args.keep_source:
        parser.error("--keep-source needs --style-source (or a bundle with a U^S)")


def add_control_arguments(g) -> None:
    """How strongly and when the ControlNet acts (SamplingSettings.control_scale, control_start/end)."""
    d = SamplingSettings
    g.add_argument("--control-scale", type=cli.finite, default=d.control_scale,
                   help="scale of the ControlNet residuals")
    g.add_argument("--control-start", type=cli.real(0, 1, open_max=True), default=d.control_start, metavar="F",
                   help="fraction of the steps run before the ControlNet starts acting (diffusers' "
                        "control_guidance_start)")
    g.add_argument("--control-end", type=cli.real(0, 1, open_min=True), default=d.control_end, metavar="F",
                   help="fraction of the steps run after which the ControlNet stops acting, the last steps then "
                        "the U-Net's alone (diffusers' control_guidance_end)")


def check_control_arguments(args, p: argparse.ArgumentParser) -> None:
    if args.control_start >= args.control_end:
        p.error(f"--control-start {args.control_start:g} must be below --control-end {args.control_end:g}")


def add_guidance_window_arguments(g, bundle: bool = False) -> None:
    """When classifier-free guidance acts (SamplingSettings.guidance_start/end). With `bundle`, unset
    flags are None, to be filled from a bundle's generation settings or else the defaults."""
    d = SamplingSettings
    note = " (default: the bundle's, else {:g})" if bundle else ""
    g.add_argument("--guidance-start", type=cli.real(0, 1, open_max=True), metavar="F",
                   default=None if bundle else d.guidance_start,
                   help="fraction of the steps run before classifier-free guidance starts; the steps before take "
                        "the conditional prediction alone" + note.format(d.guidance_start))
    g.add_argument("--guidance-end", type=cli.real(0, 1, open_min=True), metavar="F",
                   default=None if bundle else d.guidance_end,
                   help="fraction of the steps run after which classifier-free guidance stops, the last steps "
                        "then the conditional prediction alone" + note.format(d.guidance_end))


def check_guidance_window(args, p: argparse.ArgumentParser) -> None:
    if args.guidance_start >= args.guidance_end:
        p.error(f"--guidance-start {args.guidance_start:g} must be below --guidance-end {args.guidance_end:g}")


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m mrlf.generate", __doc__)
    src = p.add_argument_group("inputs (default: the bundle's label maps)")
    src.add_argument("--labels", metavar="FOLDER", help="folder of trainId label PNGs; rare-class sampling picks "
                                                        "(class, file) jobs")
    src.add_argument("--pattern", default="*_labelTrainIds.png", help="label file pattern in --labels")
    src.add_argument("--rcs-min-pixels", type=cli.non_negative_int, metavar="PX",
                     help="--labels: files eligible for class c hold more than PX pixels of it (default: the "
                          "bundle's, else DGInStyle's 3000, sized for GTA's 1914x1052 labels)")
    src.add_argument("--rcs-temperature", type=cli.positive, metavar="T",
                     help="--labels: rare-class sampling temperature (default: the bundle's, else 0.01)")
    src.add_argument("-n", "--num-samples", type=cli.positive_int, metavar="N",
                     help="jobs drawn from --labels (each gives --images-per-label samples; default: the "
                          "bundle's, else 4)")
    src.add_argument("--jobs", metavar="GEN_FILE", help="gen-file JSON: [{class, class_name, file_name}, ...]")
    src.add_argument("--label-maps", nargs="+", metavar="PNG", help="single label maps (centre crop)")
    src.add_argument("--images-per-label", type=cli.positive_int, default=1, metavar="K",
                     help="samples per job or label map, each with its own seed (and crop, for rare-class jobs)")
    m = p.add_argument_group("models")
    m.add_argument("--base", help="U^P: SD-1.5 file, folder or local HF cache id (default: the bundle's prior)")
    m.add_argument("--bundle", help="a model bundle folder (bundle.json: prior, ControlNet, U^S, label maps and "
                                    "generation defaults); default without --base: the miniature world shipped in "
                                    "this package")
    m.add_argument("--random-tiny", action="store_true",
                   help="a tiny randomly initialised model instead (a smoke run: the images are noise)")
    m.add_argument("--controlnet", help="ControlNet checkpoint (file or diffusers folder)")
    add_style_arguments(m)
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    m.add_argument("--cuda-graphs", action="store_true",
                   help="replay the guided ControlNet + U-Net call as CUDA graphs (same images, fewer launches)")
    s = p.add_argument_group("generation")
    s.add_argument("--preset", choices=["dataset", "demo"],
                   help="the original's stride and threshold for 512 px SD-1.5 crops (dataset: stride 8, threshold "
                        "20000 px; demo: stride 16, threshold 30000 px). Default: the bundle's or the tiny model's "
                        "own, else dataset; given, it wins over those (not over --stride / --threshold)")
    s.add_argument("--faithful", action="store_true",
                   help="the original's crop index draw (rng.integers(0, n-1)); refuses the non-original options")
    s.add_argument("--size", type=cli.positive_int, default=None,
                   help="square crop / base size in pixels (default: the bundle's; 512 with --base, 256 with "
                        "--random-tiny)")
    s.add_argument("--height", type=cli.positive_int, default=None, help="crop height in pixels (default: --size)")
    s.add_argument("--width", type=cli.positive_int, default=None, help="crop width in pixels (default: --size)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="ddim (the original), euler, dpmpp_2m")
    s.add_argument("--steps", type=cli.positive_int, default=None,
                   help="sampler steps (default 20; 10 with the tiny model)")
    s.add_argument("--eta", type=cli.non_negative, default=0.0,
                   help="ddim: fresh noise per step (0: deterministic DDIM, the original's; 1: as DDPM's ancestral "
                        "steps)")
    s.add_argument("--guidance", type=cli.finite, help="classifier-free guidance scale (default: the bundle's, "
                                                       "else 7.5)")
    add_guidance_window_arguments(s, bundle=True)
    add_control_arguments(s)
    s.add_argument("--scale-factor", type=cli.positive_int,
                   help="MRLF factor of the tiled pass (default 2; 1 = plain controlled generation)")
    s.add_argument("--window", type=cli.positive_int,
                   help="latent view size of the tiled pass (default: the bundle's; 64 with --base, an eighth of the "
                        "crop with --random-tiny)")
    s.add_argument("--stride", type=cli.positive_int,
                   help="latent view stride of the tiled pass, at most --window (default: the bundle's, else the "
                        "preset's)")
    s.add_argument("--threshold", type=cli.non_negative_int,
                   help="large-component area threshold in pixels (default: the bundle's, else the preset's)")
    s.add_argument("--inpaint-level", choices=["faithful", "matched"],
                   help="noise level of the re-injected pass-1 latents (default faithful: the original's "
                        "t-1)")
    s.add_argument("--posterior", choices=["sample", "mean"],
                   help="how pass 1 is re-encoded for pass 2 (default sample, as the original)")
    s.add_argument("--blend", choices=["uniform", "tent", "gaussian"],
                   help="view weights of the tiled pass (default uniform: the original's average)")
    s.add_argument("--view-batch", type=cli.positive_int,
                   help="views per network call (default: the bundle's, else 8)")
    s.add_argument("--weather-prob", type=cli.fraction,
                   help="share of prompts with a weather word (default: the bundle's, else 0.5)")
    s.add_argument("--weather-words", nargs="+", metavar="WORD",
                   help="weather words drawn from (default: the original's)")
    s.add_argument("--negative-prompt", default="", help="negative prompt of the guidance (default: none)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs/dginstyle_demo",
                   help="output folder; re-running into it resumes (with the same settings only)")
    o.add_argument("--overwrite", action="store_true",
                   help="delete the samples already in --out (and their settings) and start again")
    o.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="global seed; sample i's seed is drawn from (seed, i)")
    o.add_argument("--only", type=cli.non_negative_int, nargs="+", metavar="I",
                   help="(re)generate only these sample indices")
    o.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    args.labels_shipped = False
    if args.random_tiny and (args.base or args.bundle):
        p.error("--random-tiny cannot be combined with --base or --bundle")
    if args.bundle or not (args.base or args.random_tiny):
        apply_bundle(args, p)
    for name, default in (("guidance", 7.5), ("guidance_start", SamplingSettings.guidance_start),
                          ("guidance_end", SamplingSettings.guidance_end), ("weather_prob", 0.5), ("num_samples", 4),
                          ("rcs_min_pixels", DEFAULT_MIN_PIXELS), ("rcs_temperature", DEFAULT_TEMPERATURE)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.controlnet and not args.base:
        p.error("--controlnet needs --base")
    check_style_arguments(args, p)
    if args.random_tiny and args.style_source is not None:
        p.error("--style-source needs --base or a --bundle (the tiny random model has no U^S to blend)")
    if args.faithful:
        unfaithful = [f"--{k.replace('_', '-')} {v}" for k, v in
                      (("blend", args.blend), ("inpaint_level", args.inpaint_level), ("posterior", args.posterior),
                       ("sampler", args.sampler))
                      if v not in (None, "uniform", "faithful", "sample", "ddim")]
        unfaithful += [f"--eta {args.eta:g}"] if args.eta else []
        unfaithful += [f"--control-start {args.control_start:g}"] if args.control_start else []
        unfaithful += [f"--control-end {args.control_end:g}"] if args.control_end < 1 else []
        unfaithful += [f"--guidance-start {args.guidance_start:g}"] if args.guidance_start else []
        unfaithful += [f"--guidance-end {args.guidance_end:g}"] if args.guidance_end < 1 else []
        if unfaithful or args.negative_prompt:
            p.error(f"--faithful reproduces the original; it cannot be combined with "
                    f"{', '.join(unfaithful + (['--negative-prompt'] if args.negative_prompt else []))}")
    check_control_arguments(args, p)
    check_guidance_window(args, p)
    if args.eta and args.sampler != "ddim":
        p.error(f"--eta {args.eta:g} needs --sampler ddim (the {args.sampler} sampler draws no noise per step)")
    if args.overwrite and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("--overwrite deletes the folder's samples: run it on one process, not under torchrun")
    tiny = args.base is None  # the tiny random model: a quick smoke run unless told otherwise
    args.size = args.size or (256 if tiny else 512)
    args.height, args.width = args.height or args.size, args.width or args.size
    for name in ("height", "width"):
        if getattr(args, name) % 8:
            p.error(f"--{name} {getattr(args, name)}: the crop must be a multiple of 8 pixels")
    args.steps = args.steps or (10 if tiny else 20)
    if tiny:
        args.window = args.window or min(64, min(args.height, args.width) // 8)
        if args.preset is None:
            args.stride = args.stride or min(16, args.window)
            args.threshold = args.threshold if args.threshold is not None else (args.height * args.width) // 13
    window = args.window or DATASET.window
    stride = args.stride or (DEMO if args.preset == "demo" else DATASET).stride
    if stride > window:
        p.error(f"--stride {stride} is larger than the tiled pass's window {window} (--window): views would leave "
                "latents uncovered")
    if args.base and not args.controlnet:
        p.error("--base without --controlnet: the images would not follow their labels (the labels are saved next "
                "to them); pass --controlnet, or a --bundle")
    return args


def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device (auto: CUDA when available; under torchrun the rank's GPU LOCAL_RANK) and --dtype
    (default fp16 on CUDA, fp32 on CPU)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dev.index or 0)))
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, DTYPES[dtype] if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)


def apply_bundle(args, parser) -> None:
    """Fill the models, label maps and unset generation options from a bundle (--bundle, else the
    shipped one); without a shipped bundle fall back to --random-tiny."""
    try:
        bundle = load_bundle(args.bundle) if args.bundle else shipped_bundle()
    except BundleError as e:
        parser.error(str(e))
    if bundle is None:
        args.random_tiny = True
        return
    if args.base:
        parser.error("--bundle gives the models; do not pass --base too")
    args.base, args.controlnet = str(bundle["prior"]), args.controlnet or str(bundle["controlnet"])
    if "source_unet" in bundle.files and args.style_source is None:
        args.style_source = str(bundle["source_unet"])
    if not (args.labels or args.jobs or args.label_maps) and "labels" in bundle.files:
        args.labels, args.labels_shipped = str(bundle["labels"]), bundle.root.resolve() == SHIPPED
    for key, value in bundle.generation.items():
        if args.preset is not None and key in ("stride", "threshold"):
            continue  # an explicit --preset sets these two
        if getattr(args, key, None) is None:
            setattr(args, key, tuple(value) if isinstance(value, list) else value)
    args.bundle = str(bundle.root)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit(f"error: --cuda-graphs needs a CUDA device, got {device}")
    sampling, fusion, prompt_cfg = settings_from_args(args)
    size = (args.height, args.width)
    jobs = make_jobs(args)  # every input is checked before anything is written
    check_inputs(jobs, *size, full=bool(args.label_maps))
    indices = list(dict.fromkeys(args.only)) if args.only else range(len(jobs))
    bad = [i for i in indices if not 0 <= i < len(jobs)]
    if bad:
        raise SystemExit(f"error: --only {bad}: there are {len(jobs)} samples")
    settings = run_settings(args, sampling, fusion, prompt_cfg, dtype)
    out = Output(Path(args.out))
    models = None
    if args.overwrite:  # what can still fail is checked before the folder's samples are deleted
        models = load_models(args, device, dtype)
        Pipeline(*models)._check_size(*size)
    out.run(settings, len(jobs), indices, lambda i: sample_id(i, jobs[i], args.seed), bool(args.only), rank, world,
            lambda todo, done: generate(args, out, jobs, todo, done, settings, device, dtype, sampling, fusion,
                                        prompt_cfg, rank, world, models),
            overwrite=args.overwrite)
    return 0


def generate(args, out: Output, jobs, todo, done, settings, device, dtype, sampling, fusion, prompt_cfg, rank, world,
             models=None):
    sd, cn = models or load_models(args, device, dtype)
    pipe = Pipeline(sd, cn, cuda_graphs=args.cuda_graphs)
    size = (args.height, args.width)
    pipe._check_size(*size)  # before the first sample: the crop fits the model's latent grid
    record_settings = {**settings, "view_batch": fusion.view_batch, "device": device.type}
    steps = sampling.steps * (2 if fusion.scale_factor > 1 else 1)  # sampler steps of one sample (both passes)
    progress = cli.Progress(len(todo) * steps, f"rank {rank}" if world > 1 else "", "steps",
                            enabled=not args.no_progress)
    try:
        for k, i in enumerate(todo, 1):
            job, sid, seed = jobs[i], sample_id(i, jobs[i], args.seed), sample_seed(args.seed, i)
            note = f"sample {k}/{len(todo)} {sid}"
            tic = time.perf_counter()
            rng = np.random.default_rng(seed)  # crop placement first, then the weather draws
            label = load_label(job["file"])
            crop, box = crop_label(label, job, size, rng, args.faithful, job["file"])
            prompt = make_prompt(crop, rng, prompt_cfg)
            result = pipe.mrlf(crop, prompt.text, torch.Generator("cpu").manual_seed(seed), settings=sampling,
                               fusion=fusion, negative_prompt=prompt_cfg.negative_prompt, source=job["file"],
                               callback=lambda pass_index, step, t, z: progress.update(1, note))
            record = {"id": sid, "index": i, "seed": seed, "global_seed": args.seed, "prompt": prompt.text,
                      "weather": prompt.weather, "class": job["class"], "class_name": job["class_name"],
                      "source": str(job["file"]), "crop_box": list(map(int, box)),
                      "large_components": [asdict(c) for c in result.components],
                      "image": f"images/{sid}.png", "label": f"labels/{sid}{TRAIN_ID_SUFFIX}",
                      "settings": record_settings, "timing_s": {**result.timings, "total_s": time.perf_counter() - tic}}
            out.write(sid, result.image, crop, None if sid in done else record)  # --only a done sample: no new line
            done.add(sid)
            progress.update(0, note, flush=True)
    finally:
        progress.close()


def command() -> int:
    """The ``dginstyle-generate`` console script: `main` with every known error as one line."""
    return cli.run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
