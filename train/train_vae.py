"""Train a KL autoencoder (the first stage of a latent diffusion model) on image folders.

From scratch (--config: a preset name or a JSON AutoencoderConfig) or from a checkpoint (--init: any file
`ldm.checkpoint` reads, e.g. SD-1.5's VAE to fine-tune). Loss, as CompVis' LPIPSWithDiscriminator without
LPIPS (whose weights are a download): L1 (or --rec-loss l2) reconstruction of the posterior sample's decode
+ --kl-weight x KL(posterior || N(0, 1)) + after --disc-start steps, with --disc-weight > 0, a patch
discriminator's hinge loss weighted adaptively (the reconstruction / adversarial gradient ratio at the
decoder's last layer). AdamW with a cosine schedule after a linear warm-up; EMA of the weights.
At the end the latent scale is measured: scaling_factor = 1 / std of the posterior means over
--scale-batches batches (how SD-1.x's 0.18215 was obtained), stored in the exported config.

Single process:
    python -m train.train_vae --data world/source/images world/prior/images --config mini \
        --resolution 64 --output-dir runs/vae --max-steps 3000
N GPUs on one machine (batch per GPU):
    torchrun --standalone --nproc_per_node=N -m train.train_vae ...same arguments...
Resume (exact: same world size): add --resume auto (latest in OUTPUT/checkpoints) or --resume PATH.

Outputs in --output-dir: log.txt, metrics.jsonl (loss terms, PSNR of the batch), checkpoints/step_*.pt,
samples/step_*.png (rows: inputs | reconstructions of fixed validation crops), and at the end
vae.safetensors (native, config in the metadata) and vae/ (a diffusers AutoencoderKL folder).
With --ema the exports hold the EMA weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from ldm import cli
from ldm import checkpoint as ckpt_io
from ldm.atomic import atomic_file
from ldm.config import config_from_text
from ldm.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, kl_loss
from ldm.vae import AutoencoderKL
from train import common
from train.data import ImageDataset, find_images, shard_loader


def build_vae(args) -> AutoencoderKL:
    if args.init:
        return ckpt_io.load_vae(args.init, dtype=torch.float32)
    return AutoencoderKL(config_from_text("vae", args.config))


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to --min-lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], clipped to [-1, 1] first."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


@torch.no_grad()
def measure_scale(vae: AutoencoderKL, loader, batches: int, device) -> float:
    """1 / std of the posterior means of `batches` batches."""
    zs = [vae.encode(next(loader)["pixel_values"].to(device)).mode().float().cpu() for _ in range(batches)]
    return float(1.0 / torch.cat(zs).std())


def sample_grid(vae: AutoencoderKL, x: torch.Tensor) -> Image.Image:
    """Two rows: the inputs, then their reconstructions (posterior mean)."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    rows = torch.cat([x, rec]).float().cpu()
    images = [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
              for r in rows]
    return common.image_grid(images, ncols=len(x))


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"

    vae = build_vae(args).to(d.device, torch.float32).train()
    common.requires_grad(vae, True)
    disc = PatchDiscriminator(vae.cfg.out_channels, args.disc_width, args.disc_layers).to(d.device).train()
    use_disc = args.disc_weight > 0
    ema = common.requires_grad(copy.deepcopy(vae).eval(), False) if args.ema else None
    ddp = (lambda m: DDP(m, device_ids=[d.local_rank] if d.device.type == "cuda" else None)) if d.distributed else None
    model = ddp(vae) if ddp else vae
    dmodel = ddp(disc) if ddp and use_disc else disc
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay)
    dopt = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    scaler = common.grad_scaler(d.device, amp_dtype)
    dscaler = common.grad_scaler(d.device, amp_dtype)  # its own loss scale: the two losses differ in size
    n_params = sum(p.numel() for p in vae.parameters())
    log.info(f"autoencoder {vae.cfg.to_json()}: {n_params / 1e6:.2f} M parameters, "
             f"downsampling x{vae.cfg.downsample_factor}")

    step, position = 0, 0
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=vae, optimizer=opt, scaler=scaler,
                                     ema=ema, config=vars(args))
    if state is not None:
        step, position = state["step"], state["sampler"]["position"]
        disc.load_state_dict(state["disc"])
        dopt.load_state_dict(state["disc_optimizer"])
        if state.get("disc_scaler") is not None:
            dscaler.load_state_dict(state["disc_scaler"])
        del state

    files = [f for root in args.data for f in find_images(root)]
    dataset = ImageDataset(files, args.resolution, tuple(args.scales), "random", seed=args.seed, rank=d.rank,
                           flip=True)
    loader = shard_loader(dataset, args.batch_size, d.rank, d.world_size, args.seed, position, args.num_workers,
                          pin_memory=d.device.type == "cuda")
    log.info(f"{len(files)} images under {', '.join(args.data)}; batch {args.batch_size} per rank")
    # Fixed validation crops for the sample grids (rank 0's first items of another seed's stream).
    fixed = ImageDataset(files, args.resolution, (1.0,), "center", seed=args.seed + 1)
    rng = np.random.default_rng(args.seed)
    val = torch.stack([fixed[(0, int(i))]["pixel_values"] for i in rng.choice(len(files), args.num_samples,
                                                                               replace=len(files) < args.num_samples)])
    last_layer = vae.decoder.conv_out.weight
    amp = common.autocast(d.device, amp_dtype)
    batches = iter(loader)
    meter = common.Meter(step)
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_steps, d)
    gen = torch.Generator()
    while step < args.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batch = next(batches)
        position += args.batch_size
        x = batch["pixel_values"].to(d.device)
        adversarial = use_disc and step >= args.disc_start
        # Posterior noise from a per-step generator: a resumed run draws what an uninterrupted one would.
        gen.manual_seed(args.seed * 1_000_003 + step * 131 + d.rank)
        with amp:
            rec, post = model(x, gen)
            rec_loss = (rec - x).abs().mean() if args.rec_loss == "l1" else (rec - x).pow(2).mean()
            kl = kl_loss(post.mean.float(), post.logvar.float())
            loss = rec_loss + args.kl_weight * kl
            g_loss = torch.zeros((), device=d.device)
            if adversarial:  # the bare discriminator, frozen: this term trains the decoder only
                common.requires_grad(disc, False)
                g_loss = -disc(rec).mean()
                w = adaptive_weight(rec_loss, g_loss, last_layer) if args.adaptive else torch.ones(())
                loss = loss + args.disc_weight * w * g_loss
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = common.optimizer_step(opt, scaler, vae.parameters(), args.max_grad_norm)
        d_loss, d_norm = torch.zeros(()), torch.zeros(())
        if adversarial:
            common.requires_grad(disc, True)
            with amp:
                d_loss = hinge_d_loss(dmodel(x), dmodel(rec.detach()))
            dopt.zero_grad(set_to_none=True)
            dscaler.scale(d_loss).backward()
            # unclipped, as CompVis' discriminator; a non-finite gradient skips its update too
            d_norm = common.optimizer_step(dopt, dscaler, disc.parameters())
        if ema is not None:
            common.update_ema(ema, vae, args.ema_decay)
        step += 1
        guard.check(grad_norm + d_norm, step)  # either network's non-finite gradient counts
        progress.update()
        meter.add(loss=loss, rec=rec_loss, kl=kl, g=g_loss, d=d_loss,
                  psnr=torch.tensor(psnr(rec.detach().float(), x.float())))

        if step % args.log_every == 0 or step == args.max_steps:
            metrics = meter.means(d) | {"grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                                        "samples_per_s": meter.samples_per_s(step, args.batch_size * d.world_size)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps) and d.is_main:
            shown = ema if ema is not None else vae
            was = shown.training
            shown.eval()
            grid = sample_grid(shown, val.to(d.device))
            shown.train(was)
            with atomic_file(out / "samples" / f"step_{step:07d}.png") as tmp:
                grid.save(tmp, format="PNG")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            state = {"model": vae.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "disc": disc.state_dict(),
                     "disc_optimizer": dopt.state_dict(),
                     "disc_scaler": dscaler.state_dict(), "config": vars(args), "arch": vae.cfg.to_dict(),
                     "sampler": {"position": position, "world_size": d.world_size}}
            path = common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)
            log.info(f"saved {path}")
            state = None

    progress.close()
    if d.is_main and args.export:
        final = (ema if ema is not None else vae).eval()
        scale_loader = iter(shard_loader(ImageDataset(files, args.resolution, (1.0,), "random", seed=args.seed + 2),
                                         args.batch_size, 0, 1, args.seed + 2, 0, 0, pin_memory=False))
        scale = measure_scale(final, scale_loader, args.scale_batches, d.device)
        final.cfg = final.cfg.replace(scaling_factor=round(scale, 5))
        log.info(f"latent scale: 1 / std of the posterior means = {final.cfg.scaling_factor}")
        final = final.to("cpu")
        dtype = ckpt_io.DTYPES[args.export_dtype]
        log.info(f"exported {ckpt_io.save_native(out / 'vae.safetensors', final, dtype=dtype, overwrite=True)}")
        log.info(f"exported {ckpt_io.save_diffusers(out / 'vae', final, dtype=dtype, overwrite=True)}")
    common.finish_run(log, tb)


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.train_vae", __doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--data", nargs="+", required=True, help="image folders (searched recursively)")
    g.add_argument("--config", default="mini", help="AutoencoderConfig: a preset name (mini, tiny, sd15) or JSON")
    g.add_argument("--init", help="start from this VAE checkpoint instead (any format ldm.checkpoint reads)")
    g.add_argument("--resolution", type=cli.integer(8), default=64, help="training crop side in pixels")
    g.add_argument("--scales", type=cli.positive, nargs="+", default=[1.0], help="random rescale ratios before the crop")
    g.add_argument("--num-samples", type=cli.positive_int, default=8, help="validation crops in each sample grid")
    g.add_argument("--sample-every", type=cli.non_negative_int, default=500,
                   help="optimizer steps between sample grids (0: none)")
    g.add_argument("--scale-batches", type=cli.positive_int, default=16,
                   help="batches for measuring the latent scale")
    g.add_argument("--no-export", dest="export", action="store_false", help="skip the final exports")
    g.add_argument("--export-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the exports")
    g = p.add_argument_group("loss")
    g.add_argument("--rec-loss", choices=("l1", "l2"), default="l1", help="reconstruction loss")
    g.add_argument("--kl-weight", type=cli.non_negative, default=1e-6, help="SD-1.x's autoencoders used 1e-6")
    g.add_argument("--disc-weight", type=cli.non_negative, default=0.0,
                   help="adversarial weight, 0: no discriminator (SD-1.x: 0.5)")
    g.add_argument("--disc-start", type=cli.non_negative_int, default=2000,
                   help="step at which the adversarial loss starts")
    g.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="a fixed adversarial weight instead of the gradient-ratio one")
    g.add_argument("--disc-lr", type=cli.positive, default=2e-4, help="the discriminator's learning rate")
    g.add_argument("--disc-width", type=cli.positive_int, default=32, help="the discriminator's first width")
    g.add_argument("--disc-layers", type=cli.positive_int, default=2, help="the discriminator's strided layers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=16, help="batch per process")
    g.add_argument("--max-steps", type=cli.positive_int, default=3000, help="optimizer steps")
    g.add_argument("--lr", type=cli.positive, default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=cli.non_negative, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=cli.non_negative_int, default=100, help="linear warm-up steps")
    g.add_argument("--adam-beta1", type=cli.fraction, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=cli.fraction, default=0.999, help="AdamW beta2")
    g.add_argument("--weight-decay", type=cli.non_negative, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=cli.positive, default=1.0, help="gradient clipping norm")
    g.add_argument("--mixed-precision", choices=common.PRECISIONS, default="auto",
                   help="autocast dtype with fp32 master weights; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights (exports then hold it)")
    g.add_argument("--ema-decay", type=cli.fraction, default=0.999, help="EMA decay per step")
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=1000, keep_last=2)
    return p


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, get_parser().parse_args(argv))))
