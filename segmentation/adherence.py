"""Label adherence of generated data: segment each generated image and score it against the
label it was generated from, to find and drop samples whose layout drifted.

example:
    python -m segmentation.adherence --checkpoint CKPT --generated OUT_DIR \\
        [--min-miou 0.5 --write-filtered OUT_DIR/manifest_filtered.jsonl] [--report PREFIX]

For every sample of a DGInStyle output folder (``manifest.jsonl`` of mrlf.generate; or
``--layout folder`` for a plain images/ + labels/ folder) the segmentor predicts the image (whole
image by default, ``--mode slide`` for large ones), and the sample's mIoU against its
conditioning label is computed with the dataset convention of segmentation.metrics (void 255
ignored; classes in neither label nor prediction left out). Writes ``PREFIX.json`` (per-sample
mIoU, pixel accuracy, per-class IoU, and the pooled confusion over all samples) and ``PREFIX.csv``
(one line per sample, worst first); the JSON also counts, per class, the label components smaller than
``--small-area`` pixels and those the segmentor recovers (more than half their pixels right: small
objects, which drift first); ``--write-filtered`` writes the manifest lines of the samples
with mIoU >= ``--min-miou`` (unchanged records), ready to be read as a ``dginstyle`` folder
manifest. The scorer is only as good as the segmentor: use one trained on real data (e.g. GTA),
not one trained on the samples being judged.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ldm import cli
from ldm.atomic import atomic_file, write_text

from .components import component_recall, small_component_hits
from .datasets import SegDataset, find_pairs, get_layout, read_manifest
from .evaluate import predict_logits
from .labels import CLASS_NAMES, NUM_CLASSES
from .metrics import accuracy_from_confusion, confusion_matrix, iou_from_confusion, nanmean, summarize


def _clean(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


@torch.no_grad()
def score_samples(model: Callable, dataset: SegDataset, ids: list[str] | None = None, *, mode: str = "whole",
                  crop: int = 512, stride: int = 256, device="cpu", num_classes: int = NUM_CLASSES,
                  small_area: int = 16, progress: bool = False) -> dict:
    """{"samples": [{id, image, label, mIoU, aAcc, IoU{class: v}}, ...], "pooled": summary,
    "small_components": {max_area, hits{class: n}, totals{class: n}, recall}} (label components of
    fewer than `small_area` pixels, pooled). `progress`: show it (``ldm.cli.Progress``)."""
    if hasattr(model, "eval"):
        model.eval()
    samples = []
    pooled = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    hits, totals = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    bar = cli.Progress(len(dataset), "adherence", "samples", enabled=progress)
    for i in range(len(dataset)):
        item = dataset[i]
        label = item["label"].to(device)
        logits = predict_logits(model, item["image"][None].to(device), mode, crop, stride, tuple(label.shape), num_classes)
        pred = logits.argmax(1)[0]
        cm = confusion_matrix(pred, label, num_classes).cpu()
        pooled += cm
        h, t = small_component_hits(label, pred, small_area, num_classes)
        hits, totals = hits + h, totals + t
        iou = iou_from_confusion(cm)
        aacc, _ = accuracy_from_confusion(cm)
        img, lab = dataset.pairs[i]
        samples.append({"id": ids[i] if ids else Path(img).stem, "image": str(img), "label": str(lab),
                        "mIoU": _clean(nanmean(iou)), "aAcc": _clean(aacc),
                        "IoU": {n: _clean(v) for n, v in zip(CLASS_NAMES, iou.tolist()) if not math.isnan(v)}})
        bar.update()
    small = {"max_area": small_area,
             "hits": {n: int(v) for n, v in zip(CLASS_NAMES, hits)},
             "totals": {n: int(v) for n, v in zip(CLASS_NAMES, totals)},
             "recall": _clean(component_recall(hits, totals))}
    return {"samples": samples, "pooled": summarize(pooled), "small_components": small}


def write_report(result: dict, prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = Path(prefix)
    js, cs = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
    write_text(js, json.dumps(result, indent=1))
    rows = sorted(result["samples"], key=lambda s: (s["mIoU"] is None, s["mIoU"] if s["mIoU"] is not None else 0))
    with atomic_file(cs) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mIoU", "aAcc", "image", "label"])
        for s in rows:
            w.writerow([s["id"], "" if s["mIoU"] is None else f"{s['mIoU']:.4f}",
                        "" if s["aAcc"] is None else f"{s['aAcc']:.4f}", s["image"], s["label"]])
    return js, cs


def write_filtered(records: list[dict], scores: list[dict], min_miou: float, path: str | os.PathLike) -> int:
    """Write the manifest records whose sample mIoU >= ``min_miou``; returns how many were kept.
    ``image``/``label`` stay relative to the generated folder, so the file can replace
    manifest.jsonl there (or be read with ``read_manifest`` after renaming)."""
    keep = []
    for rec, s in zip(records, scores):
        if s["mIoU"] is not None and s["mIoU"] >= min_miou:
            keep.append({k: v for k, v in rec.items() if k not in ("image_path", "label_path")})
    write_text(path, "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in keep))
    return len(keep)


def get_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m segmentation.adherence", __doc__)
    ap.add_argument("--checkpoint", required=True, help="segmentor file (trained on real data, e.g. GTA)")
    ap.add_argument("--config", default=None, help="preset name, for files that carry no config")
    ap.add_argument("--generated", required=True, help="DGInStyle output folder (manifest.jsonl, images/, labels/)")
    ap.add_argument("--layout", default="dginstyle", help="dginstyle (default) or folder")
    ap.add_argument("--mode", choices=("whole", "slide"), default="whole",
                    help="whole-image or sliding-window inference")
    ap.add_argument("--crop", type=cli.positive_int, default=512, help="sliding window (--mode slide)")
    ap.add_argument("--stride", type=cli.positive_int, default=256, help="window stride (--mode slide)")
    ap.add_argument("--test-scale", type=cli.positive_int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                    help="resize images (keep ratio) before inference; default: native size")
    ap.add_argument("--small-area", type=cli.positive_int, default=16,
                    help="label components below this many pixels count as small objects")
    ap.add_argument("--min-miou", type=cli.non_negative, default=None, help="keep samples with mIoU >= this")
    ap.add_argument("--write-filtered", default=None, help="write the kept manifest records here")
    ap.add_argument("--report", default=None, help="report prefix (default: GENERATED/adherence)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return ap


def parse_args(argv=None):
    ap = get_parser()
    a = ap.parse_args(argv)
    if (a.min_miou is None) != (a.write_filtered is None):
        ap.error("--min-miou and --write-filtered go together")
    return a


def main(argv=None) -> int:
    from .models import load_segmentor

    args = parse_args(argv)
    layout = get_layout(args.layout)
    root = Path(args.generated)
    if layout.name == "dginstyle":
        records = read_manifest(root)
        pairs = [(Path(r["image_path"]), Path(r["label_path"])) for r in records]
        ids = [str(r["id"]) for r in records]
    else:
        if args.write_filtered:
            raise SystemExit("error: --write-filtered needs a dginstyle folder (manifest.jsonl)")
        records, pairs = None, find_pairs(root, layout)
        ids = None
    ds = SegDataset(root, layout, pairs=pairs, test_scale=tuple(args.test_scale) if args.test_scale else None)
    model = load_segmentor(args.checkpoint, args.config, device=args.device)
    print(f"scoring {len(ds)} samples of {root} with {args.checkpoint}")
    result = score_samples(model, ds, ids, mode=args.mode, crop=args.crop, stride=args.stride,
                           device=args.device, num_classes=model.cfg.num_classes, small_area=args.small_area,
                           progress=not args.no_progress)
    result["checkpoint"], result["generated"] = str(args.checkpoint), str(root)
    vals = [s["mIoU"] for s in result["samples"] if s["mIoU"] is not None]
    if vals:
        v = torch.tensor(vals)
        print(f"per-sample mIoU: mean {v.mean():.3f}, median {v.median():.3f}, min {v.min():.3f}; "
              f"pooled mIoU {result['pooled']['mIoU']:.3f}")
    js, cs = write_report(result, args.report or root / "adherence")
    print(f"wrote {js} and {cs}")
    if args.write_filtered:
        kept = write_filtered(records, result["samples"], args.min_miou, args.write_filtered)
        print(f"kept {kept}/{len(records)} samples with mIoU >= {args.min_miou}: {args.write_filtered}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
