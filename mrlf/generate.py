"""DGInStyle dataset generation: label maps in, a labelled, style-diverse dataset out.

    python -m mrlf.generate                     # embedded demo: shipped synthetic labels, tiny random model
    python -m mrlf.generate --labels data/gta/labels -n 6000 \\
        --base stable-diffusion-v1-5/stable-diffusion-v1-5 --controlnet path/to/ControlNet_UNet-S \\
        --out data/dginstyle_gen --device cuda --dtype fp16
    torchrun --nproc_per_node=8 -m mrlf.generate ...   # shards samples over ranks, no duplicates

Jobs come from a label folder (rare-class sampling picks (class, file) pairs), a gen-file JSON
(the original's format) or single label maps. Sample i gets its own seed derived from
(--seed, i): a numpy Generator for the crop and the weather words, then a CPU torch.Generator for
the diffusion noise, so any sample regenerates alone, bit-identically (`--only i`), on any rank,
after any resume (same device and dtype). Outputs: images/, labels/ (void stays 255), vis/
(image | colour label | overlay) and manifest.jsonl; every file is written atomically and a
sample counts as done only once its manifest line is written, so a killed run resumes cleanly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.atomic import atomic_file, clean_stale
from ldm.checkpoint import DTYPES
from mrlf.bundle import SHIPPED, BundleError, load_bundle, shipped_bundle
from mrlf.jobs import build_jobs, read_gen_file
from mrlf.pipeline import DATASET, DEMO, MRLFSettings, Pipeline, SamplingSettings
from mrlf.prompts import PromptConfig, make_prompt
from samplers import SAMPLERS
from segmentation.labels import TRAIN_ID_SUFFIX, colorize, load_label, save_label
from segmentation.rcs import class_stats, place_crop

EXAMPLES = Path(__file__).resolve().parents[1] / "segmentation" / "examples"


def sample_seed(seed: int, index: int) -> int:
    """Per-sample seed from (global seed, index): independent streams, stable across shards and resumes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def sample_id(index: int, job: dict) -> str:
    stem = Path(job["file"]).name.removesuffix(TRAIN_ID_SUFFIX).removesuffix(".png")
    return f"{index:06d}_{stem}"


def make_jobs(args) -> list[dict]:
    if args.jobs:
        return read_gen_file(args.jobs)
    if args.label_maps:
        return [{"class": None, "class_name": None, "file": str(p)} for p in args.label_maps]
    folder = Path(args.labels or EXAMPLES)
    cache = args.labels is not None and not args.labels_shipped  # never write a cache into the installed package
    stats = class_stats(folder, pattern=args.pattern, cache=cache)
    return build_jobs(stats, args.num_samples, seed=args.seed, crop_size=args.size)


def crop_label(label: np.ndarray, job: dict, size: int, rng: np.random.Generator, faithful: bool, source: str):
    """The (size x size) crop the sample is generated for, and its box (x1, y1, x2, y2)."""
    H, W = label.shape
    if H < size or W < size:
        raise ValueError(f"{source}: label {W}x{H} is smaller than the crop size {size}")
    if job["class"] is None:  # a plain label map: centre crop
        y, x = (H - size) // 2, (W - size) // 2
        return label[y:y + size, x:x + size], (x, y, x + size, y + size)
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


class Output:
    """The output folder: images/, labels/, vis/, manifest.jsonl (appended with one write per line)."""

    def __init__(self, root: Path):
        self.root = root
        try:
            for sub in ("images", "labels", "vis"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=root).close()
        except OSError as e:
            raise SystemExit(f"error: output folder {root} is not writable: {e}") from e
        for folder in (root, root / "images", root / "labels", root / "vis"):
            clean_stale(folder)  # temporary files of a killed run
        self.manifest = root / "manifest.jsonl"
        if self.manifest.exists() and self.manifest.stat().st_size:
            with open(self.manifest, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a line torn by a kill, so the next record starts clean

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

    def write(self, sid: str, image: Image.Image, label: np.ndarray | None, record: dict) -> None:
        """The sample's files, then its manifest line; an unlabelled sample (label None) has no label or vis."""
        _atomic_png(image, self.root / "images" / f"{sid}.png")
        if label is not None:
            save_label(label, self.root / "labels" / f"{sid}{TRAIN_ID_SUFFIX}")
            _atomic_png(vis_grid(image, label), self.root / "vis" / f"{sid}.png")
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write: lines from several ranks never interleave
        finally:
            os.close(fd)


class Progress:
    def __init__(self, total: int, prefix: str = ""):
        self.total, self.prefix, self.n, self.t0 = total, prefix, 0, time.perf_counter()

    def update(self, note: str = "") -> None:
        self.n += 1
        el = time.perf_counter() - self.t0
        eta = el / self.n * (self.total - self.n)
        bar = "#" * int(30 * self.n / max(self.total, 1))
        print(f"\r{self.prefix}[{bar:<30}] {self.n}/{self.total} {el:6.0f}s elapsed, ETA {eta:6.0f}s {note[:40]:<40}",
              end="" if self.n < self.total else "\n", file=sys.stderr, flush=True)


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

    if args.bundle:
        print(f"models: the bundle in {args.bundle}" + (" (the miniature world shipped with this package: a "
              "small world trained from scratch, not SD-1.5; pass --base/--controlnet for real data)"
              if Path(args.bundle) == SHIPPED else ""), file=sys.stderr)
    sd = StableDiffusion.from_checkpoint(args.base, dtype=dtype, device=device)
    if args.style_source is not None:
        from mrlf.style import blend_unet_

        blend_unet_(sd.unet, args.style_source, args.style)
    cn = load_controlnet(args.controlnet, dtype=dtype, device=device) if args.controlnet else None
    return sd, cn


def settings_from_args(args) -> tuple[SamplingSettings, MRLFSettings, PromptConfig]:
    base = DEMO if args.preset == "demo" else DATASET
    over = {k: v for k, v in dict(scale_factor=args.scale_factor, window=args.window, stride=args.stride,
                                  component_threshold=args.threshold, inpaint_level=args.inpaint_level,
                                  posterior=args.posterior, blend=args.blend, view_batch=args.view_batch).items()
            if v is not None}
    fusion = dataclasses.replace(base, **over)
    sampling = SamplingSettings(steps=args.steps, guidance_scale=args.guidance, control_scale=args.control_scale,
                                sampler=args.sampler)
    prompts = PromptConfig(weather_prob=args.weather_prob, negative_prompt=args.negative_prompt,
                           **({"weather_words": tuple(args.weather_words)} if args.weather_words else {}))
    return sampling, fusion, prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mrlf.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs (default: the bundle's label maps)")
    src.add_argument("--labels", help="folder of *_labelTrainIds.png; RCS picks (class, file) jobs")
    src.add_argument("--pattern", default="*_labelTrainIds.png", help="label file pattern in --labels")
    src.add_argument("-n", "--num-samples", type=int, help="samples drawn from --labels (default 4)")
    src.add_argument("--jobs", help="gen-file JSON: [{class, class_name, file_name}, ...]")
    src.add_argument("--label-maps", nargs="+", help="single label maps (centre crop)")
    m = p.add_argument_group("models")
    m.add_argument("--base", help="U^P: SD-1.5 file, folder or local HF cache id (default: the bundle's prior)")
    m.add_argument("--bundle", help="a model bundle folder (bundle.json: prior, ControlNet, U^S, label maps and "
                                    "generation defaults); default without --base: the miniature world shipped in "
                                    "this package")
    m.add_argument("--random-tiny", action="store_true",
                   help="a tiny randomly initialised model instead (a smoke run: the images are noise)")
    m.add_argument("--controlnet", help="ControlNet checkpoint (file or diffusers folder)")
    m.add_argument("--style-source", help="U^S checkpoint for the style knob (U-Net weights interpolated)")
    m.add_argument("--style", type=float, default=0.0, help="0 = DGInStyle's swap (U^P), 1 = no swap (U^S)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    m.add_argument("--cuda-graphs", action="store_true",
                   help="replay the guided ControlNet + U-Net call as CUDA graphs (same images, fewer launches)")
    s = p.add_argument_group("generation")
    s.add_argument("--preset", choices=["dataset", "demo"], default="dataset",
                   help="dataset: stride 8, threshold 20000; demo: stride 16, threshold 30000")
    s.add_argument("--faithful", action="store_true",
                   help="the original's crop index draw (rng.integers(0, n-1)); refuses the non-original options")
    s.add_argument("--size", type=int, default=None, help="crop / base size in pixels (default 512; 256 with the tiny model)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="ddim (the original), euler, dpmpp_2m")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; 10 with the tiny model)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    s.add_argument("--control-scale", type=float, default=1.0)
    s.add_argument("--scale-factor", type=int, help="MRLF factor (1 = plain controlled generation)")
    s.add_argument("--window", type=int, help="latent view size of the tiled pass")
    s.add_argument("--stride", type=int, help="latent view stride of the tiled pass")
    s.add_argument("--threshold", type=int, help="large-component area threshold (pixels)")
    s.add_argument("--inpaint-level", choices=["faithful", "matched"])
    s.add_argument("--posterior", choices=["sample", "mean"])
    s.add_argument("--blend", choices=["uniform", "tent", "gaussian"])
    s.add_argument("--view-batch", type=int, help="views per network call (default 8)")
    s.add_argument("--weather-prob", type=float, help="share of prompts with a weather word (default 0.5)")
    s.add_argument("--weather-words", nargs="+")
    s.add_argument("--negative-prompt", default="")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs/dginstyle_demo")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--only", type=int, nargs="+", help="generate only these sample indices")
    o.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.labels_shipped = False
    if args.random_tiny and (args.base or args.bundle):
        p.error("--random-tiny cannot be combined with --base or --bundle")
    if args.bundle or not (args.base or args.random_tiny):
        apply_bundle(args, p)
    for name, default in (("guidance", 7.5), ("weather_prob", 0.5), ("num_samples", 4)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.controlnet and not args.base:
        p.error("--controlnet needs --base")
    if args.style_source is None and args.style != 0.0:
        p.error("--style needs --style-source")
    if not 0.0 <= args.style <= 1.0:
        p.error("--style must be in [0, 1]")
    if args.faithful:
        unfaithful = [f"--{k.replace('_', '-')} {v}" for k, v in
                      (("blend", args.blend), ("inpaint_level", args.inpaint_level), ("posterior", args.posterior),
                       ("sampler", args.sampler))
                      if v not in (None, "uniform", "faithful", "sample", "ddim")]
        if unfaithful or args.negative_prompt:
            p.error(f"--faithful reproduces the original; it cannot be combined with "
                    f"{', '.join(unfaithful + (['--negative-prompt'] if args.negative_prompt else []))}")
    tiny = args.base is None  # the tiny random model: a quick smoke run unless told otherwise
    args.size = args.size or (256 if tiny else 512)
    args.steps = args.steps or (10 if tiny else 20)
    if tiny:
        args.stride = args.stride or 16
        args.window = args.window or min(64, args.size // 8)
        args.threshold = args.threshold if args.threshold is not None else (args.size ** 2) // 13
    return args


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
        args.labels, args.labels_shipped = str(bundle["labels"]), bundle.root == SHIPPED
    for key, value in bundle.generation.items():
        if getattr(args, key, None) is None:
            setattr(args, key, tuple(value) if isinstance(value, list) else value)
    args.bundle = str(bundle.root)
def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device (auto: CUDA when available; under torchrun the rank's GPU LOCAL_RANK) and --dtype
    (default fp16 on CUDA, fp32 on CPU)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dev.index or 0)))
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, DTYPES[dtype] if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit(f"error: --cuda-graphs needs a CUDA device, got {device}")
    sampling, fusion, prompt_cfg = settings_from_args(args)
    out = Output(Path(args.out))
    jobs = make_jobs(args)
    indices = args.only if args.only else range(len(jobs))
    bad = [i for i in indices if not 0 <= i < len(jobs)]
    if bad:
        raise SystemExit(f"error: --only {bad}: there are {len(jobs)} samples")
    done = out.done()
    todo = [i for i in indices if i % world == rank and (args.only or sample_id(i, jobs[i]) not in done)]
    print(f"rank {rank}/{world}: {len(jobs)} samples, {len(todo)} to generate here -> {out.root}", file=sys.stderr)
    if not todo:
        return 0
    sd, cn = load_models(args, device, dtype)
    pipe = Pipeline(sd, cn, cuda_graphs=args.cuda_graphs)
    settings = {"sampling": asdict(sampling), "mrlf": asdict(fusion), "size": args.size, "faithful": args.faithful,
                "prompt": asdict(prompt_cfg), "base": args.base, "bundle": args.bundle, "controlnet": args.controlnet,
                "style_source": args.style_source, "style": args.style, "dtype": str(dtype), "device": device.type}
    progress = None if args.no_progress else Progress(len(todo), f"rank {rank} " if world > 1 else "")
    for i in todo:
        job, sid, seed = jobs[i], sample_id(i, jobs[i]), sample_seed(args.seed, i)
        tic = time.perf_counter()
        rng = np.random.default_rng(seed)  # crop placement first, then the weather draws
        label = load_label(job["file"])
        crop, box = crop_label(label, job, args.size, rng, args.faithful, job["file"])
        prompt = make_prompt(crop, rng, prompt_cfg)
        result = pipe.mrlf(crop, prompt.text, torch.Generator("cpu").manual_seed(seed), settings=sampling,
                           fusion=fusion, negative_prompt=prompt_cfg.negative_prompt, source=job["file"])
        record = {"id": sid, "index": i, "seed": seed, "global_seed": args.seed, "prompt": prompt.text,
                  "weather": prompt.weather, "class": job["class"], "class_name": job["class_name"],
                  "source": str(job["file"]), "crop_box": list(map(int, box)),
                  "large_components": [asdict(c) for c in result.components],
                  "image": f"images/{sid}.png", "label": f"labels/{sid}{TRAIN_ID_SUFFIX}",
                  "settings": settings, "timing_s": {**result.timings, "total_s": time.perf_counter() - tic}}
        out.write(sid, result.image, crop, record)
        if progress:
            progress.update(sid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
