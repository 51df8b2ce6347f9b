"""Train the SD U-Net: U^P -> U^S on the source domain (DGInStyle's DreamBooth step), or a
text-conditioned U-Net on captioned images, fine-tuned or from scratch (the prior U^P's role).

DGInStyle's step: every image under --data (recursive, *.png/*.jpg), the empty prompt, a random rescale from
{0.5, 0.75, 1, 1.25, 1.5, 2} then a random --resolution crop (padded by reflection when smaller),
ε-MSE with DDPM noising (t ~ U{0..999}); AdamW lr 2e-6 (betas 0.9/0.999, weight decay 1e-2,
eps 1e-8), constant schedule, gradient clipping at 1.0. Only the U-Net trains; the VAE and
text encoder are frozen in the compute dtype. The original ran batch 1 x accumulation 2,
30000 steps, fp16, gradient checkpointing.

Text-to-image (what diffusers' train_text_to_image.py users expect): --data FOLDER with a
metadata.jsonl ({"file_name": ..., "text": ...} per line; --caption-column) trains on those captions,
--proportion-empty-prompts of them dropped to "" (for classifier-free guidance). The parts come from
--base and can be replaced: --vae PATH / --text-encoder PATH (checkpoints), --unet-config /
--text-encoder-config (a preset name: mini, tiny, sd15, or JSON) for freshly initialised ones, i.e.
training from scratch. --train-text-encoder trains the text encoder too (--text-encoder-lr); a
contrastively pretrained one (train.train_text_encoder) is given with --text-encoder and stays frozen,
as SD's CLIP tower did. --lr-scheduler cosine with --lr-warmup-steps suits training from scratch.
--noise-offset (diffusers' name; off by default, as DGInStyle) adds a per-image, per-channel constant to
the training noise: SD's schedule leaves √ᾱ ≈ 0.07 of the image in its noisiest step, so without it a
model learns to read an image's overall colour off the start noise's mean, and prompts that differ in
colour (night, fog, snow) come out alike.
--snr-gamma G weights each sample's ε-MSE by min(SNR_t, G) / SNR_t (min-SNR-γ, diffusers' --snr_gamma),
so the nearly clean steps stop dominating the gradient; off by default (in the miniature world's U^P it
did not raise style-prompt accuracy: BENCHMARKS.md).

Single GPU:
    python -m train.finetune_unet --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data data/gta/images --output-dir runs/unet_s \\
        --batch-size 1 --grad-accum 2 --max-steps 30000 --gradient-checkpointing
N GPUs on one machine (batch and accumulation are per GPU; the effective batch is N x B x A):
    torchrun --standalone --nproc_per_node=N -m train.finetune_unet ...same arguments...
Resume (exact: same world size): add --resume auto (latest in OUTPUT/checkpoints) or --resume PATH.
Smoke run on CPU with a random tiny model (the images are noise):
    python -m train.finetune_unet --tiny --data some/images --output-dir /tmp/u --resolution 64 --max-steps 20
A text-to-image prior from scratch on a trained VAE and a pretrained text encoder (the miniature world's U^P):
    python -m train.finetune_unet --vae runs/vae/vae.safetensors --unet-config mini \
        --text-encoder runs/text_encoder/text_encoder.safetensors --data world/prior --resolution 64 --lr 1e-3 \
        --lr-scheduler cosine --proportion-empty-prompts 0.1 --noise-offset 0.1 --output-dir runs/prior

Outputs in --output-dir: log.txt, metrics.jsonl, checkpoints/step_*.pt (model, optimizer, scaler,
EMA, step, config, every rank's RNG state), samples/step_*.png (DDIM grids of --sample-prompt),
and at the end unet.safetensors (native), pipeline.safetensors (native: U-Net, VAE and text encoder),
diffusers/ (the whole pipeline with the new U-Net) and sd15_unet_s.safetensors (a CompVis single file).
With --ema the exports hold the EMA U-Net.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ldm import checkpoint as ckpt_io
from ldm.clip import CLIPTextModel
from ldm.config import config_from_text
from ldm import cli
from ldm.atomic import atomic_file
from ldm.sd import StableDiffusion
from ldm.unet import UNetModel
from mrlf.pipeline import Pipeline, SamplingSettings
from samplers import SD15, add_noise
from train import common
from train.data import (DREAMBOOTH_SCALES, METADATA_FILE, ImageDataset, LatentCache, diffusion_inputs,
                        fill_latent_cache, find_captioned_images, find_images, shard_loader)

SAMPLE_PROMPT = "road building sky person vegetation car"


def load_base(args) -> tuple[StableDiffusion, Path | None]:
    """The SD parts to start from (fp32 on CPU), and the pipeline folder they came from (if any).

    --base gives every part it holds; --vae / --text-encoder replace those by other checkpoints, and
    --unet-config / --text-encoder-config by freshly initialised networks (seeded by --seed)."""
    if args.tiny:
        return StableDiffusion.random("tiny", seed=args.seed), None
    parts, folder = {}, None
    if args.base:
        path = ckpt_io.resolve_path(args.base)
        wanted = [n for n, fresh in (("unet", args.unet_config), ("vae", args.vae),
                                     ("text_encoder", args.text_encoder or args.text_encoder_config)) if not fresh]
        parts = ckpt_io.load_components(path, dtype=torch.float32, device="cpu", components=wanted) if wanted else {}
        folder = path if path.is_dir() and (path / "model_index.json").is_file() else None
    if args.vae:
        parts["vae"] = ckpt_io.load_vae(args.vae, dtype=torch.float32)
    if args.text_encoder:
        parts["text_encoder"] = ckpt_io.load_text_encoder(args.text_encoder, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        if args.text_encoder_config:
            parts["text_encoder"] = CLIPTextModel(config_from_text("text_encoder", args.text_encoder_config))
        if args.unet_config:
            parts["unet"] = UNetModel(config_from_text("unet", args.unet_config))
    missing = [n for n in ("unet", "vae", "text_encoder") if n not in parts]
    if missing:
        raise SystemExit(f"no {', '.join(missing)}: pass --base (a pipeline folder, a CompVis single file or our "
                         f"native pipeline file), or --vae / --text-encoder checkpoints and --unet-config / "
                         f"--text-encoder-config for fresh networks")
    unet, te = parts["unet"], parts["text_encoder"]
    if unet.cfg.context_dim != te.cfg.width:
        raise SystemExit(f"the U-Net's context_dim {unet.cfg.context_dim} != the text encoder's width {te.cfg.width}")
    return StableDiffusion(unet, parts["vae"], te), folder


def lr_factor(step: int, args) -> float:
    """The learning-rate multiplier at `step`: linear warm-up, then constant or cosine decay to 0."""
    if step < args.lr_warmup_steps:
        return (step + 1) / args.lr_warmup_steps
    if args.lr_scheduler == "constant":
        return 1.0
    frac = (step - args.lr_warmup_steps) / max(1, args.max_steps - args.lr_warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def diffusion_loss(unet, z0, noise, t, context, snr_gamma: float = 0.0) -> torch.Tensor:
    """ε-prediction MSE at DDPM-noised latents x_t = √ᾱ_t z0 + √(1-ᾱ_t) ε: the mean over all elements,
    or with `snr_gamma` > 0 each sample's mean weighted by min(SNR_t, γ) / SNR_t (min-SNR-γ, Hang et al.
    2023, as diffusers' ``--snr_gamma``; SNR_t = ᾱ_t / (1 - ᾱ_t))."""
    x_t = add_noise(z0, noise, t, SD15)
    eps = unet(x_t, t, context)
    if not snr_gamma:
        return F.mse_loss(eps.float(), noise.float())
    ac = SD15.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=tuple(range(1, eps.dim())))
    return (per_sample * snr.clamp(max=snr_gamma) / snr).mean()


class TrainedParts(torch.nn.Module):
    """What trains, as one module for one DDP wrapper: the U-Net and, with `train_text_encoder`, the
    text encoder. forward(z0, noise, t, ids) -> the loss. A frozen text
    encoder is held outside the module tree (not in the state dict, not in DDP) and runs without autograd."""

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel, train_text_encoder: bool,
                 snr_gamma: float = 0.0):
        super().__init__()
        self.unet, self.snr_gamma = unet, snr_gamma
        if train_text_encoder:
            self.text_encoder = text_encoder
        else:
            self.__dict__["frozen_text_encoder"] = text_encoder

    def forward(self, z0, noise, t, ids):
        if "text_encoder" in self._modules:
            context = self.text_encoder(ids)
        else:
            with torch.no_grad():
                context = self.frozen_text_encoder(ids)
        return diffusion_loss(self.unet, z0, noise, t, context.float(), self.snr_gamma)


@torch.no_grad()
def sample_grid(sd: StableDiffusion, unet, prompts: list[str], n: int, resolution: int, steps: int, seed: int, amp,
                text_encoder=None):
    """n DDIM samples of each prompt (CFG 7.5, seeds seed..seed+n-1) with `unet`, as one PIL grid (a row
    per prompt)."""
    te = text_encoder if text_encoder is not None else sd.text_encoder
    was = unet.training, te.training
    unet.eval()
    te.eval()
    try:
        view = StableDiffusion(unet, sd.vae, te, sd.tokenizer)
        with amp:
            images = Pipeline(view).generate([p for p in prompts for _ in range(n)], height=resolution,
                                             width=resolution, seeds=list(range(seed, seed + n)) * len(prompts),
                                             settings=SamplingSettings(steps=steps))
    finally:
        unet.train(was[0])
        te.train(was[1])
    return common.image_grid(images, ncols=n)


def export(args, unet, sd: StableDiffusion, base_folder: Path | None, out: Path, log) -> None:
    common.check_finite(unet.state_dict(), "the U-Net to export")
    dtype = ckpt_io.DTYPES[args.export_dtype]
    unet = unet.to("cpu", torch.float32).eval()
    vae = sd.vae.to("cpu", torch.float32)
    te = sd.text_encoder.to("cpu", torch.float32).eval()
    p = ckpt_io.save_native(out / "unet.safetensors", unet, dtype=dtype, overwrite=True)
    log.info(f"exported the U-Net (native): {p}")
    p = ckpt_io.save_native(out / "pipeline.safetensors", {"unet": unet, "vae": vae, "text_encoder": te},
                            dtype=dtype, overwrite=True)
    log.info(f"exported the pipeline with the new U-Net (native, one file): {p}")
    copy_dirs = [base_folder / "tokenizer"] if base_folder is not None and (base_folder / "tokenizer").is_dir() else []
    p = ckpt_io.save_diffusers(out / "diffusers", {"unet": unet, "vae": vae, "text_encoder": te}, dtype=dtype,
                               overwrite=True, copy_dirs=copy_dirs)
    log.info(f"exported the pipeline with the new U-Net (diffusers layout): {p}"
             + ("" if copy_dirs else " (no tokenizer/ folder in the base: add one for diffusers' from_pretrained)"))
    p = ckpt_io.save_compvis(out / "sd15_unet_s.safetensors", {"unet": unet, "vae": vae, "text_encoder": te},
                             dtype=dtype, overwrite=True)
    log.info(f"exported a CompVis single file: {p}")


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    if d.device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        log.warning("=" * 72 + "\n--tiny: a RANDOMLY INITIALISED tiny model, not SD-1.5. For tests and smoke runs "
                    "only; nothing it learns or exports is useful.\n" + "=" * 72)
    elif not (args.base or (args.unet_config and args.vae and (args.text_encoder or args.text_encoder_config))):
        raise SystemExit("pass --base PATH (SD-1.5 weights: pipeline folder, CompVis file, native file), or --vae, "
                         "--unet-config and --text-encoder / --text-encoder-config, or --tiny")

    # Models: the U-Net (and with --train-text-encoder the text encoder) trains in fp32 (master
    # weights) under autocast; the VAE (and otherwise the text encoder) is frozen in the compute dtype.
    sd, base_folder = load_base(args)
    unet = sd.unet.to(d.device, torch.float32).train()
    common.requires_grad(unet, True)
    unet.gradient_checkpointing = args.gradient_checkpointing
    common.requires_grad(sd.vae.to(d.device, amp_dtype).eval(), False)
    te = sd.text_encoder
    if args.train_text_encoder:
        common.requires_grad(te.to(d.device, torch.float32).train(), True)
    else:
        common.requires_grad(te.to(d.device, amp_dtype).eval(), False)
    trained = TrainedParts(unet, te, args.train_text_encoder, args.snr_gamma)
    ema = common.requires_grad(copy.deepcopy(unet).eval(), False) if args.ema else None
    model = (DDP(trained, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
             if d.distributed else trained)
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if args.train_text_encoder:
        groups.append({"params": list(te.parameters()), "lr": args.text_encoder_lr or args.lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
                            eps=args.adam_eps)
    scaler = common.grad_scaler(d.device, amp_dtype)
    log.info(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters"
             + (f"; text encoder (trained): {sum(p.numel() for p in te.parameters()) / 1e6:.2f} M"
                if args.train_text_encoder else ""))

    step, position = 0, 0  # optimizer steps; items this rank has drawn from its sampler stream
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=unet, optimizer=opt, scaler=scaler,
                                     ema=ema, config=vars(args), fixed=("train_text_encoder",))
    if state is not None:
        step, position = state["step"], state.get("sampler", {}).get("position", 0)
        if args.train_text_encoder:
            te.load_state_dict(state["text_encoder"])
        del state

    # Data: per-item randomness from (seed, rank, epoch, index); the sampler restarts where the
    # previous run stopped, so a resumed run sees exactly the items an uninterrupted one would.
    captions = None
    if (Path(args.data) / METADATA_FILE).is_file():
        files, captions = find_captioned_images(args.data, args.caption_column)
        log.info(f"captions from {Path(args.data) / METADATA_FILE} (column {args.caption_column!r})")
    else:
        files = find_images(args.data)
    scales = tuple(args.scales)
    cache = None
    if args.cache_latents:
        cache = LatentCache.for_vae(args.cache_latents, sd.vae)
    dataset = ImageDataset(files, args.resolution, scales, "center" if args.center_crop else "random",
                           caption=args.prompt, seed=args.seed, rank=d.rank, cache=cache, captions=captions,
                           proportion_empty=args.proportion_empty_prompts, flip=args.random_flip)
    if cache is not None:
        fill_latent_cache(dataset, sd.vae, d.device, d.rank, d.world_size, logger=log)
    per_step = args.batch_size * args.grad_accum
    loader = shard_loader(dataset, args.batch_size, d.rank, d.world_size, args.seed, position, args.num_workers,
                          pin_memory=d.device.type == "cuda")
    log.info(f"{len(dataset)} images under {args.data}; {args.batch_size} x {args.grad_accum} per rank and step, "
             f"{per_step * d.world_size} per step in all")

    amp = common.autocast(d.device, amp_dtype)
    batches = iter(loader)
    meter = common.Meter(step)
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_steps, d)
    descs = []
    while step < args.max_steps:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, args)
        for micro in range(args.grad_accum):
            batch = next(batches)
            position += args.batch_size
            descs = batch["desc"]
            z0, noise, t = diffusion_inputs(batch, sd.vae, d.device, noise_offset=args.noise_offset)
            ids = sd.tokenizer(list(batch["caption"])).to(d.device)
            with common.no_sync(model, sync=micro == args.grad_accum - 1):
                with amp:
                    loss = model(z0, noise, t, ids)
                scaler.scale(loss / args.grad_accum).backward()
            meter.add(loss=loss)
        grad_norm = common.optimizer_step(opt, scaler, [p for g in groups for p in g["params"]], args.max_grad_norm)
        step += 1
        guard.check(grad_norm, step)
        if ema is not None:
            common.update_ema(ema, unet, args.ema_decay)
        progress.update()

        if step % args.log_every == 0 or step == args.max_steps:
            metrics = meter.means(d) | {"grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                                        "samples_per_s": meter.samples_per_s(step, per_step * d.world_size),
                                        "samples": common.gather_objects(list(descs), d)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)

        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps) and d.is_main:
            grid = sample_grid(sd, ema if ema is not None else unet, args.sample_prompt, args.num_samples,
                               args.resolution, args.sample_steps, args.seed, amp, te)
            with atomic_file(out / "samples" / f"step_{step:07d}.png") as tmp:
                grid.save(tmp, format="PNG")
            if tb is not None:
                import numpy as np
                tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")

        if step % args.ckpt_every == 0 or step == args.max_steps:
            state = {"model": unet.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "text_encoder": te.state_dict() if args.train_text_encoder else None,
                     "ema": ema.state_dict() if ema is not None else None, "config": vars(args),
                     "sampler": {"position": position, "world_size": d.world_size},
                     "arch": unet.cfg.to_dict()}
            path = common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)
            log.info(f"saved {path}")

    progress.close()
    if d.is_main and args.export:
        export(args, ema if ema is not None else unet, sd, base_folder, out, log)
    common.finish_run(log, tb)


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.finetune_unet", __doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--base", help="SD-1.5 weights: a diffusers pipeline folder, a CompVis single file, our native file, "
                                  "or a model id in the local HF cache")
    g.add_argument("--tiny", action="store_true", help="random tiny model instead of --base (tests, smoke runs)")
    g.add_argument("--data", required=True, help="folder of training images (searched recursively), or an image "
                                                 f"folder with captions in {METADATA_FILE}")
    g.add_argument("--caption-column", default="text", help=f"the caption key of {METADATA_FILE}")
    g.add_argument("--proportion-empty-prompts", type=cli.fraction, default=0.0,
                   help="share of captions replaced by the empty prompt (for classifier-free guidance)")
    g.add_argument("--random-flip", action="store_true", help="flip images horizontally with probability 1/2")
    g.add_argument("--noise-offset", type=cli.non_negative, default=0.0,
                   help="offset noise: this times a per-channel constant N(0, 1) added to the training noise, so "
                        "the model learns to choose an image's overall colour and brightness from the prompt "
                        "(0.1 is common; 0: off, as the original)")
    g.add_argument("--snr-gamma", type=cli.non_negative, default=0.0,
                   help="min-SNR-γ loss weighting: each sample's ε-MSE times min(SNR, γ) / SNR, so the nearly clean "
                        "steps stop dominating the gradient (5 is the paper's choice; 0: off, the plain mean)")
    g.add_argument("--vae", help="the VAE from this checkpoint instead of --base's")
    g.add_argument("--text-encoder", help="the text encoder from this checkpoint instead of --base's")
    g.add_argument("--unet-config", help="a freshly initialised U-Net of this config (preset name or JSON) "
                                         "instead of --base's: training from scratch")
    g.add_argument("--text-encoder-config", help="a freshly initialised text encoder of this config")
    g.add_argument("--train-text-encoder", action="store_true", help="train the text encoder with the U-Net")
    g.add_argument("--text-encoder-lr", type=cli.positive, help="its learning rate (default: --lr)")
    g.add_argument("--resolution", type=cli.integer(8), default=512, help="training crop side in pixels")
    g.add_argument("--scales", type=cli.positive, nargs="+", default=list(DREAMBOOTH_SCALES),
                   help="random rescale ratios applied before the crop")
    g.add_argument("--center-crop", action="store_true", help="centre crop instead of a random crop")
    g.add_argument("--prompt", default="", help="instance prompt (DGInStyle: empty)")
    g.add_argument("--cache-latents", metavar="DIR",
                   help="cache VAE moments in DIR (needs a single --scales; random crops snap to the latent grid and "
                        "flips read a mirrored entry, see train.data)")
    g = common.add_diffusion_optimisation(p, batch_size=1, grad_accum=2, max_steps=30000, lr=2e-6)
    g.add_argument("--lr-scheduler", choices=("constant", "cosine"), default="constant",
                   help="constant after the warm-up, or a cosine decay to 0")
    g.add_argument("--lr-warmup-steps", type=cli.non_negative_int, default=0, help="linear warm-up steps")
    g = common.add_run_arguments(p, num_workers=2, log_every=10, ckpt_every=1000, keep_last=3)
    g.add_argument("--sample-every", type=cli.non_negative_int, default=200,
                   help="optimizer steps between sample grids (0: none)")
    g.add_argument("--sample-prompt", nargs="+", default=[SAMPLE_PROMPT], help="one grid row per prompt")
    g.add_argument("--sample-steps", type=cli.positive_int, default=25, help="DDIM steps of the sample grids")
    g.add_argument("--num-samples", type=cli.positive_int, default=4, help="images per sample grid")
    g.add_argument("--no-export", dest="export", action="store_false", help="skip the final exports")
    g.add_argument("--export-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the exports")
    return p


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, get_parser().parse_args(argv))))
