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
Resume (exact for the same world size): add ``--resume auto`` (latest checkpoint) or ``--resume PATH``.
Smoke run on CPU with a tiny random model:
    python -m train.train_segmentation --tiny --source folder:some/folder --crop 64 \\
        --source-scale 128 64 --max-iters 20 --output-dir /tmp/seg --device cpu

Outputs in --output-dir: log.txt, metrics.jsonl (loss, lr, share of generated samples, mIoUs;
with --fd-lambda also loss_ce and loss_fd = lambda * FD; with --shade loss_ce and loss_shade = lambda *
style consistency; for HRDA also the unweighted loss_fused and loss_hr), checkpoints/step_*.pt (model,
optimizer, scaler, model_config, config, RNG states; with --fd-lambda and no --pretrained also
fd_backbone, the frozen reference, which a resume cannot rebuild otherwise; with --shade shade_basis) and, at the end, model.safetensors (the
segmentor with its config; for segmentation.evaluate / adherence).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ldm import cli
from segmentation.datasets import (IndexStream, MixedDataset, RCSConfig, SegDataset, TrainSource, parse_ratio,
                                   parse_spec)
from segmentation.evaluate import evaluate_dataset, is_hr_model
from segmentation.feature_distance import THING_CLASSES, FeatureDistance
from segmentation.metrics import summarize
from segmentation.models import PRESETS, build_segmentor, save_segmentor
from segmentation.models.shade import attach_style_hallucination, compute_basis, style_consistency_loss
from segmentation.optim import lr_factor, param_groups
from segmentation.transforms import TrainPipeline
from train import common

def build_sources(specs, pipeline: TrainPipeline, rcs: RCSConfig | None, default_layout: str | None,
                  split: str | None, log) -> list[TrainSource]:
    out = []
    for spec in specs:
        layout, path = parse_spec(spec, default_layout)
        ds = SegDataset(path, layout, split)
        out.append(TrainSource(ds, pipeline, rcs))
        log.info(f"  {layout.name}: {len(ds)} pairs from {path}" + (" (rare-class sampling)" if rcs else ""))
    return out


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    if args.tiny:
        log.warning("--tiny: a randomly initialised tiny segmentor, for tests and smoke runs only")
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Model and optimizer.
    preset = args.model if not args.tiny else ("tiny_hrda" if PRESETS[args.model].hrda is not None else "tiny")
    model_cfg = PRESETS[preset]
    model = build_segmentor(model_cfg)
    if args.pretrained:
        model.load_backbone(args.pretrained)
        log.info(f"backbone weights from {args.pretrained}")
    model = model.to(d.device).train()
    fd = None
    if args.fd_lambda > 0:
        bad = [c for c in args.fd_classes if not 0 <= c < model_cfg.num_classes]
        if bad:
            raise SystemExit(f"--fd-classes {bad} are not classes of a {model_cfg.num_classes}-class model")
        h = model_cfg.hrda
        if h is not None and h.hr_crop_size is not None and float(h.feature_scale) == h.scales[0]:
            # the training forward returns the detail crop's features, the frozen copy sees the whole image
            raise SystemExit("--fd-lambda with HRDA needs feature_scale at the context scale "
                             f"({h.scales[1]:g}), not the cropped detail scale ({h.scales[0]:g})")
        # the reference: the backbone as initialised (ImageNet weights with --pretrained), frozen
        fd = FeatureDistance(model.backbone, args.fd_classes, args.fd_min_ratio, model_cfg.num_classes)
        log.info(f"feature distance: lambda {args.fd_lambda:g}, classes {list(fd.classes)}, min ratio "
                 f"{fd.min_ratio:g}, frozen reference = the backbone "
                 + (f"from {args.pretrained}" if args.pretrained else "as randomly initialised (no --pretrained)"))
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
    if args.sync_bn and d.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info(f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
             f"parameters ({asdict(model.cfg)})")
    groups = param_groups(model, args.lr, args.weight_decay, args.head_lr_mult)
    for g in groups:
        log.info(f"  param group lr x{g['lr_mult']:g}, weight decay {g['weight_decay']:g}: {len(g['params'])} tensors")
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                            lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    scaler = common.grad_scaler(d.device, amp_dtype)
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.distributed else model

    step = 0
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                                     config=vars(args))
    if state is not None:
        step = int(state["step"])
        if fd is not None:
            if "fd_backbone" in state:
                fd.frozen.load_state_dict(state["fd_backbone"])
                log.info("feature-distance reference from the checkpoint")
            elif not args.pretrained:
                log.warning("the checkpoint has no feature-distance reference (fd_backbone) and there is no "
                            "--pretrained file: the reference is this run's fresh initialisation, which "
                            "equals the original one only for the same seed and code")
        if shade is not None and "shade_basis" in state:
            shade.set_basis(state["shade_basis"]["mean"].to(d.device), state["shade_basis"]["std"].to(d.device))
            log.info("SHADE basis from the checkpoint")
        elif shade is not None:
            log.warning("the checkpoint has no SHADE basis: computing one at the resumed step")
        del state

    # Data: item k of rank r is a function of (seed, r, k), so resuming at step s reads items
    # s * batch ... exactly as an uninterrupted run would; ranks see different items.
    rcs = RCSConfig(args.rcs_temperature, args.rcs_min_pixels, args.rcs_min_crop_ratio) if args.rcs else None
    src_pipe = TrainPipeline(scale=tuple(args.source_scale) if args.source_scale else None, crop=args.crop,
                             cat_max_ratio=args.cat_max_ratio)
    gen_pipe = TrainPipeline(scale=tuple(args.gen_scale) if args.gen_scale else None, crop=args.crop,
                             cat_max_ratio=args.cat_max_ratio)
    log.info("source data:")
    with common.main_process_first(d):  # rank 0 writes the RCS statistics cache, the others read it
        sources = build_sources(args.source, src_pipe, rcs, None, args.source_split, log)
    generated = []
    if args.generated:
        log.info("generated data:")
        generated = build_sources(args.generated, gen_pipe, None, "dginstyle", None, log)
    if args.mix_ratio and not generated:
        raise SystemExit("--mix-ratio needs --generated data")
    dataset = MixedDataset([sources, generated], args.mix_ratio if generated else None, seed=args.seed, rank=d.rank)
    n_src, n_gen = sum(map(len, sources)), sum(map(len, generated))
    log.info(f"mixture: {n_src} source + {n_gen} generated files; P(generated) = "
             f"{dataset.group_probs[-1] if generated else 0.0:.3f}"
             + (" (uniform over the union)" if not args.mix_ratio else f" (ratio {args.mix_ratio})"))
    loader = DataLoader(dataset, batch_size=args.batch_size,
                        sampler=IndexStream(step * args.batch_size, (args.max_iters - step) * args.batch_size),
                        num_workers=args.num_workers, pin_memory=d.device.type == "cuda",
                        persistent_workers=args.num_workers > 0, drop_last=True,
                        generator=torch.Generator())  # its base-seed draw must not touch the global RNG
    evals = [(spec, *parse_spec(spec)) for spec in (args.eval or [])]
    eval_hr = is_hr_model(model) if args.eval_hr is None else args.eval_hr

    def run_eval(step: int) -> dict:
        metrics = {}
        for spec, layout, path in evals:
            scale = layout.test_scale
            if eval_hr and scale is not None:
                scale = (2 * scale[0], 2 * scale[1])
            ds = SegDataset(path, layout, args.eval_split, test_scale=scale)
            cm = evaluate_dataset(common.unwrap(model), ds, mode=args.eval_mode, crop=args.eval_crop,
                                  stride=args.eval_stride, device=d.device, limit=args.eval_limit,
                                  autocast_dtype=None if amp_dtype == torch.float32 else amp_dtype)
            s = summarize(cm.cpu())
            metrics[f"mIoU/{layout.name}"] = s["mIoU"]
            log.info(f"step {step}: {layout.name} mIoU x 100 = {100 * (s['mIoU'] or 0):.1f} ({len(ds)} images)")
        return metrics

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
    if model_cfg.hrda is not None:
        terms += ["loss_fused"] + [f"loss_{k}" for k in ("hr", "lr") if getattr(model_cfg.hrda, f"{k}_loss_weight") > 0]
    meter, gen_n = common.Meter(step), 0  # gen_n: generated samples among this rank's since the last log line
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_iters, d)
    for batch in loader:
        factor = lr_factor(step, args.max_iters, args.warmup_iters, args.warmup_ratio, args.poly_power)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
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
            if evals and args.eval_every and (step % args.eval_every == 0 or step == args.max_iters):
                common.write_metrics(out, step, run_eval(step), d, tb)
            if step % args.ckpt_every == 0 or step == args.max_iters:
                state = {"model": common.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "scaler": scaler.state_dict(), "model_config": asdict(common.unwrap(model).cfg),
                         "config": vars(args)}
                if fd is not None and not args.pretrained:  # with --pretrained, a resume rebuilds it from the file
                    state["fd_backbone"] = fd.frozen.state_dict()
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
    g = p.add_argument_group("model")
    g.add_argument("--model", default="daformer_mitb5", choices=sorted(PRESETS), help="segmentor preset")
    g.add_argument("--tiny", action="store_true", help="the 'tiny' preset (random, for smoke tests)")
    g.add_argument("--pretrained", help="official ImageNet MiT weights (mit_b5.pth), loaded strictly")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    g = p.add_argument_group("data")
    g.add_argument("--source", nargs="+", required=True, metavar="LAYOUT:PATH",
                   help="source datasets, e.g. gta:data/gta (layouts: segmentation.datasets.LAYOUTS)")
    g.add_argument("--source-split", default="train", help="split for split-based source layouts")
    g.add_argument("--generated", nargs="*", default=[], metavar="[LAYOUT:]PATH",
                   help="generated datasets (default layout: dginstyle, i.e. manifest.jsonl)")
    g.add_argument("--mix-ratio", default=None, help="source:generated sampling ratio, e.g. 1:1 "
                                                     "(default: uniform over the union of files)")
    g.add_argument("--rcs", action="store_true", help="rare-class sampling for the source data")
    g.add_argument("--rcs-temperature", type=cli.positive, default=0.01, help="rare-class sampling temperature")
    g.add_argument("--rcs-min-pixels", type=cli.non_negative_int, default=3000,
                   help="files eligible for class c: > this many pixels of c")
    g.add_argument("--rcs-min-crop-ratio", type=cli.non_negative, default=0.5,
                   help="re-crop until the crop holds this x the min pixels of the class")
    g.add_argument("--source-scale", type=cli.positive_int, nargs="*", default=[1280, 720], metavar="EDGE",
                   help="resize source images to fit LONG SHORT (keep ratio); nothing: no resize")
    g.add_argument("--gen-scale", type=cli.positive_int, nargs="*", default=None, metavar="EDGE",
                   help="resize generated images to fit LONG SHORT (e.g. 1024 1024 for HR configs)")
    g.add_argument("--crop", type=cli.positive_int, default=512,
                   help="training crop (HR configs / HRDA: 1024, with --source-scale 2560 1440 --gen-scale 1024 1024)")
    g.add_argument("--cat-max-ratio", type=cli.fraction, default=0.75,
                   help="re-draw a crop in which one class covers more than this share")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=2, help="per GPU")
    g.add_argument("--max-iters", type=cli.non_negative_int, default=40000, help="optimizer steps in all")
    g.add_argument("--lr", type=cli.positive, default=6e-5, help="AdamW learning rate (peak of the poly schedule)")
    g.add_argument("--head-lr-mult", type=cli.positive, default=10.0, help="learning rate factor of the head")
    g.add_argument("--weight-decay", type=cli.non_negative, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup-iters", type=cli.non_negative_int, default=1500, help="linear warm-up steps")
    g.add_argument("--warmup-ratio", type=cli.fraction, default=1e-6, help="warm-up start as a share of --lr")
    g.add_argument("--poly-power", type=cli.non_negative, default=1.0, help="power of the poly decay")
    g.add_argument("--mixed-precision", choices=common.PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("ImageNet feature distance on thing classes (DAFormer; DGInStyle: --fd-lambda 0.005)")
    g.add_argument("--fd-lambda", type=cli.non_negative, default=0.0,
                   help="weight of the feature distance to the frozen initial (ImageNet) backbone; 0 = off. "
                        "The DGInStyle recipe (DAFormer / HRDA, dacs_fdthings_srconly) uses 0.005")
    g.add_argument("--fd-classes", type=int, nargs="+", default=list(THING_CLASSES), metavar="ID",
                   help="trainIds whose (downscaled) cells count; the default is DAFormer's thing classes")
    g.add_argument("--fd-min-ratio", type=cli.fraction, default=0.75,
                   help="a feature cell takes its majority class only if it covers this share of the cell")
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
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="*", default=[], metavar="LAYOUT:PATH", help="e.g. cityscapes:data/cityscapes")
    g.add_argument("--eval-split", default=None,
                   help="split of the evaluation sets (default: each layout's validation split)")
    g.add_argument("--eval-every", type=cli.non_negative_int, default=4000,
                   help="optimizer steps between evaluations (0: none)")
    g.add_argument("--eval-mode", choices=("slide", "whole"), default="slide",
                   help="sliding-window or whole-image inference")
    g.add_argument("--eval-crop", type=cli.positive_int, default=None,
                   help="sliding window (default: the model's, 512; HRDA 1024)")
    g.add_argument("--eval-stride", type=cli.positive_int, default=None,
                   help="its stride (default: the model's, 256; HRDA 512)")
    g.add_argument("--eval-hr", action=argparse.BooleanOptionalAction, default=None,
                   help="double the layouts' test scales (the 1024 configs; default: on for HRDA models)")
    g.add_argument("--eval-limit", type=cli.positive_int, default=None, help="first N images per dataset")
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=4000, keep_last=1)
    return p


def parse_args(argv=None):
    p = get_parser()
    a = p.parse_args(argv)
    for name in ("source_scale", "gen_scale"):
        v = getattr(a, name)
        if v and len(v) != 2:
            p.error(f"--{name.replace('_', '-')} takes two numbers (LONG SHORT) or none")
    if a.mix_ratio is not None:
        try:
            parse_ratio(a.mix_ratio, 2)
        except ValueError as e:
            p.error(str(e))
    return a


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, parse_args(argv))))
