"""Adapt a segmentor to an unlabelled target domain by self-training: MIC (DACS ClassMix + masked
image consistency) on DAFormer / HRDA, as DIDEX adapts to its prompt-generated pseudo-target domain.

Labelled source data (``--source``, e.g. GTA, and DGInStyle output with ``--generated``) and an
unlabelled target (``--target``: any image folder, e.g. the output of ``python -m mrlf.didex``, or a
real target set such as ``cityscapes:data/cityscapes``). The segmentation stack and recipe are those of
train/train_segmentation.py (models, ``--pretrained``, AdamW 6e-5 with head lr x 10, poly schedule
with warm-up, 40k iterations, batch 2, 512 crops, evaluation on the DG benchmarks); the
self-training follows MIC's defaults (segmentation/uda.py has the pieces). Iteration t:

  1. the EMA teacher: a copy of the student at t = 0, then teacher <- a teacher + (1 - a) student on
     the parameters, a = min(1 - 1/(t + 1), 0.999) (``--alpha``); it predicts in training mode with
     dropout and drop-path off (HRDA: context + sliding-window detail inference);
  2. source: cross-entropy on the source crop (no photometric distortion: DACS colour-augments the
     mixed images instead), plus lambda x the ImageNet feature distance with ``--fd-lambda``;
  3. pseudo-labels: the teacher's arg-max on the target crop; their weight is the share of the batch's
     pixels whose confidence is >= 0.968 (``--pseudo-threshold``);
  4. ClassMix: per image, half of the source batch's classes pasted onto the target image (image,
     label / pseudo-label and weight 1 / pseudo-weight mixed), the mixed image strongly augmented
     (colour jitter 0.2 when a draw exceeds 0.2, Gaussian blur sigma 0.15-1.15 when one exceeds 0.5,
     one pair of draws per iteration); weighted cross-entropy: the mix loss;
  5. MIC: the target crop strongly augmented (draws of its own), 64-px blocks masked at ratio 0.7,
     weighted cross-entropy against the pseudo-labels times lambda 1: the masked loss
     (``--mic-lambda 0`` switches it off);
  6. one optimizer step on the gradients of the three backward passes (gradients are all-reduced
     once, on the last).
Options reused from train_segmentation: ``--rcs`` (rare-class sampling of the source),
``--fd-lambda`` (MIC's configs: 0.005), ``--model hrda_daformer_mitb5`` (HRDA; with the HR data
settings ``--crop 1024 --source-scale 2560 1440 --target-scale 2048 1024``).

Single GPU (DIDEX: GTA adapted to its pseudo-target domain; MIC's HRDA configuration):
    python -m train.train_uda --model hrda_daformer_mitb5 --pretrained pretrained/mit_b5.pth \\
        --source gta:data/gta --target data/didex_ptd --crop 1024 --source-scale 2560 1440 \\
        --target-scale 2048 1024 --rcs --rcs-min-crop-ratio 2.0 --fd-lambda 0.005 \\
        --eval cityscapes:data/cityscapes --output-dir runs/didex
N GPUs on one machine (batch is per GPU):
    torchrun --standalone --nproc_per_node=N -m train.train_uda ...same arguments...
Resume (exact for the same world size): add ``--resume auto`` or ``--resume PATH``.
Smoke run on CPU with a tiny random model:
    python -m train.train_uda --tiny --source folder:some/folder --target some/images --crop 64 \\
        --source-scale 128 64 --target-scale 128 64 --max-iters 20 --output-dir /tmp/uda --device cpu

Outputs in --output-dir: log.txt, metrics.jsonl (loss = the sum of the terms; loss_src, loss_fd with
--fd-lambda, loss_mix, loss_masked (lambda included); pseudo_weight, the mean pseudo-label weight; lr,
generated_share, samples_per_s; mIoUs), checkpoints/step_*.pt (train_segmentation's entries plus
``teacher``) and, at the end, model.safetensors (the student, as MIC evaluates it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm import cli
from segmentation import uda
from segmentation.datasets import TargetSource, UDADataset, find_images, parse_image_spec
from segmentation.models import save_segmentor
from segmentation.transforms import TrainPipeline
from train import common


def build_targets(args, log) -> list[TargetSource]:
    """The unlabelled target sets: MIC's target pipeline (resize to fit --target-scale, crop, flip)."""
    pipe = TrainPipeline(scale=tuple(args.target_scale) if args.target_scale else None, crop=args.crop,
                         photometric=False)
    targets = []
    log.info("target data:")
    for spec in args.target:
        layout, path = parse_image_spec(spec)
        images = find_images(path, layout, args.target_split if layout is not None else None)
        targets.append(TargetSource(images, pipe))
        log.info(f"  {layout.name if layout else 'images'}: {len(images)} images from {path}")
    return targets


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"

    # Student, teacher and optimizer.
    model, fd = common.build_segmentation_model(args, d, log)
    teacher = uda.EMATeacher(model, args.alpha)
    model, ddp, opt, scaler = common.segmentation_optimizer(args, model, d, log, amp_dtype)
    strong = uda.StrongAugmentation(args.jitter_strength, args.jitter_prob, args.blur)
    log.info(f"self-training: EMA alpha {args.alpha:g}, pseudo-label threshold {args.pseudo_threshold:g}, ClassMix "
             f"with colour jitter {args.jitter_strength:g} (p {1 - args.jitter_prob:g})"
             + (", Gaussian blur (p 0.5)" if args.blur else "")
             + (f"; MIC: {args.mask_block}-px blocks masked at {args.mask_ratio:g}, lambda {args.mic_lambda:g}"
                + ("" if args.mic_aug else ", no colour augmentation") if args.mic_lambda > 0 else "; no MIC"))

    step = 0
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                                     config=vars(args))
    if state is not None:
        step = int(state["step"])
        common.restore_feature_distance(state, fd, args, log)
        if "teacher" in state:
            teacher.load_state_dict(state["teacher"])
        else:
            log.warning("the checkpoint has no teacher: it restarts as a copy of the student")
            teacher.update(model, 0)
        del state

    # Data: item k of rank r (a labelled sample and a target crop) is a function of (seed, r, k).
    _, _, labelled = common.segmentation_data(args, d, log, photometric=False)
    loader = common.segmentation_loader(UDADataset(labelled, build_targets(args, log)), args, d, step)

    amp = common.autocast(d.device, amp_dtype)
    mic = args.mic_lambda > 0
    terms = ["loss", "loss_src", "loss_mix", "pseudo_weight"] + (["loss_fd"] if fd is not None else []) \
        + (["loss_masked"] if mic else [])
    meter, gen_n = common.Meter(step), 0
    # a skipped step puts back the BatchNorm statistics its forwards moved, the teacher's too
    guard = common.DivergenceGuard(args.max_bad_steps, log, model, teacher.model)
    progress = common.step_progress(step, args.max_iters, d)
    for batch in loader:
        common.set_poly_lr(opt, args, step)
        guard.start_step()
        teacher.update(model, step)
        image = batch["image"].to(d.device, non_blocking=True)
        label = batch["label"].to(d.device, non_blocking=True)
        target = batch["target_image"].to(d.device, non_blocking=True)
        b, _, h, w = image.shape

        # 1. source (+ feature distance); gradients stay local until the last backward pass
        with common.no_sync(ddp, sync=False):
            with amp:
                res = ddp(image, label)
                ref = fd.reference(model.feature_input(image)) if fd is not None else None
            loss_src = res["loss"]
            loss_fd = args.fd_lambda * fd(res["features"][-1], ref, label) if fd is not None \
                else loss_src.new_zeros(())
            scaler.scale(loss_src + loss_fd).backward()
        del res, ref

        # 2. pseudo-labels of the target crop
        with amp:
            pseudo, weight = uda.pseudo_labels(teacher(target), args.pseudo_threshold)

        # 3. ClassMix of source and target, strongly augmented image by image
        masks = uda.class_mix_masks(label)
        jitter, blur = strong.coins()
        mixed = uda.mix(masks, image, target)
        mixed = torch.cat([strong(mixed[i:i + 1], jitter, blur) for i in range(b)])
        with common.no_sync(ddp, sync=not mic):
            with amp:
                loss_mix = ddp(mixed, uda.mix(masks, label, pseudo), seg_weight=uda.mix(masks, 1.0, weight))["loss"]
            scaler.scale(loss_mix).backward()

        # 4. masked image consistency on the target crop
        loss_masked = loss_mix.new_zeros(())
        if mic:
            masked = strong(target, *strong.coins()) if args.mic_aug else target
            masked = uda.masked_consistency_input(
                masked, uda.block_mask(b, h, w, args.mask_block, args.mask_ratio, device=d.device))
            with amp:
                loss_masked = args.mic_lambda * ddp(masked, pseudo, seg_weight=weight)["loss"]
            scaler.scale(loss_masked).backward()

        grad_norm = common.optimizer_step(opt, scaler, None)
        step += 1
        guard.check(grad_norm, step)
        losses = {"loss_src": loss_src, "loss_fd": loss_fd, "loss_mix": loss_mix, "loss_masked": loss_masked,
                  "pseudo_weight": weight.mean()}
        losses["loss"] = loss_src.detach() + loss_fd.detach() + loss_mix.detach() + loss_masked.detach()
        meter.add(**{k: losses[k] for k in terms})
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

        with meter.paused():  # evaluation and checkpoints do not count in samples/s
            if args.eval and args.eval_every and (step % args.eval_every == 0 or step == args.max_iters):
                common.write_metrics(out, step, common.evaluate_segmentation(args, model, d, amp_dtype, log, step),
                                     d, tb)
            if step % args.ckpt_every == 0 or step == args.max_iters:
                state = common.segmentation_state(model, opt, scaler, args, fd) | {"teacher": teacher.state_dict()}
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
    p = cli.parser("python -m train.train_uda", __doc__)
    common.add_segmentation_arguments(p)
    g = p.add_argument_group("target domain (unlabelled)")
    g.add_argument("--target", nargs="+", required=True, metavar="[LAYOUT:]PATH",
                   help="target images: a folder (a generation output with manifest.jsonl gives its images, any "
                        "other folder every image below it) or LAYOUT:PATH for a layout's images")
    g.add_argument("--target-split", default="train", help="split for split-based target layouts")
    g.add_argument("--target-scale", type=cli.positive_int, nargs="*", default=[1024, 512], metavar="EDGE",
                   help="resize target images to fit LONG SHORT (keep ratio); nothing: no resize")
    g = p.add_argument_group("self-training (MIC's defaults)")
    g.add_argument("--alpha", type=cli.real(0, 1, open_max=True), default=uda.ALPHA, help="the EMA teacher's maximal coefficient")
    g.add_argument("--pseudo-threshold", type=cli.fraction, default=uda.PSEUDO_THRESHOLD,
                   help="softmax confidence from which a pixel counts in the pseudo-label weight")
    g.add_argument("--jitter-strength", type=cli.non_negative, default=0.2, help="colour jitter of the strong augmentation")
    g.add_argument("--jitter-prob", type=cli.fraction, default=0.2,
                   help="colour jitter is applied when a uniform draw exceeds this")
    g.add_argument("--no-blur", dest="blur", action="store_false", help="no Gaussian blur in the strong augmentation")
    g.add_argument("--mic-lambda", type=cli.non_negative, default=1.0, help="weight of the masked loss; 0 = no MIC")
    g.add_argument("--mask-block", type=cli.positive_int, default=uda.MASK_BLOCK, help="MIC block size in pixels")
    g.add_argument("--mask-ratio", type=cli.real(0, 1, open_max=True), default=uda.MASK_RATIO, help="share of the blocks masked")
    g.add_argument("--no-mic-aug", dest="mic_aug", action="store_false",
                   help="mask the target crop without the strong augmentation")
    common.add_segmentation_eval_arguments(p)
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=4000, keep_last=1)
    return p


def parse_args(argv=None):
    p = get_parser()
    a = p.parse_args(argv)
    common.check_segmentation_arguments(p, a)
    if a.target_scale and len(a.target_scale) != 2:
        p.error("--target-scale takes two numbers (LONG SHORT) or none")
    return a


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, parse_args(argv))))
