"""Train an image classifier (segmentation.models.classifier: MiT backbone, pooled linear head) on
an image folder with one subfolder per class (``ROOT/<class>/**/*.png``, torchvision's ImageFolder
layout); the class names are the subfolder names, sorted, and travel in the exported file.

The miniature world trains its style classifier with it: the style of an image, from random crops
(no colour augmentation: colour is what a style is about). Cross-entropy, AdamW with a cosine
schedule after a linear warm-up, random --resolution crops and horizontal flips; --val ROOT (same
layout) reports top-1 accuracy per class.

    python -m train.train_classifier --data world/styles/train --val world/styles/val \
        --output-dir runs/style_classifier --resolution 64 --max-steps 1500
    torchrun --standalone --nproc_per_node=N -m train.train_classifier ...same arguments...
Resume (exact: same world size): add --resume auto or --resume PATH.

Outputs in --output-dir: log.txt, metrics.jsonl, checkpoints/step_*.pt, val.json (accuracy per class)
and at the end classifier.safetensors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ldm import cli
from ldm.atomic import write_text
from segmentation.models.classifier import (ClassifierConfig, ImageClassifier, predict_files, save_classifier,
                                           top1_accuracy)
from train import common
from train.data import ImageDataset, find_images, shard_loader


def class_folders(root: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names, files, labels) of an ImageFolder-layout root."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (expected ROOT/<class>/... images)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise SystemExit(f"{root}: needs two or more class subfolders, found {classes}")
    files, labels = [], []
    for k, c in enumerate(classes):
        found = find_images(root / c)
        files += found
        labels += [k] * len(found)
    return classes, files, labels


def accuracy(model, files, labels, classes, resolution: int, device) -> dict:
    """Top-1 accuracy overall and per class, on centre crops."""
    return top1_accuracy(predict_files(model, files, resolution, device).argmax(-1), labels, classes)


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    classes, files, labels = class_folders(args.data)
    if args.val:  # checked before training, not after it
        val_classes, vfiles, vlabels = class_folders(args.val)
        if val_classes != classes:
            raise SystemExit(f"{args.val}: classes {val_classes} differ from the training classes {classes}")
    model = ImageClassifier(ClassifierConfig(tuple(classes), args.backbone)).to(d.device).train()
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.distributed else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log.info(f"{len(files)} images of {len(classes)} classes ({', '.join(classes)}); "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    step, position = 0, 0
    scaler = common.grad_scaler(d.device, amp_dtype)
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                                     config=vars(args))
    if state is not None:
        step, position = state["step"], state["sampler"]["position"]
        del state
    # The label rides in the caption field of the image dataset (one caption per file).
    dataset = ImageDataset(files, args.resolution, tuple(args.scales), "random", seed=args.seed, rank=d.rank,
                           captions=[str(k) for k in labels], flip=True)
    batches = iter(shard_loader(dataset, args.batch_size, d.rank, d.world_size, args.seed, position,
                                args.num_workers, pin_memory=d.device.type == "cuda"))
    amp = common.autocast(d.device, amp_dtype)
    meter = common.Meter(step)
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_steps, d)
    while step < args.max_steps:
        lr = common.cosine_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        position += args.batch_size
        x = batch["pixel_values"].to(d.device)
        y = torch.tensor([int(c) for c in batch["caption"]], device=d.device)
        with amp:
            logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        grad_norm = common.optimizer_step(opt, scaler)
        step += 1
        guard.check(grad_norm, step)
        progress.update()
        meter.add(loss=loss, acc=(logits.argmax(-1) == y).float().mean())
        if step % args.log_every == 0 or step == args.max_steps:
            metrics = meter.means(d) | {"lr": lr, "grad_norm": float(grad_norm), "samples_per_s": meter.samples_per_s(step, args.batch_size * d.world_size)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)
        if step % args.ckpt_every == 0 or step == args.max_steps:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "config": vars(args),
                     "sampler": {"position": position, "world_size": d.world_size}}
            log.info(f"saved {common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)}")
            state = None
    progress.close()
    if d.is_main:
        log.info(f"exported {save_classifier(model.eval(), out / 'classifier.safetensors')}")
        if args.val:
            result = accuracy(model, vfiles, vlabels, classes, args.resolution, d.device)
            write_text(out / "val.json", json.dumps(result, indent=1) + "\n")
            log.info(f"validation top-1 accuracy {result['accuracy']:.4f}")
    common.finish_run(log, tb)


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.train_classifier", __doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--data", required=True, help="ROOT/<class>/... images")
    g.add_argument("--val", help="a validation root of the same layout")
    g.add_argument("--backbone", default="mit_tiny", help="MiT backbone preset")
    g.add_argument("--resolution", type=cli.integer(8), default=64, help="training crop side in pixels")
    g.add_argument("--scales", type=cli.positive, nargs="+", default=[1.0], help="random rescale ratios before the crop")
    common.add_cosine_optimisation(p, batch_size=32, max_steps=1500, lr=1e-3, warmup_steps=50, weight_decay=0.01)
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=500, keep_last=2)
    return p


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, get_parser().parse_args(argv))))
