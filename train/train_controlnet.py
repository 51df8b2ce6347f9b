"""Train DGInStyle's label ControlNet on the frozen source U-Net U^S (its controlnet/train.py).

The ControlNet starts as a copy of U^S's encoder half (ControlNet.from_unet: hint encoder
default-initialised, zero convs zero) or from --controlnet PATH; U^S, the VAE and the text encoder
are frozen and cast to the compute dtype. Data: --resolution crops of (image, trainId label),
placed by rare-class sampling (seeded per rank and item, so ranks differ; the original's draws were
the same on every rank), captioned
with the crop's class stack ("road sidewalk ... car"; --caption-template words it otherwise, e.g. with a
style word from each row of a .jsonl dataset file), with the label as a 20-channel one-hot hint
(19 classes + void). ε-MSE, AdamW lr 1e-5 (0.9/0.999, wd 1e-2, eps 1e-8), constant schedule,
clipping at 1.0. --proportion-empty-prompts replaces that share of captions by "" (really; the
original parsed and ignored it). --residual-penalty λ adds λ times the residuals' mean square to the
loss (not in the original): a ControlNet trained freely on a small U-Net learns residuals that outweigh
the U-Net's own features, and carries the source's colours with the layout into the swapped-in U^P; the
penalty makes it say the layout with less, and U^P keeps more of its style (BENCHMARKS.md, the
miniature world). --freeze is the original's partial_freeze_expid: ``encoder`` (1) trains only the hint
encoder and the zero convolutions, the encoder half staying as it starts (U^S's copy, or --controlnet's);
``encoder-but-first`` (2) also trains the first resolution level (diffusers' down_blocks[0]),
``encoder-but-middle`` (3) the middle block; a resumed run keeps its checkpoint's mode. Validation
renders the same labels with this ControlNet on U^S and, with --prior PATH, swapped onto U^P (the Style
Swap check the original skipped: its --inference_basemodel_path was unused).

Single GPU (the original: batch 2 x accumulation 4):
    python -m train.train_controlnet --base runs/unet_s/diffusers --prior stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data data/gta --output-dir runs/controlnet --batch-size 2 --grad-accum 4 --max-steps 100000
N GPUs on one machine (batch and accumulation are per GPU):
    torchrun --standalone --nproc_per_node=N -m train.train_controlnet ...same arguments...
Resume (exact: same world size): add --resume auto or --resume PATH.
--data takes a GTA root (images/ + labels/*_labelTrainIds.png), a Cityscapes root, a paired folder
(--layout paired), the original's dataset file (.jsonl) or any other trainId layout of
segmentation/datasets.py (--layout NAME).
Smoke run on CPU with random tiny models:
    python -m train.train_controlnet --tiny --data some/paired_root --layout paired --output-dir /tmp/cn \\
        --resolution 64 --max-steps 20

Outputs in --output-dir: log.txt, metrics.jsonl, label_stats.json (pixels seen per class, all ranks),
checkpoints/step_*.pt, validation/step_*.png (rows: label | U^S images | U^P images), and at the end
controlnet.safetensors (native) and controlnet/ (a diffusers ControlNetModel folder). With --ema the
exports hold the EMA weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from controlnet.checkpoint import load_controlnet, save_controlnet
from controlnet.model import ControlNet
from ldm import checkpoint as ckpt_io
from ldm import cli
from ldm.atomic import atomic_file, write_text
from ldm.sd import StableDiffusion
from mrlf.pipeline import Pipeline, SamplingSettings
from samplers import SD15, add_noise
from segmentation.labels import CLASS_NAMES, IGNORE, NUM_CHANNELS, colorize, load_label, one_hot, train_id_path
from train import common
from train.data import (CITYSCAPES_RATIOS, CLASSES_FIELD, LAYOUTS, ControlNetDataset, LatentCache, center_box,
                        diffusion_inputs, discover_pairs, fill_latent_cache, format_caption, pad_to, pair_class_stats,
                        shard_loader, template_fields)


def hint_blocks(widths, latent_factor: int) -> tuple[int, ...]:
    """The hint encoder's widths: `widths` if given (checked against the VAE's downsampling), else
    DGInStyle's (16, 32, 96, 256) cut to log2(latent_factor) + 1 entries."""
    stages = int(latent_factor).bit_length() - 1
    if widths is None:
        widths = (16, 32, 96, 256, 256, 256)[:stages + 1]
    if len(widths) != stages + 1:
        raise SystemExit(f"--hint-block-channels {list(widths)}: the VAE downsamples {latent_factor}x, so the hint "
                         f"encoder needs {stages} stride-2 stages, i.e. {stages + 1} widths")
    return tuple(int(w) for w in widths)


def load_base(args) -> StableDiffusion:
    """U^S with its VAE and text encoder, fp32 on CPU."""
    if args.tiny:
        return StableDiffusion.random("tiny", seed=args.seed)
    parts = ckpt_io.load_components(ckpt_io.resolve_path(args.base), dtype=torch.float32, device="cpu")
    missing = [n for n in ("unet", "vae", "text_encoder") if n not in parts]
    if missing:
        raise SystemExit(f"--base {args.base}: holds no {', '.join(missing)}; pass U^S as a pipeline folder, "
                         f"CompVis file or native pipeline file")
    return StableDiffusion(parts["unet"], parts["vae"], parts["text_encoder"])


# --freeze: the original's partial_freeze_expid 1, 2, 3 -> the part of the copied encoder half left trainable
FREEZE_MODES = {"none": None, "encoder": (), "encoder-but-first": ("first",), "encoder-but-middle": ("middle",)}


def freeze(controlnet: ControlNet, mode: str) -> int:
    """Freeze the copied encoder half (time embedding, every input block, middle block) as --freeze
    `mode` says; the hint encoder and the zero convolutions always train. Returns the number of frozen
    tensors. The first level is what diffusers calls down_blocks[0]: its res/attention blocks and its
    downsampler, not the input convolution (conv_in), which stays frozen."""
    keep = FREEZE_MODES[mode]
    if keep is None:
        return 0
    cfg = controlnet.cfg
    downsampler = 1 if len(cfg.channels) > 1 else 0  # the last level has none
    first_level = range(1, 1 + cfg.num_res_blocks + downsampler)  # input_blocks[0] is conv_in
    frozen = [controlnet.time_embed, controlnet.input_blocks[0]]
    frozen += [b for i, b in enumerate(controlnet.input_blocks) if i and not ("first" in keep and i in first_level)]
    if "middle" not in keep:
        frozen.append(controlnet.middle_block)
    return sum(len(list(common.requires_grad(m, False).parameters())) for m in frozen)


def controlnet_loss(controlnet, unet, z0, noise, t, context, hint, residual_penalty: float = 0.0) -> torch.Tensor:
    """ε-MSE of the frozen U-Net steered by the ControlNet's residuals at x_t = √ᾱ_t z0 + √(1-ᾱ_t) ε,
    plus `residual_penalty` times the residuals' energy (`residual_energy`)."""
    x_t = add_noise(z0, noise, t, SD15)
    control = controlnet(x_t, hint, t, context)
    eps = unet(x_t, t, context, control=control)  # residuals are cast to the U-Net's dtype there
    loss = F.mse_loss(eps.float(), noise.float())
    return loss + residual_penalty * residual_energy(control) if residual_penalty else loss


def residual_energy(control: list[torch.Tensor]) -> torch.Tensor:
    """The mean over the ControlNet's residuals of each one's mean square."""
    return torch.stack([c.float().pow(2).mean() for c in control]).mean()


def validation_labels(args, pairs) -> tuple[list[np.ndarray], list[dict]]:
    """Centre crops (padded with 255) of --validation-labels (trainId PNGs, or a .jsonl file whose
    conditioning_image labels are read as trainIds), else of the first training labels; and the
    caption template's fields of each (a .jsonl row's keys; none for PNGs)."""
    paths, fields = [], []
    for v in args.validation_labels or []:
        v = Path(v)
        if v.suffix in (".json", ".jsonl"):
            for line in v.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    c = Path(row["conditioning_image"])
                    c = c if c.is_absolute() or c.exists() else v.parent / c
                    paths.append(c if c.name.endswith("_labelTrainIds.png") else train_id_path(c))
                    fields.append(row)
        else:
            paths.append(v)
            fields.append({})
    if not paths:
        paths = [p.label for p in pairs[: args.num_validation]]
        fields = [p.fields for p in pairs[: args.num_validation]]
    needed = set(template_fields(args.caption_template)) - {CLASSES_FIELD}
    for p, f in zip(paths, fields):
        if needed - set(f):
            raise SystemExit(f"--caption-template {args.caption_template!r} needs {sorted(needed - set(f))} for the "
                             f"validation label {p}: pass --validation-labels as a .jsonl file with those keys")
    r = args.resolution
    out = []
    for p in paths:
        lab = pad_to(load_label(p), r, IGNORE)
        x1, y1 = center_box(*lab.shape, r)
        out.append(np.ascontiguousarray(lab[y1:y1 + r, x1:x1 + r]))
    return out, fields


@torch.no_grad()
def validate(sd, prior_unet, controlnet, labels, fields, args, amp):
    """One grid row per label: colour label | images on U^S | images on U^P (Style Swap), each prompted
    with its training caption (empty for a crop without any class)."""
    was_training = controlnet.training
    controlnet.eval()
    prompts = [format_caption(args.caption_template, lab, f) for lab, f in zip(labels, fields)]
    k, r = args.validation_images, args.resolution
    seeds = list(range(args.seed, args.seed + k * len(labels)))
    settings = SamplingSettings(steps=args.validation_steps)
    rows = []
    try:
        with amp:
            runs = [Pipeline(sd, controlnet).generate(prompts, np.stack(labels), height=r, width=r,
                                                      images_per_prompt=k, seeds=seeds, settings=settings)]
            if prior_unet is not None:
                swapped = StableDiffusion(prior_unet, sd.vae, sd.text_encoder, sd.tokenizer)
                runs.append(Pipeline(swapped, controlnet).generate(prompts, np.stack(labels), height=r, width=r,
                                                                   images_per_prompt=k, seeds=seeds,
                                                                   settings=settings))
    finally:
        controlnet.train(was_training)
    for i, lab in enumerate(labels):
        rows.append(Image.fromarray(colorize(lab)))
        for images in runs:
            rows.extend(images[i * k:(i + 1) * k])
    return common.image_grid(rows, ncols=1 + k * len(runs)), prompts


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    if d.device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        log.warning("=" * 72 + "\n--tiny: RANDOMLY INITIALISED tiny models, not U^S / SD-1.5. For tests and smoke "
                    "runs only; nothing it learns or exports is useful.\n" + "=" * 72)
    elif not args.base:
        raise SystemExit("pass --base PATH (U^S: pipeline folder, CompVis file or native pipeline file) or --tiny")

    # Models. The ControlNet trains in fp32 under autocast; U^S, VAE and text encoder are frozen in
    # the compute dtype (as the original's weight_dtype).
    sd = load_base(args)
    if args.controlnet:
        controlnet = load_controlnet(args.controlnet, dtype=torch.float32)
        if controlnet.control_cfg.unet != sd.unet.cfg:
            raise SystemExit(f"--controlnet {args.controlnet}: its U-Net config does not match --base's U-Net")
        if controlnet.control_cfg.hint_channels != NUM_CHANNELS:
            raise SystemExit(f"--controlnet {args.controlnet}: takes {controlnet.control_cfg.hint_channels}-channel "
                             f"hints; label training feeds {NUM_CHANNELS} (19 classes + void)")
        log.info(f"ControlNet initialised from {args.controlnet}")
    else:
        controlnet = ControlNet.from_unet(sd.unet, hint_channels=NUM_CHANNELS,
                                          hint_block_channels=hint_blocks(args.hint_block_channels, sd.latent_factor))
        log.info("ControlNet initialised from U^S's encoder half (zero convs zero)")
    controlnet = common.requires_grad(controlnet.to(d.device, torch.float32).train(), True)
    frozen = freeze(controlnet, args.freeze)
    controlnet.gradient_checkpointing = args.gradient_checkpointing
    for m in (sd.unet, sd.vae, sd.text_encoder):
        common.requires_grad(m.to(d.device, amp_dtype).eval(), False)
    # The frozen U-Net needs train mode for its checkpointing to engage (it has no dropout or other
    # train-mode behaviour); gradients still flow through it to the ControlNet's residuals.
    sd.unet.gradient_checkpointing = args.gradient_checkpointing
    sd.unet.train(args.gradient_checkpointing)
    prior = None
    if args.prior:
        prior = common.requires_grad(ckpt_io.load_unet(ckpt_io.resolve_path(args.prior), dtype=amp_dtype,
                                                       device=d.device).eval(), False)
        if prior.cfg != sd.unet.cfg:
            raise SystemExit(f"--prior {args.prior}: its U-Net config does not match --base's U-Net")
    ema = common.requires_grad(copy.deepcopy(controlnet).eval(), False) if args.ema else None
    model = (DDP(controlnet, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
             if d.distributed else controlnet)
    trainable = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay, eps=args.adam_eps)
    scaler = common.grad_scaler(d.device, amp_dtype)
    log.info(f"ControlNet: {sum(p.numel() for p in controlnet.parameters()) / 1e6:.1f} M parameters"
             + (f", {sum(p.numel() for p in trainable) / 1e6:.2f} M trained (--freeze {args.freeze}: "
                f"{frozen} tensors frozen)" if frozen else ""))

    step, position = 0, 0  # optimizer steps; items this rank has drawn from its sampler stream
    label_totals = torch.zeros(len(CLASS_NAMES) + 1, dtype=torch.float64)  # + void; all ranks, previous runs
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=controlnet, optimizer=opt,
                                     scaler=scaler, ema=ema, config=vars(args), fixed=("freeze",))
    if state is not None:
        step, position = state["step"], state.get("sampler", {}).get("position", 0)
        label_totals = state.get("label_totals", label_totals).double()
        del state

    # Data
    layout, pairs = discover_pairs(args.data, args.layout, args.split)
    ratios = tuple(args.resize_ratios) if args.resize_ratios else (CITYSCAPES_RATIOS if layout == "cityscapes" else (1.0,))
    stats = None
    if args.crop == "rcs":
        with common.main_process_first(d):  # rank 0 counts (and caches) the label statistics
            stats = pair_class_stats(pairs, cache_dir=out / "rcs_cache")
    cache = LatentCache.for_vae(args.cache_latents, sd.vae) if args.cache_latents else None
    dataset = ControlNetDataset(pairs, args.resolution, args.crop, seed=args.seed, rank=d.rank, stats=stats,
                                rcs_temperature=args.rcs_temperature, rcs_min_pixels=args.rcs_min_pixels,
                                rcs_tries=args.rcs_tries, rcs_min_crop_ratio=args.rcs_min_crop_ratio,
                                resize_ratios=ratios, proportion_empty_prompts=args.proportion_empty_prompts,
                                cache=cache, caption_template=args.caption_template)
    if cache is not None:
        fill_latent_cache(dataset, sd.vae, d.device, d.rank, d.world_size, logger=log)
    per_step = args.batch_size * args.grad_accum
    loader = shard_loader(dataset, args.batch_size, d.rank, d.world_size, args.seed, position, args.num_workers,
                          pin_memory=d.device.type == "cuda")
    log.info(f"{len(pairs)} pairs ({layout} layout) from {args.data}; crop {args.crop}, resize ratios {ratios}; "
             f"{args.batch_size} x {args.grad_accum} per rank and step, {per_step * d.world_size} per step in all")
    val_labels, val_fields = validation_labels(args, pairs) if d.is_main and args.validation_every else ([], [])

    amp = common.autocast(d.device, amp_dtype)
    batches = iter(loader)
    meter = common.Meter(step)
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_steps, d)
    label_counts = torch.zeros(256, dtype=torch.int64, device=d.device)
    descs = []
    while step < args.max_steps:
        for micro in range(args.grad_accum):
            batch = next(batches)
            position += args.batch_size
            descs = batch["desc"]
            z0, noise, t = diffusion_inputs(batch, sd.vae, d.device)
            labels = batch["label"].to(d.device, non_blocking=True)
            label_counts += torch.bincount(labels.flatten(), minlength=256)
            hint = one_hot(labels)  # (B, 20, H, W): 19 classes + void
            with torch.no_grad():
                context = sd.text_encoder(sd.tokenizer(list(batch["caption"])).to(d.device))
            with common.no_sync(model, sync=micro == args.grad_accum - 1):
                with amp:
                    loss = controlnet_loss(model, sd.unet, z0, noise, t, context, hint, args.residual_penalty)
                scaler.scale(loss / args.grad_accum).backward()
            meter.add(loss=loss)
        grad_norm = common.optimizer_step(opt, scaler, controlnet.parameters(), args.max_grad_norm)
        step += 1
        guard.check(grad_norm, step)
        if ema is not None:
            common.update_ema(ema, controlnet, args.ema_decay)
        progress.update()

        if step % args.log_every == 0 or step == args.max_steps:
            metrics = meter.means(d) | {"grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                                        "samples_per_s": meter.samples_per_s(step, per_step * d.world_size),
                                        "samples": common.gather_objects(list(descs), d)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)

        if args.validation_every and (step % args.validation_every == 0 or step == args.max_steps) and d.is_main:
            grid, prompts = validate(sd, prior, ema if ema is not None else controlnet, val_labels, val_fields, args,
                                     amp)
            log.info(f"validation grid at step {step}: prompts {prompts}")
            with atomic_file(out / "validation" / f"step_{step:07d}.png") as tmp:
                grid.save(tmp, format="PNG")
            if tb is not None:
                tb.add_image("validation", np.asarray(grid), step, dataformats="HWC")

        if step % args.ckpt_every == 0 or step == args.max_steps:
            counts = label_counts.double()
            if d.distributed:
                torch.distributed.all_reduce(counts)
            totals = label_totals + torch.cat([counts[:len(CLASS_NAMES)], counts[IGNORE:IGNORE + 1]]).cpu()
            state = {"model": controlnet.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "config": vars(args),
                     "sampler": {"position": position, "world_size": d.world_size},
                     "arch": controlnet.control_cfg.to_dict(), "label_totals": totals}
            path = common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)
            if d.is_main:
                names = list(CLASS_NAMES) + ["others"]
                write_text(out / "label_stats.json", json.dumps(
                    {"step": step, "pixels": {n: int(v) for n, v in zip(names, totals.tolist())}}, indent=1) + "\n")
            log.info(f"saved {path}")

    progress.close()
    if d.is_main and args.export:
        final = (ema if ema is not None else controlnet).to("cpu", torch.float32).eval()
        common.check_finite(final.state_dict(), "the ControlNet to export")
        dtype = ckpt_io.DTYPES[args.export_dtype]
        p = save_controlnet(out / "controlnet.safetensors", final, "native", dtype=dtype, overwrite=True)
        log.info(f"exported {p} (native)")
        p = save_controlnet(out / "controlnet", final, "diffusers", dtype=dtype, overwrite=True)
        log.info(f"exported {p} (diffusers ControlNetModel folder)")
    common.finish_run(log, tb)


def caption_template(value: str) -> str:
    """--caption-template: a str.format template with plain field names."""
    try:
        template_fields(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.train_controlnet", __doc__)
    g = p.add_argument_group("models")
    g.add_argument("--base", help="U^S (fine-tuned SD-1.5): pipeline folder, CompVis file, native pipeline file")
    g.add_argument("--tiny", action="store_true", help="random tiny models instead of --base (tests, smoke runs)")
    g.add_argument("--prior", help="U^P for the Style Swap validation (any layout ldm.checkpoint reads)")
    g.add_argument("--controlnet", help="initial ControlNet weights (default: a copy of U^S's encoder half)")
    g.add_argument("--hint-block-channels", type=int, nargs="+",
                   help="widths of a new ControlNet's hint encoder, one stride-2 stage per width after the first "
                        "(default: DGInStyle's 16 32 96 256 for SD's 8x VAE, its first k+1 for a 2^k x VAE)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset root or .jsonl dataset file")
    g.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="a layout of segmentation.datasets with trainId labels; auto: gta, cityscapes or jsonl by "
                        "what --data holds")
    g.add_argument("--split", default="train", help="split of the split-based layouts (cityscapes, mapillary, ...)")
    g.add_argument("--resolution", type=cli.integer(8), default=512, help="training crop side in pixels")
    g.add_argument("--crop", choices=("rcs", "random", "center"), default="rcs",
                   help="rcs: rare-class sampling; center: the original's default without RCS")
    g.add_argument("--rcs-temperature", type=cli.positive, default=0.01, help="rare-class sampling temperature")
    g.add_argument("--rcs-min-pixels", type=cli.non_negative_int, default=3000,
                   help="files eligible for class c: > this many pixels of c")
    g.add_argument("--rcs-tries", type=cli.positive_int, default=1,
                   help="crop placements per item (1: the original, no check)")
    g.add_argument("--rcs-min-crop-ratio", type=cli.fraction, default=0.01,
                   help="with --rcs-tries > 1: accept a crop with more than this fraction of class-c pixels")
    g.add_argument("--resize-ratios", type=cli.positive, nargs="+",
                   help="random rescale ratios (default: 1.0; Cityscapes: 0.5 0.75 1 1.25 1.5)")
    g.add_argument("--proportion-empty-prompts", type=cli.fraction, default=0.0, help="caption dropout probability")
    g.add_argument("--caption-template", type=caption_template, default="{classes}",
                   help="the training caption: {classes} is the crop's class stack (the original's caption), any "
                        "other {key} that key of the .jsonl dataset file's row, e.g. \"A city street scene with "
                        "{classes}, in {weather} weather.\" for data labelled with weather words")
    g.add_argument("--cache-latents", metavar="DIR",
                   help="cache VAE moments in DIR (needs one resize ratio; random and RCS crops snap to the latent "
                        "grid, see train.data)")
    g = common.add_diffusion_optimisation(p, batch_size=2, grad_accum=4, max_steps=100000, lr=1e-5)
    g.add_argument("--residual-penalty", type=cli.non_negative, default=0.0,
                   help="weight of the residuals' mean square in the loss (0: none, the original); the logged "
                        "loss includes it")
    g.add_argument("--freeze", choices=tuple(FREEZE_MODES), default="none",
                   help="keep the copied encoder half as it starts (the original's partial_freeze_expid): "
                        "encoder (1) trains the hint encoder and zero convs only; encoder-but-first (2) also the "
                        "first resolution level; encoder-but-middle (3) also the middle block")
    g = common.add_run_arguments(p, num_workers=4, log_every=10, ckpt_every=2000, keep_last=3)
    g.add_argument("--validation-every", type=cli.non_negative_int, default=1000,
                   help="optimizer steps between validation grids (0: none)")
    g.add_argument("--validation-labels", nargs="+", help="trainId label PNGs or a .jsonl validation file")
    g.add_argument("--num-validation", type=cli.positive_int, default=4,
                   help="training labels used when none are given")
    g.add_argument("--validation-images", type=cli.positive_int, default=2, help="images per label and U-Net")
    g.add_argument("--validation-steps", type=cli.positive_int, default=20, help="DDIM steps")
    g.add_argument("--no-export", dest="export", action="store_false", help="skip the final exports")
    g.add_argument("--export-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the exports")
    return p


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, get_parser().parse_args(argv))))
