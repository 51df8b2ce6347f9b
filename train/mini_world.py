"""The miniature world: render it, train the whole DGInStyle chain on it from scratch with the
project's own training scripts, and package the result as a model bundle.

    python -m train.mini_world --out runs/mini                # the recipe (see BENCHMARKS.md for its time)
    python -m train.mini_world --out runs/mini --install      # ... and make it the shipped default (mrlf/world/)
    python -m train.mini_world --out runs/mini_x4 --scale 4 --device cuda   # four times the data and steps, on a GPU
    python -m train.mini_world --out runs/mini_w2 --scale 4 --width 2 --device cuda   # ... U-Nets twice as wide
    python -m train.mini_world --out runs/mini --nproc 2      # every training stage under torchrun
    python -m train.mini_world gate --out runs/gate           # the renderer's gate: segmenters on renders alone
    python -m train.mini_world reproduce --out runs/repro     # DGInStyle's claims on the bundle (train/reproduce.py)
    python -m train.mini_world bound --out runs/mini          # a ControlNet given labelled target-style data, measured

Stages, each a run of the CLI a user would run on real data (its command is printed and kept in
OUT/logs/<stage>.cmd), each resumable (a stage whose outputs exist is skipped; a killed training
stage continues from its last checkpoint with --resume auto):

 1. render        segmentation.world: source (GTA-like), prior (captioned images), eval/<style>
                  (Cityscapes-like), oracle (every style, labelled) and styles (classifier data)
 2. text_encoder  train.train_text_encoder: a CLIP text tower (SD-1.5's tokenizer, width 16)
                  pretrained contrastively on the captioned prior corpus, as SD's was
 3. vae           train.train_vae: the KL autoencoder, on source and prior images
 4. prior         train.finetune_unet: U^P, a text-to-image U-Net trained from scratch on the captioned
                  prior corpus, its text encoder frozen, with offset noise
 5. unet_s        train.finetune_unet: U^S, U^P fine-tuned on the source renders with the empty prompt
                  (DGInStyle's DreamBooth step)
 6. controlnet    train.train_controlnet: the label ControlNet on the frozen U^S, rare-class sampled,
                  its residuals' magnitude penalised (else they outweigh the small U-Net's own features
                  and carry the source's colours into U^P), validated on U^S and swapped onto U^P
 7. oracle        train.train_segmentation: a segmenter on labelled renders of every style (measures
                  how well generated images follow their labels)
 8. classifier    train.train_classifier: the style classifier (measures which style an image is in)
 9. bundle        fp16 copies of the networks, a few label maps and bundle.json (generation defaults)

Which text encoder makes style prompts work (``python -m train.mini_world text-encoder`` trains U^P with
each for the same steps and scores the style classifier's share of its text-to-image samples in the
prompted style, 8 images per style word; numbers in BENCHMARKS.md): a random frozen one and one trained
jointly with U^P both leave U^P deaf to style words, because its cross-attention starts out averaging
all 77 token states and only the caption's own words differ between captions; the 60-odd padding
states, most of the average, barely do, so nothing pulls the attention towards the style word. The
contrastively pretrained encoder puts the caption's meaning into its end-of-text and padding states,
and U^P follows style words from its first thousand steps (``--text-encoder clip``, the default;
``train`` and ``frozen`` remain for comparison). Offset noise (``--noise-offset``, see finetune_unet)
lets U^P choose an image's overall colour from the prompt rather than from the start noise.

Timings per stage go to OUT/recipe.json. --install copies OUT/bundle over mrlf/world/, the bundle
``python -m mrlf.generate`` uses without --base.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm import checkpoint as ckpt_io
from ldm import cli
from ldm.atomic import atomic_dir, atomic_file, write_text
from ldm.config import UNetConfig
from mrlf.bundle import BUNDLE_FILE, SHIPPED, load_bundle
from segmentation.labels import TRAIN_ID_SUFFIX
from segmentation.world import PRIOR_STYLES, WorldSpec, write_world

STAGES = ("render", "text_encoder", "vae", "prior", "unet_s", "controlnet", "oracle", "classifier", "bundle")
# Prompts of the prior's sample grids: a style word each, as generation prompts carry them.
SAMPLE_PROMPTS = [f"A city street scene with road sidewalk building vegetation sky car, in {s.word} weather."
                  for s in PRIOR_STYLES[:4]]
BUNDLE_LABELS = 8  # label maps shipped with the bundle
ORACLE_ZOOM = 2  # the oracle segmenter sees scenes at twice the world's size (small objects stay visible)
# Rare-class crops (ControlNet training and generation): a file is eligible for class c with more than this
# many pixels of c. DGInStyle's 3000 is 0.15 % of a GTA label; the world's are 8192 and 32768 pixels.
RCS_MIN_PIXELS = 20


@dataclass(frozen=True)
class Recipe:
    """Steps and batch sizes of every stage at scale 1 (2 CPU cores)."""

    world: WorldSpec = WorldSpec()
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 32  # the autoencoder is convolutional: small crops train it four times faster
    text_encoder_steps: int = 4500
    text_encoder_batch: int = 64
    prior_steps: int = 3000
    prior_batch: int = 32
    unet_s_steps: int = 400
    controlnet_steps: int = 3000
    controlnet_batch: int = 16
    controlnet_residual_penalty: float = 0.01  # smaller residuals: the swapped-in U^P keeps more of its style
    oracle_steps: int = 1000
    oracle_batch: int = 16
    classifier_steps: int = 600
    unet_width: float = 1.0  # the U-Net's channels (U^P, U^S and the ControlNet's copy) times this
    noise_offset: float = 0.1  # U^P and U^S: the prompt, not the start noise, sets an image's overall colour
    text_encoder: str = "clip"  # "clip" (contrastively pretrained, frozen), "train" (jointly with U^P), "frozen" (random)
    log_every: int = 50
    sample_grids: bool = True  # the prior's sample grids and the ControlNet's validation images

    def unet_config(self) -> str:
        """finetune_unet's --unet-config: the 'mini' preset, its channels times `unet_width` (multiples of its
        8 normalisation groups, which its head counts divide)."""
        if self.unet_width == 1.0:
            return "mini"
        cfg = UNetConfig.mini()
        return cfg.replace(channels=tuple(8 * max(1, round(c * self.unet_width / 8)) for c in cfg.channels)).to_json()

    def scaled(self, s: float) -> "Recipe":
        n = lambda v: max(1, int(round(v * s)))  # noqa: E731
        w = self.world
        world = replace(w, source=n(w.source), prior=n(w.prior), oracle=n(w.oracle), styles=n(w.styles))
        return replace(self, world=world, vae_steps=n(self.vae_steps), prior_steps=n(self.prior_steps),
                       text_encoder_steps=n(self.text_encoder_steps),
                       unet_s_steps=n(self.unet_s_steps), controlnet_steps=n(self.controlnet_steps),
                       oracle_steps=n(self.oracle_steps), classifier_steps=n(self.classifier_steps))


# A recipe small enough for a smoke run (tests): every stage runs, a few steps each, every step logged.
SMOKE = Recipe(world=WorldSpec(source=24, prior=40, eval=4, oracle=26, styles=4), vae_steps=30, vae_batch=8,
               vae_crop=16, text_encoder_steps=20, text_encoder_batch=8, prior_steps=20, prior_batch=4, unet_s_steps=10,
               controlnet_steps=20, controlnet_batch=4,
               oracle_steps=20, oracle_batch=4, classifier_steps=20, log_every=1, sample_grids=False)


class Runner:
    """Runs one stage's CLI as a child process (or under torchrun), with its log kept in OUT/logs/."""

    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, module: str, argv: list[str], training: bool = True) -> None:
        """Run ``python -m module argv`` (training scripts: on --device, resuming, under torchrun with --nproc)."""
        a = self.args
        argv = [str(x) for x in argv] + ["--device", a.device] + (["--resume", "auto"] if training else [])
        if a.nproc > 1 and module.startswith("train."):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
                   "-m", module, *argv]
        else:
            cmd = [sys.executable, "-m", module, *argv]
        write_text(self.out / "logs" / f"{stage}.cmd", shlex.join(cmd) + "\n")  # a shell runs it as it ran
        print(f"  $ {shlex.join(cmd[1:])}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.out / "logs" / f"{stage}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            tail = collections.deque(maxlen=20)  # what a --quiet run shows of a failed stage
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if not a.quiet:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            if proc.wait():
                shown = b"".join(tail).decode(errors="replace") if a.quiet else ""
                raise SystemExit(f"{shown}stage {stage} failed (exit {proc.returncode}); its log: "
                                 f"{self.out / 'logs' / (stage + '.log')}")


def train_stages(out: Path, r: Recipe, run: Runner, args) -> dict:
    """Every stage in order; returns {stage: seconds} of those that ran."""
    w = out / "world"
    times = {}

    def stage(name, done: Path, fn):
        k = STAGES.index(name) + 1
        if done.exists():
            print(f"[{k}/{len(STAGES)}] {name}: done ({done})", flush=True)
            return
        print(f"[{k}/{len(STAGES)}] {name} ...", flush=True)
        tic = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - tic, 1)
        print(f"[{k}/{len(STAGES)}] {name}: {times[name]:.0f} s", flush=True)

    spec = r.world
    stage("render", w / "world.json", lambda: write_world(w, spec))
    if r.text_encoder == "clip":
        stage("text_encoder", out / "text_encoder" / "text_encoder.safetensors", lambda: run(
            "text_encoder", "train.train_text_encoder", text_encoder_args(w / "prior", spec.base, r.text_encoder_steps,
                                                                        r.text_encoder_batch, out / "text_encoder",
                                                                        r.log_every)))
    stage("vae", out / "vae" / "vae.safetensors", lambda: run("vae", "train.train_vae", [
        "--data", w / "source" / "images", w / "prior" / "images", "--config", "mini",
        "--resolution", r.vae_crop, "--batch-size", r.vae_batch, "--max-steps", r.vae_steps, "--lr", "3e-3",
        "--rec-loss", "l2", "--warmup-steps", min(100, r.vae_steps // 10), "--ema", "--ema-decay", "0.99",
        "--sample-every", max(r.vae_steps // 4, 1) if r.sample_grids else 0, "--log-every", r.log_every,
        "--output-dir", out / "vae", "--num-workers", 0]))
    te = prior_text_encoder_args(r.text_encoder, out)
    stage("prior", out / "prior" / "pipeline.safetensors", lambda: run("prior", "train.finetune_unet", [
        "--vae", out / "vae" / "vae.safetensors", "--unet-config", r.unet_config(), *te, "--data", w / "prior",
        "--resolution", spec.base, "--scales", 1.0, "--proportion-empty-prompts", 0.1, "--random-flip",
        "--noise-offset", r.noise_offset, "--batch-size", r.prior_batch, "--grad-accum", 1,
        "--max-steps", r.prior_steps, "--lr", "1e-3",
        "--lr-scheduler", "cosine", "--lr-warmup-steps", min(100, r.prior_steps // 10), "--weight-decay", 0.0,
        "--ema", "--ema-decay", 0.999, "--sample-every", max(r.prior_steps // 3, 1) if r.sample_grids else 0,
        "--sample-prompt", *SAMPLE_PROMPTS, "--num-samples", 4, "--sample-steps", 20, "--log-every", r.log_every,
        "--ckpt-every", 500, "--output-dir", out / "prior", "--num-workers", 0]))
    stage("unet_s", out / "unet_s" / "pipeline.safetensors", lambda: run("unet_s", "train.finetune_unet", [
        "--base", out / "prior" / "pipeline.safetensors", "--data", w / "source" / "images", "--prompt", "",
        "--resolution", spec.base, "--scales", 1.0, "--random-flip", "--noise-offset", r.noise_offset,
        "--batch-size", r.prior_batch, "--grad-accum", 1, "--max-steps", r.unet_s_steps, "--lr", "1e-4",
        "--weight-decay", 0.0, "--sample-every", 0, "--log-every", r.log_every, "--ckpt-every", 200, "--output-dir", out / "unet_s",
        "--num-workers", 0]))
    stage("controlnet", out / "controlnet" / "controlnet.safetensors", lambda: run("controlnet", "train.train_controlnet", [
        *controlnet_args(out / "unet_s" / "pipeline.safetensors", w / "source", spec.base, r.controlnet_steps,
                         r.controlnet_batch, out / "controlnet", r.log_every, r.sample_grids,
                         r.controlnet_residual_penalty),
        "--prior", out / "prior" / "pipeline.safetensors"]))
    stage("oracle", out / "oracle" / "model.safetensors", lambda: run("oracle", "train.train_segmentation", [
        "--model", "mini", "--source", f"gta:{w / 'oracle'}", "--source-scale", ORACLE_ZOOM * 2 * spec.base,
        ORACLE_ZOOM * spec.base, "--crop", ORACLE_ZOOM * spec.base, "--batch-size", r.oracle_batch, "--max-iters", r.oracle_steps, "--lr", "6e-4",
        "--warmup-iters", max(r.oracle_steps // 20, 1), "--eval", *[f"cityscapes:{w / 'eval' / s.name}"
                                                                    for s in PRIOR_STYLES[:2]],
        "--eval-every", r.oracle_steps, "--eval-mode", "whole",
        "--eval-scale", ORACLE_ZOOM * 2 * spec.base, ORACLE_ZOOM * spec.base,
        "--log-every", r.log_every, "--output-dir", out / "oracle", "--num-workers", 0]))
    stage("classifier", out / "classifier" / "classifier.safetensors", lambda: run("classifier", "train.train_classifier", [
        "--data", w / "styles" / "train", "--val", w / "styles" / "val", "--resolution", spec.base,
        "--max-steps", r.classifier_steps, "--log-every", r.log_every, "--output-dir", out / "classifier",
        "--num-workers", 0]))
    stage("bundle", out / "bundle" / BUNDLE_FILE, lambda: make_bundle(out, r, times))
    return times


def text_encoder_args(data: Path, size: int, steps: int, batch: int, out: Path, log_every: int = 50) -> list:
    """train_text_encoder options of the world's text encoder: SD-1.5's tokenizer, the 'mini' tower,
    contrastively pretrained on the captioned prior corpus."""
    return ["--data", data, "--config", "mini", "--resolution", size, "--batch-size", batch, "--max-steps", steps,
            "--lr", "1e-3", "--warmup-steps", max(1, min(50, steps // 10)), "--log-every", log_every,
            "--output-dir", out, "--num-workers", 0]


def prior_text_encoder_args(mode: str, out: Path) -> list:
    """finetune_unet's text-encoder options of U^P for a --text-encoder mode (clip, train, frozen)."""
    if mode == "clip":
        return ["--text-encoder", out / "text_encoder" / "text_encoder.safetensors"]
    return ["--text-encoder-config", "mini"] + (["--train-text-encoder"] if mode == "train" else [])


def controlnet_args(base: Path, data: Path, size: int, steps: int, batch: int, out: Path, log_every: int = 50,
                    validation: bool = True, residual_penalty: float = Recipe.controlnet_residual_penalty) -> list:
    """train_controlnet options of the world's label ControlNet on the frozen `base` U-Net: rare-class
    crops of `data` (the recipe: the source renders), 10 % empty prompts, AdamW 1e-3 from the
    zero-initialised ControlNet, the residuals' mean square penalised."""
    return ["--base", base, "--data", data, "--resolution", size, "--crop", "rcs",
            "--rcs-min-pixels", RCS_MIN_PIXELS,
            "--proportion-empty-prompts", 0.1, "--batch-size", batch, "--grad-accum", 1, "--max-steps", steps,
            "--lr", "1e-3", "--weight-decay", 0.0, "--residual-penalty", residual_penalty,
            "--validation-every", max(steps // 3, 1) if validation else 0,
            "--validation-steps", 20, "--log-every", log_every, "--ckpt-every", 500, "--output-dir", out,
            "--num-workers", 0]


def make_bundle(out: Path, r: Recipe, seconds: dict | None = None) -> Path:
    """OUT/bundle: fp16 copies of the networks (loaded and re-saved by the ordinary loaders, so what
    ships is what loads), a few source label maps and bundle.json."""
    from controlnet.checkpoint import load_controlnet, save_controlnet
    from segmentation.models import load_segmentor, save_segmentor
    from segmentation.models.classifier import load_classifier, save_classifier

    half = torch.float16
    spec = r.world
    with atomic_dir(out / "bundle") as tmp:
        parts = ckpt_io.load_components(out / "prior" / "pipeline.safetensors")
        ckpt_io.save_native(tmp / "prior.safetensors", parts, dtype=half)
        ckpt_io.save_native(tmp / "unet_s.safetensors", ckpt_io.load_unet(out / "unet_s" / "unet.safetensors"), dtype=half)
        save_controlnet(tmp / "controlnet.safetensors", load_controlnet(out / "controlnet" / "controlnet.safetensors"),
                        dtype=half)
        save_segmentor(load_segmentor(out / "oracle" / "model.safetensors"), tmp / "oracle.safetensors", dtype=half)
        save_classifier(load_classifier(out / "classifier" / "classifier.safetensors"),
                        tmp / "style_classifier.safetensors", dtype=half)
        (tmp / "labels").mkdir()
        labels = sorted((out / "world" / "source" / "labels").glob("*" + TRAIN_ID_SUFFIX))
        for src in labels[:2 * BUNDLE_LABELS:2]:  # base-size scenes (the odd ones are painted at twice the size)
            shutil.copy(src, tmp / "labels" / src.name)
        recipe = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").exists() else {}
        bundle = {
            "format": "dginstyle-bundle/1",
            "description": "The miniature world: every network trained from scratch on procedural street scenes "
                           "(python -m train.mini_world). Not SD-1.5.",
            "prior": "prior.safetensors", "source_unet": "unet_s.safetensors", "controlnet": "controlnet.safetensors",
            "oracle": "oracle.safetensors", "style_classifier": "style_classifier.safetensors", "labels": "labels",
            "oracle_zoom": ORACLE_ZOOM,
            "generation": {"size": spec.base, "steps": 20, "window": spec.base // 4, "stride": spec.base // 8,
                           "threshold": spec.base * spec.base // 8, "view_batch": 9, "weather_prob": 1.0,
                           "weather_words": [s.word for s in PRIOR_STYLES], "num_samples": 8,
                           "rcs_min_pixels": RCS_MIN_PIXELS},
            "recipe": {"spec": asdict(r), "seconds": {**recipe.get("seconds", {}), **(seconds or {})}},  # this run's too
        }
        write_text(tmp / BUNDLE_FILE, json.dumps(bundle, indent=1) + "\n")
    load_bundle(out / "bundle")  # what was written reads back
    return out / "bundle"


def install(bundle: Path) -> None:
    """Copy a bundle over the shipped one (mrlf/world/)."""
    load_bundle(bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    with atomic_dir(SHIPPED) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
    print(f"installed {bundle} -> {SHIPPED} ({size / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------------------
# The renderer's gate, measured before any diffusion model is trained
# ----------------------------------------------------------------------------------------

def segmenter_args(spec: WorldSpec, steps: int, batch: int, model: str = "mini") -> list:
    """train_segmentation options of the world's downstream recipe: the 'mini' MiT + DAFormer (or another
    preset, `model`) at the base scale (scenes resized to base x 2 base), base-size crops, AdamW from scratch."""
    return ["--model", model, "--source-scale", 2 * spec.base, spec.base, "--crop", spec.base,
            "--batch-size", batch, "--max-iters", steps, "--lr", "6e-4", "--warmup-iters", max(steps // 20, 1),
            "--eval-every", 10 ** 9, "--num-workers", 0]


def evaluate_args(checkpoint: Path, world: Path, spec: WorldSpec, styles, out: Path) -> list:
    return ["--checkpoint", checkpoint, "--dataset", *[f"cityscapes:{world / 'eval' / s.name}" for s in styles],
            "--test-scale", 2 * spec.base, spec.base, "--mode", "whole", "--out", out]


def read_eval(path: Path, styles) -> dict[str, float]:
    """{style: mIoU} from a segmentation.evaluate JSON whose datasets are eval/<style> in `styles` order."""
    res = json.loads(path.read_text())["results"]
    return {s.name: float(v["mIoU"]) for s, v in zip(styles, res.values())}


def run_gate(args) -> int:
    """Two small segmenters on renders alone: source-only, and on labelled renders of every prior style.
    The gate: source-only on the prior styles <= 0.5 x its in-domain mIoU, and the prior-trained one >= 2 x
    the source-only one there."""
    from segmentation.world import SOURCE, UNSEEN_STYLES, write_labelled

    out = Path(args.out)
    r = Recipe().scaled(args.scale)
    spec = r.world
    run = Runner(out, args)
    write_world(out / "world", spec)
    write_labelled(out / "prior_labelled", PRIOR_STYLES, spec.source, spec, part="gate")
    styles = (SOURCE, *PRIOR_STYLES, *UNSEEN_STYLES)
    scores = {}
    for name, data in (("source_only", out / "world" / "source"), ("prior_labelled", out / "prior_labelled")):
        if not (out / name / "model.safetensors").exists():
            run(name, "train.train_segmentation", ["--source", f"gta:{data}", "--output-dir", out / name,
                                                   *segmenter_args(spec, r.oracle_steps, r.oracle_batch)])
        if not (out / name / "eval.json").exists():
            run(f"{name}_eval", "segmentation.evaluate",
                evaluate_args(out / name / "model.safetensors", out / "world", spec, styles, out / name / "eval.json"),
                training=False)
        scores[name] = read_eval(out / name / "eval.json", styles)
    src, pri = scores["source_only"], scores["prior_labelled"]
    prior_mean = lambda d: float(np.mean([d[s.name] for s in PRIOR_STYLES]))  # noqa: E731
    gate = {"source_only_in_domain": src["source"], "source_only_prior": prior_mean(src),
            "prior_labelled_prior": prior_mean(pri), "per_style": scores}
    gate["ratio_transfer"] = gate["source_only_prior"] / max(gate["source_only_in_domain"], 1e-9)
    gate["ratio_prior"] = gate["prior_labelled_prior"] / max(gate["source_only_prior"], 1e-9)
    gate["passed"] = gate["ratio_transfer"] <= 0.5 and gate["ratio_prior"] >= 2.0
    write_text(out / "gate.json", json.dumps(gate, indent=1) + "\n")
    print(f"{'style':<12} {'source-only':>12} {'prior-labelled':>15}")
    for s in styles:
        print(f"{s.name:<12} {100 * src[s.name]:12.1f} {100 * pri[s.name]:15.1f}")
    print(f"source-only: in-domain {100 * gate['source_only_in_domain']:.1f}, prior styles "
          f"{100 * gate['source_only_prior']:.1f} (ratio {gate['ratio_transfer']:.2f}, gate <= 0.5); prior-labelled "
          f"on the prior styles {100 * gate['prior_labelled_prior']:.1f} ({gate['ratio_prior']:.2f} x source-only, "
          f"gate >= 2): {'PASSED' if gate['passed'] else 'FAILED'}")
    return 0 if gate["passed"] else 1


# ----------------------------------------------------------------------------------------
# Measuring a trained world: the numbers of BENCHMARKS.md
# ----------------------------------------------------------------------------------------

MEASURE_LABELS = 24  # source label maps the measured samples are generated from
MEASURE_EVAL = 16  # evaluation images per style for the autoencoder


@torch.no_grad()
def measure_vae(world: Path, bundle, n: int = MEASURE_EVAL) -> dict:
    """The prior's autoencoder on held-out evaluation images of every trained style: PSNR of the
    reconstruction (posterior mean), and the oracle's mIoU on the reconstructions vs the originals."""
    from segmentation.datasets import SegDataset
    from segmentation.evaluate import predict_logits
    from segmentation.metrics import confusion_matrix, mean_iou
    from segmentation.models import load_segmentor
    from segmentation.transforms import TestPipeline
    from segmentation.world import SOURCE
    from train.train_vae import psnr

    vae = ckpt_io.load_vae(bundle["prior"]).eval()
    oracle = load_segmentor(bundle["oracle"]).eval()
    rows = {}
    for style in (SOURCE, *PRIOR_STYLES):
        data = SegDataset(world / "eval" / style.name, "cityscapes", "val")
        cms, db = {"original": 0, "reconstruction": 0}, []
        for i in range(min(n, len(data))):
            image, label = data.load(i)
            h, w = label.shape
            pipe = TestPipeline((ORACLE_ZOOM * max(h, w), ORACLE_ZOOM * min(h, w)))
            x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
            rec = _reconstruct(vae, x)
            db.append(psnr(rec, x))
            rec_u8 = ((rec[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            target = torch.from_numpy(label.astype(np.int64))
            for key, im in (("original", np.asarray(image)), ("reconstruction", rec_u8)):
                logits = predict_logits(oracle, pipe(im)[None], "whole", out_size=(h, w))
                cms[key] = cms[key] + confusion_matrix(logits.argmax(1)[0], target)
        rows[style.name] = {"psnr": float(np.mean(db)), **{f"oracle_{k}": mean_iou(v) for k, v in cms.items()}}
    return rows


def _reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] through the autoencoder (the posterior mean), clamped to [-1, 1]."""
    return vae.decode(vae.encode(x).mode()).clamp(-1, 1)


@torch.no_grad()
def autoencoded(folder: Path, vae, factor: int, dest: Path) -> Path:
    """A ``folder`` layout's images through the autoencoder at `factor` x their size (LANCZOS up, encode,
    decode, LANCZOS down), with their labels: what the generated images' decoder can at best give back.
    MRLF decodes its 2x pass at twice the base size, so the bound that matters for its images is factor 2."""
    from mrlf.pipeline import from_pil, to_pil  # the generator's own conversions and rounding

    (dest / "images").mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder / "labels", dest / "labels", dirs_exist_ok=True)
    for path in sorted((folder / "images").glob("*.png")):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        big = image.resize((w * factor, h * factor), Image.LANCZOS) if factor != 1 else image
        out = to_pil(_reconstruct(vae, from_pil(big)))[0]
        out = out.resize((w, h), Image.LANCZOS) if factor != 1 else out
        with atomic_file(dest / "images" / path.name) as tmp:
            out.save(tmp, format="PNG")
    return dest


def _true_renders(gen: Path, world: Path, spec: WorldSpec, dest: Path) -> Path:
    """For every generated sample: its label's scene painted in the prompted style by the renderer,
    cropped as the sample was (a ``folder`` layout: images/ + labels/)."""
    from segmentation.labels import load_label, save_label
    from segmentation.synthetic import Layout
    from segmentation.world import _scene, render

    words = {s.word: s for s in PRIOR_STYLES}
    for sub in ("images", "labels"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for line in (gen / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        i = int(Path(r["source"]).name[:6])
        sc, rng = _scene(spec, "source", i, Layout(), two_scales=True)
        x1, y1, x2, y2 = r["crop_box"]
        img = render(sc, words[r["weather"]], rng)[y1:y2, x1:x2]
        label = load_label(gen / r["label"])
        assert np.array_equal(sc.seg[y1:y2, x1:x2], label), r["id"]  # the same scene as the sample's label
        Image.fromarray(img).save(dest / "images" / f"{r['id']}.png")
        save_label(label, dest / "labels" / f"{r['id']}{TRAIN_ID_SUFFIX}")
    return dest


def _adherence(run: Runner, name: str, folder: Path, layout: str, bundle, size: int) -> float:
    """Pooled oracle mIoU of a folder of samples against their labels (segmentation.adherence)."""
    report = folder / "adherence"
    if not report.with_suffix(".json").exists():
        run(f"{name}_adherence", "segmentation.adherence", [
            "--checkpoint", bundle["oracle"], "--generated", folder, "--layout", layout, "--mode", "whole",
            "--test-scale", ORACLE_ZOOM * size, ORACLE_ZOOM * size, "--report", report, "--no-progress"],
            training=False)
    return float(json.loads(report.with_suffix(".json").read_text())["pooled"]["mIoU"])


def _style_accuracy(folder: Path, bundle, size: int) -> dict:
    """The style classifier on generated images: the share classified as their prompted style, and
    the share that drifted to the source look."""
    from segmentation.models.classifier import load_classifier
    from train.train_classifier import accuracy

    model = load_classifier(bundle["style_classifier"])
    classes = list(model.cfg.classes)
    words = {s.word: s.name for s in PRIOR_STYLES}
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    files = [folder / r["image"] for r in records]
    prompted = [classes.index(words[r["weather"]]) for r in records]
    source = [classes.index("source")] * len(files)
    return {"accuracy": accuracy(model, files, prompted, classes, size, "cpu")["accuracy"],
            "source_look": accuracy(model, files, source, classes, size, "cpu")["accuracy"]}


# mrlf.generate's options (their dests) that measure sets itself; the rest may come with --generate-args
MEASURE_OWNS = ("bundle", "base", "random_tiny", "style", "labels", "jobs", "label_maps", "num_samples",
                "images_per_label", "out", "overwrite", "only")


def measure_settings(args, bundle) -> dict:
    """What measure's numbers depend on besides the bundle's files: the label maps and the extra
    generation options (checked by mrlf.generate's own parser before anything runs)."""
    from mrlf import generate

    extra = shlex.split(args.generate_args or "")
    parser = generate.get_parser()
    given, default = parser.parse_args(extra), parser.parse_args([])  # abbreviated or --opt=value forms too
    owned = [f"--{k.replace('_', '-')}" for k in MEASURE_OWNS if getattr(given, k) != getattr(default, k)]
    if owned:
        raise SystemExit(f"--generate-args: {', '.join(owned)} {'is' if len(owned) == 1 else 'are'} set by "
                         f"measure itself")
    generate.parse_args(["--bundle", str(bundle.root), *extra])  # exits with generate's message when wrong
    return {"bundle": str(bundle.root.resolve()), "maps": args.maps, "generate_args": extra}


def run_measure(args) -> int:
    """The bundle's numbers: autoencoder, label adherence of generated images vs true renders, and
    style-prompt accuracy with and without Style Swap, and of U^P alone. OUT/measure by default;
    other label maps (--maps validation) or generation options (--generate-args) go to their own
    folder (--name), which keeps the settings it was measured with and refuses others."""
    out = Path(args.out)
    bundle = load_bundle(args.bundle or out / "bundle")
    world = out / "world"
    spec = WorldSpec(**json.loads((world / "world.json").read_text()))
    settings = measure_settings(args, bundle)
    name = args.name or "measure"
    if name == "measure" and (settings["maps"] != "measured" or settings["generate_args"]):
        raise SystemExit("--maps validation and --generate-args need their own --name (OUT/measure holds the "
                         "defaults' numbers)")
    mdir = out / name
    saved = mdir / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{mdir} was measured with other settings ({saved}: {saved.read_text().strip()}); "
                         f"choose another --name")
    mdir.mkdir(parents=True, exist_ok=True)
    write_text(saved, json.dumps(settings, indent=1) + "\n")
    run = Runner(mdir, args)
    size = int(bundle.generation.get("size", spec.base))
    first = 0 if settings["maps"] == "measured" else 1  # the even- or the odd-numbered label maps
    labels = sorted((world / "source" / "labels").glob("*" + TRAIN_ID_SUFFIX))[first:2 * MEASURE_LABELS:2]
    result = {**settings, "labels": len(labels), "vae": measure_vae(world, bundle)}
    # U^P with the ControlNet (DGInStyle), and U^S
    arms = {"swap": settings["generate_args"], "no_swap": [*settings["generate_args"], "--style", 1]}
    for arm, extra in arms.items():
        gen = mdir / arm
        run(f"generate_{arm}", "mrlf.generate", ["--bundle", bundle.root, "--label-maps", *labels, "--out", gen,
                                                 "--no-progress", *extra], training=False)
        # sampling time from the samples' own records: a rerun that finds them done changes nothing
        records = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
        result[arm] = {"sampling_seconds": round(sum(r["timing_s"]["total_s"] for r in records), 1),
                       "samples": len(labels),
                       "adherence": _adherence(run, arm, gen, "dginstyle", bundle, size),
                       **_style_accuracy(gen, bundle, size)}
    # U^P alone (text-to-image, no ControlNet): how much of the style accuracy the prior brings
    result["prior_alone"] = prompt_style_accuracy(bundle["prior"], bundle["style_classifier"], size=size)
    true = _true_renders(mdir / "swap", world, spec, mdir / "true_renders")
    result["true_renders"] = {"adherence": _adherence(run, "true", true, "folder", bundle, size)}
    # the autoencoder's bound on adherence: the true renders through it, at 1x and at MRLF's factor
    vae = ckpt_io.load_vae(bundle["prior"]).eval()
    from mrlf import generate
    factor = generate.settings_from_args(generate.parse_args(["--bundle", str(bundle.root)]))[1].scale_factor
    result["true_renders"]["autoencoded"] = {
        f"x{f}": _adherence(run, f"true_x{f}", autoencoded(true, vae, f, mdir / f"true_renders_x{f}"),
                            "folder", bundle, size) for f in sorted({1, factor})}
    result["adherence_ratio"] = result["swap"]["adherence"] / max(result["true_renders"]["adherence"], 1e-9)
    write_text(mdir / "measure.json", json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def bound_data(world: Path, dest: Path) -> Path:
    """`dest`: the oracle set's scenes painted in the prior styles (labelled, each with its style's
    word) as a jsonl dataset file, paths relative to it."""
    from segmentation.world import LABELLED_FILE

    src = world / "oracle" / LABELLED_FILE
    prior = {s.name for s in PRIOR_STYLES}
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    rel = lambda p: os.path.relpath(src.parent / p, dest.parent)  # noqa: E731
    rows = [{**r, "image": rel(r["image"]), "conditioning_image": rel(r["conditioning_image"])}
            for r in rows if r["style"] in prior]
    write_text(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return dest


def run_bound(args) -> int:
    """A bound, not a method: the recipe's ControlNet stage run on U^P itself with labelled renders of
    the prior styles (the oracle set's), captioned with the generation prompt and each image's style word.
    That is the labelled target-style data DGInStyle does not have, so it bounds what the ControlNet can
    give U^P here: its label adherence and style accuracy with these networks at this scale. Trains
    OUT/bound/controlnet/ on the bundle's U^P, then measures it as `measure` does (OUT/bound_measured or
    OUT/bound_validation; --name to choose)."""
    from mrlf.prompts import DEFAULT_TEMPLATE

    out = Path(args.out)
    r = recipe_from_args(args)
    bundle = load_bundle(args.bundle or out / "bundle")
    spec = WorldSpec(**json.loads((out / "world" / "world.json").read_text()))
    write_world(out / "world", spec)  # resumable: adds what an older world lacks (the labelled sets' dataset files)
    dest = out / "bound"
    # one bound per OUT: its ControlNet is only valid for the U^P and the steps it was trained with
    trained = {"prior": str(Path(bundle["prior"]).resolve()), "steps": r.controlnet_steps}
    record = dest / "trained_on.json"
    if record.exists() and json.loads(record.read_text()) != trained:
        raise SystemExit(f"{dest} holds a bound trained with {record.read_text().strip()}, not {trained}; "
                         f"use another --out")
    dest.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(trained) + "\n")
    data = bound_data(out / "world", dest / "data.jsonl")
    controlnet = dest / "controlnet" / "controlnet.safetensors"
    if not controlnet.exists():
        Runner(dest, args)("controlnet", "train.train_controlnet", [
            *controlnet_args(bundle["prior"], data, spec.base, r.controlnet_steps, r.controlnet_batch,
                             dest / "controlnet", r.log_every, False, r.controlnet_residual_penalty),
            "--caption-template", DEFAULT_TEMPLATE])
    measure = argparse.Namespace(**{**vars(args), "generate_args": f"--controlnet {shlex.quote(str(controlnet))}",
                                    "name": args.name or f"bound_{args.maps}"})
    return run_measure(measure)


FIGURE_STYLES = ("night", "snowy", "foggy", "desert")  # the four style columns of the sample figure


@torch.no_grad()
def run_figure(args) -> int:
    """A sample grid of a bundle, one row per shipped label map: label | pass 1 | MRLF | MRLF in each of
    FIGURE_STYLES, all with the settings ``python -m mrlf.generate --bundle`` uses, tiles enlarged 2x."""
    from mrlf import generate
    from mrlf.prompts import make_prompt
    from segmentation.labels import colorize, load_label

    bundle = load_bundle(args.bundle or Path(args.out) / "bundle")
    gargs = generate.parse_args(["--bundle", str(bundle.root), "--device", args.device])
    device, dtype = generate.device_and_dtype(gargs.device, gargs.dtype)
    sampling, fusion, prompt_cfg = generate.settings_from_args(gargs)
    pipe = generate.Pipeline(*generate.load_models(gargs, device, dtype))
    size = (gargs.height, gargs.width)
    rows = []
    for k, path in enumerate(sorted(bundle["labels"].glob("*" + TRAIN_ID_SUFFIX))[:args.rows]):
        label = load_label(path)
        crop, _ = generate.crop_label(label, {"class": None}, size, np.random.default_rng(k), False, str(path))
        tiles = [Image.fromarray(colorize(crop))]
        for j, word in enumerate((None, *FIGURE_STYLES)):
            cfg = replace(prompt_cfg, weather_prob=0.0 if word is None else 1.0,
                          weather_words=(word,) if word else prompt_cfg.weather_words)
            prompt = make_prompt(crop, np.random.default_rng(k), cfg)
            res = pipe.mrlf(crop, prompt.text, torch.Generator("cpu").manual_seed(1000 * k + j), settings=sampling,
                            fusion=fusion)
            tiles += [res.first_pass, res.image] if word is None else [res.image]
        rows.append(tiles)
    w, h = 2 * size[1], 2 * size[0]
    grid = Image.new("RGB", (w * len(rows[0]) + 2 * (len(rows[0]) - 1), h * len(rows) + 2 * (len(rows) - 1)), "white")
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            grid.paste(tile.convert("RGB").resize((w, h), Image.NEAREST), (c * (w + 2), r * (h + 2)))
    dest = Path(args.figure)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dest) as tmp:
        grid.save(tmp, format="PNG", optimize=True)
    print(f"{dest}: columns label | pass 1 | MRLF (no style word) | MRLF with {' | '.join(FIGURE_STYLES)}")
    return 0


@torch.no_grad()
def prompt_style_accuracy(pipeline_file: Path, classifier_file: Path, n: int = 8, steps: int = 20,
                          size: int = 64) -> dict:
    """Text-to-image with a prior (no ControlNet): `n` images per prior style prompt (SAMPLE_PROMPTS'
    sentence with each style word), the share the style classifier puts in the prompted style."""
    from ldm.sd import StableDiffusion
    from mrlf.pipeline import Pipeline, SamplingSettings
    from segmentation.models.classifier import load_classifier
    from train.train_classifier import accuracy

    pipe = Pipeline(StableDiffusion.from_checkpoint(pipeline_file))
    model = load_classifier(classifier_file)
    classes = list(model.cfg.classes)
    per_style = {}
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for k, style in enumerate(PRIOR_STYLES):
            prompt = f"A city street scene with road sidewalk building vegetation sky car, in {style.word} weather."
            images = pipe.generate(prompt, height=size, width=size, images_per_prompt=n, seeds=1000 * k,
                                   settings=SamplingSettings(steps=steps, guidance_scale=7.5))
            files = []
            for i, im in enumerate(images):
                files.append(Path(tmp) / f"{style.name}_{i}.png")
                im.save(files[-1])
            per_style[style.name] = accuracy(model, files, [classes.index(style.name)] * n, classes, size,
                                             "cpu")["accuracy"]
    return {"accuracy": float(np.mean(list(per_style.values()))), "per_style": per_style}


def run_text_encoder(args) -> int:
    """U^P trained with each text encoder (contrastively pretrained and frozen, trained jointly, random and
    frozen), same steps and data: style-prompt accuracy of their text-to-image samples (OUT/text_encoder.json)."""
    out = Path(args.out)
    r = recipe_from_args(args)
    w = out / "world"
    run = Runner(out, args)
    # the EMA starts at the initial weights: a decay whose horizon is a tenth of the run, or a short run's
    # export is mostly its random start
    ema_decay = min(0.999, 1.0 - 10.0 / args.te_steps)
    result = {"steps": args.te_steps, "ema_decay": ema_decay}
    for mode in ("clip", "train", "frozen"):
        dest = out / f"text_encoder_{mode}"
        if mode == "clip" and not (out / "text_encoder" / "text_encoder.safetensors").exists():
            run("text_encoder", "train.train_text_encoder", text_encoder_args(
                w / "prior", r.world.base, r.text_encoder_steps, r.text_encoder_batch, out / "text_encoder"))
        if not (dest / "pipeline.safetensors").exists():
            run(f"text_encoder_{mode}", "train.finetune_unet", [
                "--vae", out / "vae" / "vae.safetensors", "--unet-config", r.unet_config(),
                *prior_text_encoder_args(mode, out), "--data", w / "prior",
                "--resolution", r.world.base, "--scales", 1.0, "--proportion-empty-prompts", 0.1, "--random-flip",
                "--noise-offset", r.noise_offset, "--batch-size", r.prior_batch, "--grad-accum", 1, "--max-steps", args.te_steps, "--lr", "1e-3",
                "--lr-scheduler", "cosine", "--lr-warmup-steps", min(100, args.te_steps // 10),
                "--weight-decay", 0.0, "--ema", "--ema-decay", ema_decay, "--sample-every", 0, "--log-every", 50,
                "--ckpt-every", 500, "--output-dir", dest, "--num-workers", 0])
        result[mode] = prompt_style_accuracy(dest / "pipeline.safetensors", out / "classifier" / "classifier.safetensors")
        print(f"text encoder {mode}: style-prompt accuracy {result[mode]['accuracy']:.3f}", flush=True)
    write_text(out / "text_encoder.json", json.dumps(result, indent=1) + "\n")
    return 0


def recipe_from_args(args) -> Recipe:
    """The recipe of the command line: --smoke's or the full one, --text-encoder, --width, --scale."""
    return replace(SMOKE if args.smoke else Recipe(), text_encoder=args.text_encoder,
                   unet_width=args.width).scaled(args.scale)


def run_recipe(args) -> int:
    out = Path(args.out)
    r = recipe_from_args(args)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "recipe.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    spec = asdict(r)
    # a field an older run's record lacks had its default then
    if state.get("recipe") is not None and {**asdict(Recipe()), **state["recipe"]} != spec:
        raise SystemExit(f"{out}: holds a run of another recipe ({state_file}); use another --out")
    if not state:  # recorded before the first stage, so that a restart with other options cannot mix recipes
        state = {"recipe": spec, "seconds": {}}
        write_text(state_file, json.dumps(state, indent=1) + "\n")
    tic = time.perf_counter()
    times = train_stages(out, r, Runner(out, args), args)
    state = {"recipe": spec, "seconds": {**state.get("seconds", {}), **times},
             "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": args.device}}
    write_text(state_file, json.dumps(state, indent=1) + "\n")
    print(f"recipe done in {time.perf_counter() - tic:.0f} s (this run); per stage: {state['seconds']}")
    if args.install:
        install(out / "bundle")
    return 0


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.mini_world", __doc__)
    p.add_argument("command", nargs="?", default="train",
                   choices=("train", "gate", "measure", "bound", "figure", "text-encoder"),
                   help="train: the recipe; gate: the renderer's gate (segmenters on renders alone); measure: "
                        "the trained bundle's numbers (OUT/measure/measure.json); bound: the same for a ControlNet "
                        "trained on U^P with labelled prior-style renders (data DGInStyle lacks; OUT/bound_MAPS); "
                        "figure: its sample grid (--figure); text-encoder: U^P with each text encoder (see "
                        "--text-encoder), by style-prompt accuracy")
    p.add_argument("--out", help="output folder (resumable); every command but figure with --bundle needs it")
    p.add_argument("--scale", type=cli.positive, default=1.0,
                   help="multiply data sizes and steps (1: sized for 2 CPU cores)")
    p.add_argument("--width", type=cli.positive, default=1.0,
                   help="train, text-encoder: multiply the U-Net's channels (U^P, U^S, the ControlNet; 1: the 'mini' "
                        "preset's 32, 48, 64; rounded to multiples of 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of every stage (cpu, cuda, cuda:N)")
    p.add_argument("--nproc", type=cli.positive_int, default=1, help="processes per training stage (torchrun)")
    p.add_argument("--text-encoder", choices=("clip", "train", "frozen"), default="clip",
                   help="U^P's text encoder: pretrained contrastively on the prior corpus and frozen (the stage "
                        "text_encoder), trained jointly with U^P, or random and frozen")
    p.add_argument("--install", action="store_true", help="copy the bundle over mrlf/world/ at the end")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage (tests)")
    p.add_argument("--quiet", action="store_true", help="stage output to OUT/logs only")
    p.add_argument("--bundle", help="measure, bound, figure: the bundle (default: OUT/bundle)")
    p.add_argument("--maps", choices=("measured", "validation"), default="measured",
                   help="measure, bound: the even-numbered of the first 48 source label maps (BENCHMARKS' numbers) "
                        "or the odd-numbered ones (for trying settings without tuning on the measured maps)")
    p.add_argument("--generate-args", metavar="ARGS",
                   help="measure: more mrlf.generate options for both arms, one quoted string (e.g. \"--eta 1 "
                        "--controlnet runs/cn/controlnet.safetensors\"; a single option: --generate-args=--eta=1)")
    p.add_argument("--name", help="measure, bound: its folder in OUT (measure's default: measure, needed with --maps "
                                  "validation or --generate-args; bound's: bound_MAPS)")
    p.add_argument("--figure", default="docs/world_samples.png", help="figure: the PNG to write")
    p.add_argument("--rows", type=cli.positive_int, default=3, help="figure: label maps (rows)")
    p.add_argument("--te-steps", type=cli.positive_int, default=1000, help="text-encoder: U^P steps of each variant")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reproduce"]:  # its own command line; run by module name, as the stages are (it imports this one)
        return importlib.import_module("train.reproduce").main(argv[1:])
    p = get_parser()
    args = p.parse_args(argv)
    if args.out is None and not (args.command == "figure" and args.bundle):
        p.error(f"{args.command} needs --out")
    if args.command not in ("measure", "bound") and (args.maps != "measured" or args.generate_args or args.name):
        p.error(f"--maps, --generate-args and --name are options of measure and bound, not of {args.command}")
    if args.width != 1.0 and args.command not in ("train", "text-encoder"):
        p.error(f"--width sizes the U-Nets the recipe trains; {args.command} trains none (bound: the bundle's U-Net)")
    if args.command == "bound" and args.generate_args:
        p.error("bound sets the generation options itself (its ControlNet)")
    if args.command == "gate":
        return run_gate(args)
    if args.command == "measure":
        return run_measure(args)
    if args.command == "bound":
        return run_bound(args)
    if args.command == "figure":
        return run_figure(args)
    if args.command == "text-encoder":
        return run_text_encoder(args)
    return run_recipe(args)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
