"""DIFF: diffusion-feature extraction speed and training throughput.

    python bench/diff.py                                                    # tiny U-Net, 64² crops, CPU
    python bench/diff.py --preset sd15 --device cuda --dtype bf16 --write BENCHMARKS.md   # SD-1.5, 512²

Everything is built in a temporary folder, as ``bench/training.py`` builds it (``make_workspace``):
random diffusion weights of the preset's sizes as one CompVis file (tiny: ldm's tiny U-Net / VAE / CLIP,
the size of the miniature world's; sd15: SD-1.5's) and procedurally drawn street scenes in the GTA layout.
The DIFF segmentor (``--model``: diff_mini for tiny, diff_sd15 for sd15; DIFF's inversion grid, its nine
feature timesteps and IPKL, the frozen networks in fp16 on CUDA) is built on those weights.

Rows (images/s: the median of --repeats timed calls after a warm-up, synchronised on CUDA; --dtype is the
autocast of the trainable part):
  - feature extraction, the unconditional pass (VAE encode + the inversion up to t = 91 + the hooked features)
    on a batch of --batch crops, as at test time;
  - the conditional pass of IPKL with --classes prompted classes present in the labels (the U-Net batch
    grows by one entry per class);
  - the segmentor's eval forward (extraction, fusion, DAFormer head) on the same batch;
  - training: ``python -m train.train_segmentation --model M --diff-unet FILE`` as its own process for
    --warmup + --steps steps (batch --train-batch), its ``samples_per_s`` over the windows after the warm-up
    (``bench/training.py``'s ``steady_rate``).
"""
from __future__ import annotations

import datetime
import math
import platform
import shlex
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.training import emit, make_workspace, run_script, steady_rate, time_median  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.formats import DTYPES  # noqa: E402
from segmentation.models import PRESETS, build_segmentor  # noqa: E402

SIZES = {"tiny": dict(size=64, model="diff_mini"), "sd15": dict(size=512, model="diff_sd15")}


def extraction_rows(a, base: Path) -> list[tuple]:
    device = torch.device(a.device)
    cfg = PRESETS[a.model]
    model = build_segmentor(replace(cfg, diff=replace(cfg.diff, unet=str(base)))).to(device).eval()
    feats = model.backbone.diffusion
    s, b = a.size, a.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=g).to(device)
    label = torch.zeros(b, s, s, dtype=torch.long)  # road, then one vertical band per prompted class
    classes = cfg.diff.ipkl_classes[:a.classes]
    for k, c in enumerate(classes):
        label[:, :, (k + 1) * s // (len(classes) + 1):] = c
    label = label.to(device)
    z = model.backbone.latents(x)
    amp = torch.autocast(device.type, dtype=DTYPES[a.dtype], enabled=a.dtype != "fp32")

    def unconditional():
        model.backbone.latents(x)
        feats(z)

    def conditional():
        model.backbone.latents(x)
        feats(z, label)

    def forward():
        with torch.no_grad(), amp:
            model(x)

    rows = []
    steps = cfg.diff.timesteps.index(max(cfg.diff.feature_timesteps)) + 1
    for name, fn, what in (
            ("DIFF features, unconditional", unconditional, f"VAE encode + {steps} U-Net calls of batch {b}"),
            ("DIFF features, conditional", conditional,
             f"VAE encode + {steps} U-Net calls of batch {(len(classes) + 1) * b} ({len(classes)} class prompts)"),
            ("DIFF segmentor eval forward", forward, "features + fusion + DAFormer head")):
        t, mem = time_median(fn, device, a.warmup_calls, a.repeats)
        rows.append((name, f"{a.model}, {b} × {s}² crops; {what}", f"{b / t:.2f} images/s", mem,
                     f"median of {a.repeats}"))
    params = sum(p.numel() for p in model.parameters())
    rows.append(("trainable parameters", f"{a.model}: fusion + head", f"{params / 1e6:.2f} M", None,
                 f"features {feats.channels} channels at strides 8, 16, 32"))
    return rows


def training_row(a, base: Path, data: Path, work: Path) -> tuple:
    out = work / "run_diff"
    shutil.rmtree(out, ignore_errors=True)
    total = a.train_warmup + a.steps
    s = a.size
    args = ["--model", a.model, "--diff-unet", str(base), "--source", f"gta:{data}", "--crop", str(s),
            "--source-scale", str(1280 * s // 512), str(720 * s // 512), "--batch-size", str(a.train_batch),
            "--output-dir", str(out), "--device", a.device, "--mixed-precision", a.dtype, "--max-iters", str(total),
            "--log-every", str(math.gcd(a.train_warmup, a.steps)), "--ckpt-every", str(total), "--keep-last", "1",
            "--num-workers", str(a.workers)]
    rows = run_script("segmentation", args, out, a.timeout)
    r = steady_rate(rows, a.train_warmup, a.train_batch, f"train/train_segmentation.py ({out / 'metrics.jsonl'})",
                    a.device.startswith("cuda"))
    return ("train/train_segmentation.py", f"{a.model} IPKL training, {s}² crops, batch {a.train_batch}",
            f"{r['samples_per_s']:.2f} samples/s ({r['it_per_s']:.2f} it/s)", r["peak_gib"],
            f"steps {a.train_warmup + 1}-{total}; two passes per step, AdamW, poly lr")


def main(argv: list[str] | None = None) -> str:
    p = cli.parser("python bench/diff.py", __doc__)
    p.add_argument("--preset", choices=sorted(SIZES), default="tiny", help="sizes of the random diffusion weights")
    p.add_argument("--model", help="DIFF segmentor preset (default: diff_mini for tiny, diff_sd15 for sd15)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the trainable part")
    p.add_argument("--size", type=cli.positive_int, help="crop side (default: 64 for tiny, 512 for sd15)")
    p.add_argument("--batch", type=cli.positive_int, default=2, help="crops per extraction call")
    p.add_argument("--classes", type=cli.non_negative_int, default=2, help="prompted classes present in the conditional pass")
    p.add_argument("--train-batch", type=cli.positive_int, default=2, help="batch of the training run")
    p.add_argument("--steps", type=cli.positive_int, default=4, help="timed training steps")
    p.add_argument("--train-warmup", type=cli.non_negative_int, default=2, help="untimed training steps first")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed calls per row (median)")
    p.add_argument("--warmup-calls", type=cli.non_negative_int, default=1, help="untimed calls before a row")
    p.add_argument("--images", type=cli.positive_int, default=4, help="street scenes drawn for the data folder")
    p.add_argument("--workers", type=cli.non_negative_int, default=0, help="DataLoader workers of the training run")
    p.add_argument("--timeout", type=cli.positive, default=900, help="seconds for the training run")
    p.add_argument("--no-train", action="store_true", help="extraction rows only")
    p.add_argument("--workdir", help="build here and keep it (default: a temporary folder, removed)")
    p.add_argument("--write", help="append the table to this markdown file")
    a = p.parse_args(argv)
    a.size = a.size or SIZES[a.preset]["size"]
    a.model = a.model or SIZES[a.preset]["model"]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_diff_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, data = make_workspace(work, a.preset, a.size, a.images)
        rows = extraction_rows(a, base)
        if not a.no_train:
            rows.append(training_row(a, base, data, work))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    cuda = a.device.startswith("cuda")
    dev = (torch.cuda.get_device_name(torch.device(a.device)) if cuda
           else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    cmd = shlex.join(["python", "bench/diff.py", *(sys.argv[1:] if argv is None else argv)])
    table = (f"### DIFF feature extraction and training ({a.preset} U-Net, {a.model})\n\n"
             f"{datetime.date.today()}, {dev}, frozen networks in {'fp16' if cuda else 'fp32'}, trainable part in "
             f"{a.dtype}, torch {torch.__version__}; `{cmd}`\n\n"
             f"Random {a.preset} diffusion weights; DIFF's inversion grid and feature timesteps of `{a.model}`. "
             "Peak memory on CUDA only.\n\n"
             "| what | setting | rate | peak memory GiB | notes |\n|---|---|---|---|---|\n")
    table += "".join(f"| {s} | {w} | {r} | {'n/a' if m is None else f'{m:.1f}'} | {n} |\n" for s, w, r, m, n in rows)
    return emit(table, a.write)


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: main(argv) and 0))  # a BenchError (a RuntimeError) is one line
