"""Evaluate a segmentor on the DG benchmarks: sliding-window inference, mIoU, a table and JSON.

    python -m segmentation.evaluate --checkpoint CKPT \\
        --dataset cityscapes:data/cityscapes bdd100k:data/bdd100k mapillary:data/mapillary \\
                  acdc:data/acdc dark_zurich:data/dark_zurich \\
        [--mode slide --crop 512 --stride 256] [--hr | --no-hr] [--out results.json] [--diff-unet PATH]
    torchrun --standalone --nproc_per_node=4 -m segmentation.evaluate ...same arguments...

Any subset of the five benchmarks (or any layout of segmentation.datasets: ``gta``, ``folder``,
``dginstyle`` ...) can be given as LAYOUT:PATH. As in SegModel's ``tools/test.py``:
the image is resized (keep ratio) to the dataset's test scale (Cityscapes/BDD100K/Mapillary
1024x512, ACDC/Dark Zurich 960x540; doubled with ``--hr``), logits are computed over sliding
512x512 windows with stride 256 (overlaps averaged) or on the whole image, resized back to the
label's size (bilinear), and the arg-max is scored against the full-resolution label. An HRDA
checkpoint (exp 61) is evaluated the same way with its own defaults: 1024 windows, stride 512,
doubled test scales (each window runs HRDA's context + sliding-detail inference). Under
torchrun the images are sharded over ranks and the confusion matrices all-reduced. The table
prints IoUs x 100 with 1 decimal; the JSON holds fractions (mIoU convention: segmentation.metrics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ldm import cli
from ldm.atomic import write_text

from .datasets import BENCHMARKS, SegDataset, parse_spec
from .labels import CLASS_NAMES, IGNORE, NUM_CLASSES
from .metrics import ConfusionMeter, summarize


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg ``slide_inference`` window origins along one axis; the last window is aligned to the
    edge, and a single window covers an axis shorter than the crop."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model: Callable, image: torch.Tensor, crop: int | tuple[int, int] = 512,
                 stride: int | tuple[int, int] = 256, num_classes: int = NUM_CLASSES,
                 window_batch: int = 4) -> torch.Tensor:
    """Logits (B, C, H, W) of ``image`` (B, 3, H, W) averaged over overlapping ``crop`` windows
    placed every ``stride`` pixels (plus edge-aligned ones). Windows are run ``window_batch`` at
    a time (numerically the same as one by one in eval mode)."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    b, _, h, w = image.shape
    boxes = [(y, min(y + ch, h), x, min(x + cw, w)) for y in window_starts(h, ch, sh) for x in window_starts(w, cw, sw)]
    out = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for k in range(0, len(boxes), window_batch):
        chunk = boxes[k:k + window_batch]
        same = all((y2 - y1, x2 - x1) == (chunk[0][1] - chunk[0][0], chunk[0][3] - chunk[0][2]) for y1, y2, x1, x2 in chunk)
        if same:
            crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            logits = model(crops).float().split(b)
        else:
            logits = [model(image[:, :, y1:y2, x1:x2]).float() for y1, y2, x1, x2 in chunk]
        for (y1, y2, x1, x2), lg in zip(chunk, logits):
            out[:, :, y1:y2, x1:x2] += lg
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, mode: str = "slide", crop=512, stride=256,
                   out_size: tuple[int, int] | None = None, num_classes: int = NUM_CLASSES,
                   window_batch: int = 4) -> torch.Tensor:
    """Logits for ``image`` by ``mode`` ("slide" or "whole"), resized to ``out_size`` if given."""
    if mode == "slide":
        logits = slide_logits(model, image, crop, stride, num_classes, window_batch)
    elif mode == "whole":
        logits = model(image).float()
    else:
        raise ValueError(f"unknown inference mode {mode!r} (slide | whole)")
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def default_window(model) -> tuple[int, int]:
    """The sliding window (crop, stride) a segmentor is evaluated with: 512 / 256 (the 512
    configs), the model's own (``default_window``, e.g. HRDA's 1024 / 512) where it has one."""
    return tuple(getattr(getattr(model, "module", model), "default_window", (512, 256)))


def is_hr_model(model) -> bool:
    """Models trained on the HR (1024) configs, tested at doubled scales: HRDA."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    return getattr(cfg, "hrda", None) is not None


def evaluate_dataset(model, dataset: SegDataset, *, mode: str = "slide", crop=None, stride=None,
                     device="cpu", autocast_dtype: torch.dtype | None = None, limit: int | None = None,
                     window_batch: int = 4, progress: str | None = None,
                     num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Confusion matrix of ``model`` over ``dataset`` (sharded over ranks and all-reduced when a
    process group is initialised). ``crop`` / ``stride`` default to ``default_window(model)``.
    `progress`: a name to show rank 0's progress under (``ldm.cli.Progress``; None: quiet)."""
    rank, world = _dist_info()
    crop = default_window(model)[0] if crop is None else crop
    stride = default_window(model)[1] if stride is None else stride
    was_training = model.training
    model.eval()
    meter = ConfusionMeter(num_classes, IGNORE, device=device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    bar = cli.Progress(len(range(rank, n, world)), progress or "", "images", enabled=progress is not None and rank == 0)
    for i in range(rank, n, world):
        item = dataset[i]
        image = item["image"][None].to(device)
        label = item["label"].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = predict_logits(model, image, mode, crop, stride, tuple(label.shape), num_classes, window_batch)
        meter.update(logits.argmax(1)[0], label)
        bar.update()
    model.train(was_training)
    return meter.result()


def format_table(results: dict[str, dict], class_names: Sequence[str] = CLASS_NAMES) -> str:
    """Classes as rows, datasets as columns, IoU x 100 with 1 decimal ('-' for NaN), then mIoU."""
    names = list(results)
    w0 = max(len(c) for c in [*class_names, "mIoU"]) + 2
    ws = [max(len(n), 6) + 2 for n in names]
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    lines = ["class".ljust(w0) + "".join(n.rjust(w) for n, w in zip(names, ws))]
    lines.append("-" * len(lines[0]))
    for c in class_names:
        lines.append(c.ljust(w0) + "".join(fmt(results[n]["IoU"].get(c)).rjust(w) for n, w in zip(names, ws)))
    lines.append("-" * len(lines[0]))
    lines.append("mIoU".ljust(w0) + "".join(fmt(results[n]["mIoU"]).rjust(w) for n, w in zip(names, ws)))
    if len(names) > 1:
        vals = [results[n]["mIoU"] for n in names if results[n]["mIoU"] is not None]
        lines.append(f"average mIoU over {len(vals)} datasets: {fmt(sum(vals) / len(vals)) if vals else '-'}")
    return "\n".join(lines)


def _init_distributed() -> bool:
    """Initialise a process group when started by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def get_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m segmentation.evaluate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="segmentor file: a training checkpoint or an export")
    ap.add_argument("--config", default=None, help="preset name, for files that carry no config")
    ap.add_argument("--diff-unet", default=None, metavar="PATH",
                    help="DIFF checkpoints: where the frozen diffusion weights are now, if they moved (their "
                         "fingerprint is still checked)")
    ap.add_argument("--dataset", nargs="+", required=True, metavar="LAYOUT:PATH",
                    help=f"datasets to evaluate; benchmarks: {', '.join(BENCHMARKS)}")
    ap.add_argument("--split", default=None, help="split (default: each layout's validation split)")
    ap.add_argument("--mode", choices=("slide", "whole"), default="slide",
                    help="sliding-window or whole-image inference")
    ap.add_argument("--crop", type=cli.positive_int, default=None, help="sliding window (default: 512, HRDA 1024)")
    ap.add_argument("--stride", type=cli.positive_int, default=None, help="window stride (default: 256, HRDA 512)")
    ap.add_argument("--window-batch", type=cli.positive_int, default=4, help="sliding windows per forward")
    ap.add_argument("--test-scale", type=cli.non_negative_int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                    help="override every dataset's test resize (keep ratio); 0 0 keeps the size")
    ap.add_argument("--hr", action=argparse.BooleanOptionalAction, default=None,
                    help="double the datasets' default test scales (the 1024 configs; default: on for HRDA "
                         "checkpoints); an explicit --test-scale is used as given")
    ap.add_argument("--limit", type=cli.positive_int, default=None, help="evaluate the first N images of each dataset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--amp", choices=("fp16", "bf16"), default=None, help="autocast dtype (CUDA; default: fp32)")
    ap.add_argument("--out", default=None, help="JSON output (default: <checkpoint>_eval.json)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return ap


def parse_args(argv=None):
    return get_parser().parse_args(argv)


def main(argv=None) -> int:
    from .models import load_segmentor

    args = parse_args(argv)
    _init_distributed()
    rank, world = _dist_info()
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    log = print if rank == 0 else (lambda *a, **k: None)
    config = args.config
    if args.diff_unet:  # the file's config, its reference to the frozen weights moved
        from .models.segmentor import read_segmentor_file

        config = read_segmentor_file(Path(args.checkpoint))[1]
        if not config or not config.get("diff"):
            raise SystemExit(f"--diff-unet: {args.checkpoint} is not a DIFF checkpoint")
        config["diff"]["unet"] = args.diff_unet
    model = load_segmentor(args.checkpoint, config, device=device)
    args.crop = default_window(model)[0] if args.crop is None else args.crop
    args.stride = default_window(model)[1] if args.stride is None else args.stride
    args.hr = is_hr_model(model) if args.hr is None else args.hr
    log(f"{type(model).__name__} ({model.cfg.backbone}, {model.cfg.head}): {args.mode} inference"
        + (f" over {args.crop} windows, stride {args.stride}" if args.mode == "slide" else "")
        + (", doubled test scales" if args.hr else ""))
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.amp]
    results, meta = {}, {}
    for spec in args.dataset:
        layout, path = parse_spec(spec)
        scale = layout.test_scale if args.test_scale is None else tuple(args.test_scale)
        if scale == (0, 0):
            scale = None
        elif args.hr and scale is not None and args.test_scale is None:  # an explicit --test-scale is used as given
            scale = (2 * scale[0], 2 * scale[1])
        ds = SegDataset(path, layout, args.split, test_scale=scale)
        name = layout.name if layout.name not in results else spec
        log(f"{name}: {len(ds)} images from {path} (test scale {scale}, {args.mode})")
        tic = time.perf_counter()
        cm = evaluate_dataset(model, ds, mode=args.mode, crop=args.crop, stride=args.stride, device=device,
                              autocast_dtype=amp, limit=args.limit, window_batch=args.window_batch,
                              progress=None if args.no_progress else name, num_classes=model.cfg.num_classes)
        results[name] = summarize(cm.cpu())
        results[name]["confusion_matrix"] = cm.cpu().tolist()
        meta[name] = {"path": str(path), "images": len(ds) if args.limit is None else min(args.limit, len(ds)),
                      "test_scale": scale, "seconds": round(time.perf_counter() - tic, 2)}
    if rank == 0:
        print(format_table(results))
        out = Path(args.out) if args.out else Path(str(args.checkpoint) + "_eval.json")
        payload = {"checkpoint": str(args.checkpoint), "mode": args.mode, "crop": args.crop, "stride": args.stride,
                   "hr": args.hr, "world_size": world, "datasets": meta, "results": results}
        write_text(out, json.dumps(payload, indent=1))
        print(f"wrote {out}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
