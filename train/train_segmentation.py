"""Train a segmentor on source data (GTA) mixed with DGInStyle-generated data; evaluate on DG benchmarks.

The recipe of DGInStyle-SegModel (its experiments.py and configs), with the generated data really
used (the original's builder.py silently drops it):
  - model: DAFormer (MiT-B5 + separable-ASPP head) by default, ``--model segformer_mitb5`` etc.;
    ``--pretrained mit_b5.pth`` loads the official ImageNet MiT weights strictly;
    ``--model hrda_daformer_mitb5`` is HRDA (exp 61): the model's training forward takes a
    context pass at scale 0.5 and a 512 detail crop, its loss is 0.9 CE(fused) + 0.1 CE(detail);
    evaluation uses its hr slide inference in 1024 windows, stride 512, at doubled test scales;
  - AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01; parameters named ``*head*`` get lr x 10,
    ``*norm*`` / ``*pos_block*`` no weight decay (mmcv custom_keys matching, longest key first);
  - poly schedule (power 1, min lr 0) over 40k iterations, linear warmup over 1500 iterations
    from ratio 1e-6 (mmcv's PolyLrUpdaterHook, per-iteration);
  - batch 2 per GPU, 512 crops; source pipeline: resize to fit 1280x720, random crop with cat_max
    0.75, flip, photometric distortion, normalise, pad 255; generated pipeline: no resize;
  - mixing: ``--mix-ratio SRC:GEN`` (e.g. 1:1) or, by default, uniform over the union of files;
    ``--rcs`` adds online rare-class sampling to the source set (T 0.01, > 3000 px, re-crop until
    > 1500 px of the class, 10 tries);
  - cross-entropy, ignore 255 (the model's ``forward(image, label)``); mIoU evaluation every
    ``--eval-every`` iterations (slide 512/256, or the model's own window);
  - optional ImageNet feature distance on thing classes (DAFormer's "fdthings", DGInStyle's
    ``dacs_fdthings_srconly``: ``--fd-lambda 0.005``): loss = CE + lambda * FD, FD the mean over the
    bottleneck cells whose ratio-downscaled label is a thing class of the L2 distance between the
    trained backbone's deepest features and those of a frozen copy of the initial (ImageNet) backbone
    (for HRDA those of the context input, the 0.5-scaled crop: its ``feature_scale``, as in HRDA);
  - DIFF (``--model diff_sd15``, ``diff_mini``, ``diff_world``; ``segmentation.models.diff``): a frozen diffusion U-Net
    (``--diff-unet``) as the backbone; the model's training forward is implicit posterior knowledge
    learning, loss = CE(class-prompted pass) + CE(unconditional pass) + 1.0 x MSE of their logits;
    the exported file holds the trained parts and a reference (path + fingerprint) to the frozen weights;
  - optional SHADE (``--shade``; exp 61 trains with it): style hallucination on the MiT stage-1
    output (64 basis styles mixed with Dirichlet(0.0156) weights; ``segmentation.models.shade``), the
    batch becomes [clean; hallucinated] through backbone and head with the labels duplicated (CE and
    feature distance over both halves), plus lambda (10) x the style-consistency loss on the head's
    logits (HRDA: the fused ones). The basis: farthest-point sampling of the stage-1 styles of
    the source images (all of them, as the original; ``--shade-images N`` caps a pass at a fresh seeded
    draw of N), split over the ranks and gathered; training pipeline, model in eval mode; HRDA: each image at the context scale
    and at full resolution, the two inputs the backbone sees), before the first step and after every
    ``--shade-interval`` (4000) steps; it is stored in the checkpoints.

Single GPU:
    python -m train.train_segmentation --source gta:data/gta --generated data/dginstyle_gen \\
        --pretrained pretrained/mit_b5.pth --eval cityscapes:data/cityscapes --output-dir runs/seg
N GPUs on one machine (batch is per GPU; mmseg's recipe is 1 GPU x 2):
    torchrun --standalone --nproc_per_node=N -m train.train_segmentation ...same arguments...
HRDA with the HR data settings of exp 61 (1024 crops of GTA resized to 2560x1440, generated images
resized to 1024x1024, RCS with min crop ratio 2.0, feature distance):
    python -m train.train_segmentation --model hrda_daformer_mitb5 --pretrained pretrained/mit_b5.pth \\
        --source gta:data/gta --generated data/dginstyle_gen --crop 1024 --source-scale 2560 1440 \\
        --gen-scale 1024 1024 --rcs --rcs-min-crop-ratio 2.0 --fd-lambda 0.005 --shade \\
        --eval cityscapes:data/cityscapes --output-dir runs/hrda
DIFF on SD-1.5 (crops of 512, batch 1 per GPU as the original):
    python -m train.train_segmentation --model diff_sd15 --diff-unet stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --source gta:data/gta --rcs --batch-size 1 --eval cityscapes:data/cityscapes --output-dir runs/diff
Resume (exact for the same world size): add ``--resume auto`` (latest checkpoint) or ``--resume PATH``.
Smoke run on CPU with a tiny random model:
    python -m train.train_segmentation --tiny --source folder:some/folder --crop 64 \\
        --source-scale 128 64 --max-iters 20 --output-dir /tmp/seg --device cpu

Outputs in --output-dir: log.txt, metrics.jsonl (loss, lr, share of generated samples, mIoUs;
with --fd-lambda also loss_ce and loss_fd = lambda * FD; with --shade loss_ce and loss_shade = lambda *
style consistency; for HRDA also the unweighted loss_fused and loss_hr; for DIFF loss_uncond, loss_cond and
loss_consistency), checkpoints/step_*.pt (model,
optimizer, scaler, model_config, config, RNG states; with --fd-lambda and no --pretrained also
fd_backbone, the frozen reference, which a resume cannot rebuild otherwise; with --shade shade_basis) and, at the end, model.safetensors (the
segmentor with its config; for segmentation.evaluate / adherence).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ldm import cli
from segmentation.models import save_segmentor
from segmentation.models.shade import attach_style_hallucination, compute_basis, style_consistency_loss
from train import common


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"

    # Model and optimizer.
    model, fd = common.build_segmentation_model(args, d, log)
    shade = None
    if args.shade:
        try:
            shade = attach_style_hallucination(model, args.shade_basis, args.shade_concentration)
        except ValueError as e:
            raise SystemExit(f"--shade: {e}")
        log.info(f"SHADE: {shade.num_styles} basis styles of {shade.style_dim} stage-1 channels, Dirichlet "
                 f"concentration {shade.concentration:g}, consistency lambda {args.shade_lambda:g}, basis from "
                 f"{'all' if args.shade_images is None else args.shade_images} source images every "
                 f"{args.shade_interval} steps")
    model, ddp, opt, scaler = common.segmentation_optimizer(args, model, d, log, amp_dtype)

    step = 0
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                                     config=vars(args))
    if state is not None:
        step = int(state["step"])
        common.restore_feature_distance(state, fd, args, log)
        if shade is not None and "shade_basis" in state:
            shade.set_basis(state["shade_basis"]["mean"].to(d.device), state["shade_basis"]["std"].to(d.device))
            log.info("SHADE basis from the checkpoint")
        elif shade is not None:
            log.warning("the checkpoint has no SHADE basis: computing one at the resumed step")
        del state

    # Data: item k of rank r is a function of (seed, r, k), so resuming at step s reads items
    # s * batch ... exactly as an uninterrupted run would; ranks see different items.
    sources, generated, dataset = common.segmentation_data(args, d, log)
    loader = common.segmentation_loader(dataset, args, d, step)

    amp = common.autocast(d.device, amp_dtype)

    def update_shade_basis(step: int) -> None:
        tic = time.time()
        mean, std, n = compute_basis(common.unwrap(model), sources, args.shade_basis, seed=args.seed, step=step,
                                     max_images=args.shade_images, batch_size=args.batch_size,
                                     num_workers=args.num_workers, device=d.device, autocast=amp)
        shade.set_basis(mean.to(d.device), std.to(d.device))
        log.info(f"step {step}: SHADE basis of {args.shade_basis} styles from {n} stage-1 styles "
                 f"({time.time() - tic:.1f} s)")

    if shade is not None and not shade.has_basis:
        update_shade_basis(step)
    # logged loss terms: the total; with FD / SHADE the CE part, lambda * FD, lambda * style consistency;
    # for HRDA its unweighted CEs
    terms = ["loss"] + (["loss_ce"] if fd is not None or shade is not None else []) \
        + (["loss_fd"] if fd is not None else []) + (["loss_shade"] if shade is not None else [])
    hrda = model.cfg.hrda
    if hrda is not None:
        terms += ["loss_fused"] + [f"loss_{k}" for k in ("hr", "lr") if getattr(hrda, f"{k}_loss_weight") > 0]
    diff = model.cfg.diff
    if diff is not None:  # the model's IPKL loss: CE of both passes and the weighted consistency MSE
        terms += ["loss_uncond"] + (["loss_cond", "loss_consistency"] if diff.ipkl else [])
    meter, gen_n = common.Meter(step), 0  # gen_n: generated samples among this rank's since the last log line
    guard = common.DivergenceGuard(args.max_bad_steps, log, model)  # restores BatchNorm statistics on a skip
    progress = common.step_progress(step, args.max_iters, d)
    for batch in loader:
        common.set_poly_lr(opt, args, step)
        guard.start_step()
        image = batch["image"].to(d.device, non_blocking=True)
        label = batch["label"].to(d.device, non_blocking=True)
        if shade is not None:  # the backbone returns [clean; hallucinated]: SHADE duplicates the labels
            label = torch.cat([label, label])
        with amp:
            # the model's training forward: its CE loss(es) and the backbone features that the
            # feature distance pairs with the frozen backbone's features of the same input
            res = ddp(image, label)
            ref = fd.reference(common.unwrap(model).feature_input(image)) if fd is not None else None
            if ref is not None and shade is not None:
                ref = torch.cat([ref, ref])  # SegModel: the frozen features of cat(img, img)
        loss_ce = res["loss"]
        loss_fd = args.fd_lambda * fd(res["features"][-1], ref, label) if fd is not None else loss_ce.new_zeros(())
        loss_sc = args.shade_lambda * style_consistency_loss(res["head_logits"]) if shade is not None \
            else loss_ce.new_zeros(())
        loss = loss_ce + loss_fd + loss_sc
        res |= {"loss": loss, "loss_ce": loss_ce, "loss_fd": loss_fd, "loss_shade": loss_sc}
        scaler.scale(loss).backward()
        grad_norm = common.optimizer_step(opt, scaler)
        step += 1
        guard.check(grad_norm, step)
        meter.add(**{k: res[k] for k in terms})
        gen_n += int((batch["group"] == 1).sum())
        progress.update()

        if step % args.log_every == 0 or step == args.max_iters:
            metrics = meter.means(d)
            metrics |= {"lr": opt.param_groups[0]["lr"],
                        "generated_share": common.all_reduce_mean(gen_n / (meter.n * args.batch_size), d),
                        "samples_per_s": meter.samples_per_s(step, args.batch_size * d.world_size)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)
            gen_n = 0

        with meter.paused():  # evaluation, SHADE basis passes and checkpoints do not count in samples/s
            if shade is not None and step % args.shade_interval == 0:  # SegModel's hook: after every interval
                update_shade_basis(step)
            if args.eval and args.eval_every and (step % args.eval_every == 0 or step == args.max_iters):
                common.write_metrics(out, step, common.evaluate_segmentation(args, model, d, amp_dtype, log, step),
                                     d, tb)
            if step % args.ckpt_every == 0 or step == args.max_iters:
                state = common.segmentation_state(model, opt, scaler, args, fd)
                if shade is not None:  # the basis of the next steps (exact resume without a new pass)
                    state["shade_basis"] = shade.basis()
                path = common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)
                log.info(f"saved {path}")
        if step >= args.max_iters:
            break

    progress.close()
    if d.is_main:
        common.check_finite(common.unwrap(model).state_dict(), "the segmentor to export")
        path = save_segmentor(common.unwrap(model), out / "model.safetensors")
        log.info(f"exported {path}")
    common.finish_run(log, tb)


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.train_segmentation", __doc__)
    common.add_segmentation_arguments(p)
    g = p.add_argument_group("SHADE style hallucination + style consistency (DGInStyle exp 61: --shade)")
    g.add_argument("--shade", action="store_true",
                   help="style hallucination on the MiT stage-1 output ([clean; hallucinated] batches, labels "
                        "duplicated) and the style-consistency loss")
    g.add_argument("--shade-lambda", type=cli.non_negative, default=10.0, help="weight of the style-consistency loss")
    g.add_argument("--shade-basis", type=cli.positive_int, default=64,
                   help="number of basis styles (farthest-point sampled)")
    g.add_argument("--shade-concentration", type=cli.positive, default=0.0156,
                   help="Dirichlet concentration of the style combination weights")
    g.add_argument("--shade-interval", type=cli.positive_int, default=4000,
                   help="recompute the basis after every N steps (and before the first)")
    g.add_argument("--shade-images", type=cli.positive_int, default=None,
                   help="cap a basis pass at N source images (a fresh seeded draw each pass; default: all, "
                        "as the original)")
    common.add_segmentation_eval_arguments(p)
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=4000, keep_last=1)
    return p


def parse_args(argv=None):
    p = get_parser()
    a = p.parse_args(argv)
    common.check_segmentation_arguments(p, a)
    if a.shade and (a.shade_lambda < 0 or a.shade_basis < 1 or a.shade_concentration <= 0
                    or a.shade_interval < 1 or (a.shade_images is not None and a.shade_images < 1)):
        p.error("--shade needs --shade-lambda >= 0, --shade-basis / --shade-interval / --shade-images >= 1 "
                "and --shade-concentration > 0")
    return a


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, parse_args(argv))))
