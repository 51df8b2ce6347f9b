"""Training throughput and peak memory of the training scripts, plus segmentation inference speed.

    python bench/training.py --device cuda --dtype bf16                    # SD-1.5 sizes, 512², batch 4
    python bench/training.py --device cuda --dtype bf16 --write BENCHMARKS.md
    python bench/training.py --preset tiny --device cpu --dtype fp32       # smoke run, < 1 min on 2 idle cores
    python bench/training.py --preset tiny --device cpu --dtype fp32 --only segmentation uda   # UDA vs source-only

Everything is built in a temporary folder and nothing is downloaded: random weights of the preset's
sizes written as one CompVis file (ldm.checkpoint.save_compvis; our configs ride in its metadata, so
the tiny sizes reload too), and procedurally drawn street scenes (segmentation.synthetic) as a GTA
layout (images/*.png, colourised labels with noise + labels/*_labelTrainIds.png) that every script
reads (train_uda: as its labelled source, and its images as the unlabelled target). Each script then runs as its own process (`python -m train.<script>`, as a user would
start it) for --warmup + --steps optimizer steps with grad-accum 1, no sampling / validation / export;
--dtype is their --mixed-precision (autocast, fp32 master weights); the ControlNet starts as the script's
default copy of U^S's encoder half, the segmentor from random weights (no mit_b5.pth needed for speed).

Throughput: a script's metrics.jsonl row at step b holds `samples_per_s` over the steps since its
previous row a (train/*.py reset their clock at every log row), so that window took
(b - a) * samples_per_step / samples_per_s seconds. The reported rate is the samples of the windows
after the warm-up divided by the sum of their times; --log-every is gcd(warmup, steps), so a window
boundary falls exactly on the end of the warm-up. Peak memory is the script's own `max_mem_gb`
(torch.cuda.max_memory_allocated over the whole run, weights and optimizer state included) on CUDA,
and the peak resident set size of the script's process (ru_maxrss: interpreter and libraries
included) on CPU.
The final checkpoint is written after the last row and does not count.
Segmentation inference runs in this process: the segmentor's forward on a batch of crops and the
sliding-window inference of segmentation.evaluate on a Cityscapes-test-scale image (2S x S), under
autocast in --dtype; median of --repeats timed calls after a warm-up, synchronised on CUDA.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm import checkpoint as ckpt_io  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.sd import StableDiffusion  # noqa: E402
from segmentation.evaluate import predict_logits  # noqa: E402
from segmentation.labels import TRAIN_ID_SUFFIX, colorize, save_label  # noqa: E402
from segmentation.models import PRESETS as SEG_PRESETS  # noqa: E402
from segmentation.models import build_segmentor  # noqa: E402
from segmentation.synthetic import street_scene  # noqa: E402

# sd15: the recipe's networks (SD-1.5 U-Net / ControlNet, DAFormer MiT-B5). tiny: CPU smoke sizes.
PRESETS = {"sd15": dict(size=512, seg_model="daformer_mitb5"), "tiny": dict(size=64, seg_model="tiny")}
SCRIPTS = {"unet": "finetune_unet", "controlnet": "train_controlnet", "segmentation": "train_segmentation",
           "uda": "train_uda"}
SEGMENTATION = ("segmentation", "uda")  # the scripts of the segmentation recipe (batch --seg-batch)
WHAT = {"unet": ("U-Net fine-tuning (U^S), ε-MSE", "VAE encode in the step"),
        "controlnet": ("label ControlNet on frozen U^S, ε-MSE", "VAE + CLIP encode in the step; diffusers' "
                       "published ControlNet training: ≈38 GB at batch 4")}


class BenchError(RuntimeError):
    """A script that failed, timed out or left no usable metrics."""


def make_workspace(work: Path, preset: str, size: int, n_images: int, seed: int = 0) -> tuple[Path, Path]:
    """(base checkpoint, data root): random SD weights as a CompVis file, a GTA-layout folder of
    S x 2S street scenes (the labels are what the ControlNet and the segmentor learn from)."""
    sd = StableDiffusion.random(preset, seed=seed)
    base = ckpt_io.save_compvis(work / f"sd_{preset}_random.safetensors",
                                {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder},
                                dtype=torch.float16, overwrite=True)  # fp16 halves the file; loaded as fp32
    del sd
    gc.collect()
    data = work / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        label = street_scene(size, 2 * size, seed=seed + i)
        # colours + noise: PNGs that decode at about a photo's cost, not a flat image's
        rgb = colorize(label).astype(np.int16) + rng.integers(-24, 25, (*label.shape, 3), dtype=np.int16)
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(data / "images" / f"{i:05d}.png")
        save_label(label, data / "labels" / f"{i:05d}{TRAIN_ID_SUFFIX}")
    return base, data


def script_args(key: str, a, base: Path, data: Path, out: Path, max_steps: int, log_every: int) -> list[str]:
    """The script's own options: the recipe's defaults except what a benchmark must pin down."""
    common = ["--output-dir", str(out), "--device", a.device, "--mixed-precision", a.dtype,
              "--max-iters" if key in SEGMENTATION else "--max-steps", str(max_steps),
              "--log-every", str(log_every), "--ckpt-every", str(max_steps), "--keep-last", "1",
              "--num-workers", str(a.workers)]
    if key in SEGMENTATION:
        s = a.size  # the recipe's resize-to-fit 1280 x 720 before the 512 crop, scaled with --size
        scale = [str(1280 * s // 512), str(720 * s // 512)]
        seg = common + ["--model", a.seg_model, "--source", f"gta:{data}", "--crop", str(s), "--source-scale", *scale,
                        "--batch-size", str(a.seg_batch)]
        # self-training with MIC's defaults; the target: the same images, unlabelled, at the same scale
        return seg + (["--target", str(data / "images"), "--target-scale", *scale] if key == "uda" else [])
    diff = ["--base", str(base), "--resolution", str(a.size), "--batch-size", str(a.batch), "--grad-accum", "1",
            "--no-export"] + (["--gradient-checkpointing"] if a.gradient_checkpointing else [])
    if key == "unet":
        return common + diff + ["--data", str(data / "images"), "--sample-every", "0"]
    # ControlNet: rare-class crops as in the recipe; the eligibility threshold (3000 px of GTA-size
    # labels) is scaled with the label area so tiny labels still have eligible classes.
    rcs_px = max(1, 3000 * a.size * a.size // (512 * 512))
    return common + diff + ["--data", str(data), "--layout", "gta", "--validation-every", "0",
                            "--rcs-min-pixels", str(rcs_px)]


def run_script(key: str, args: list[str], out: Path, timeout: float) -> tuple[list[dict], float]:
    """Run `python -m train.<script> args` from the repository root; return its metrics.jsonl rows and
    the peak resident set size of its process in GiB."""
    module = f"train.{SCRIPTS[key]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = out.parent / f"{SCRIPTS[key]}.log"
    print(f"[bench] {module} {shlex.join(args)}", file=sys.stderr, flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        # own process group: on a timeout the DataLoader workers go down with the script
        p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (p.pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # the resource usage of this child alone
        timed_out = not timer.is_alive()
        timer.cancel()
        rc = None if timed_out else os.waitstatus_to_exitcode(status)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    if rc != 0:
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with status {rc}"
        raise BenchError(f"{module} {why}; last lines of its output:\n{tail}")
    print(f"[bench] {module} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise BenchError(f"{module}: wrote no {path}; last lines of its output:\n{tail}")
    rss_gib = usage.ru_maxrss * 1024 / 2**30  # Linux reports kibibytes
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], rss_gib


def steady_rate(rows: list[dict], warmup: int, per_step: int, source: str, need_mem: bool) -> dict:
    """Samples/s and iterations/s over the logged windows that start at or after step `warmup`
    (rows: metrics.jsonl of one fresh run; each row's samples_per_s covers the steps since the
    previous row, or since step 0), and the peak max_mem_gb of all rows (None when not needed)."""
    rows = sorted((r for r in rows if "samples_per_s" in r or "loss" in r), key=lambda r: r["step"])
    samples = seconds = steps = 0.0
    prev = 0
    for r in rows:
        if "samples_per_s" not in r:
            raise BenchError(f"{source}: the row of step {r['step']} has no 'samples_per_s'")
        n = r["step"] - prev
        if prev >= warmup and n > 0:
            if not r["samples_per_s"] > 0:
                raise BenchError(f"{source}: step {r['step']}: samples_per_s = {r['samples_per_s']!r}")
            samples += n * per_step
            seconds += n * per_step / r["samples_per_s"]
            steps += n
        prev = r["step"]
    if steps == 0:
        raise BenchError(f"{source}: no logged steps after the {warmup} warm-up steps "
                         f"(rows at steps {[r['step'] for r in rows]})")
    mem = None
    if need_mem:
        missing = [r["step"] for r in rows if "max_mem_gb" not in r]
        if missing or not rows:
            raise BenchError(f"{source}: no 'max_mem_gb' in the rows of steps {missing} (a CUDA run logs it)")
        mem = max(r["max_mem_gb"] for r in rows)
    return dict(samples_per_s=samples / seconds, it_per_s=steps / seconds, steps=int(steps), peak_gib=mem)


def time_median(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median seconds of `repeats` calls after `warmup` calls, peak GiB allocated on CUDA or None)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def emit(table: str, path: str | None) -> str:
    """Print a benchmark's markdown table and append it to `path` (BENCHMARKS.md) when given."""
    print(table)
    if path:
        with open(path, "a") as f:
            f.write("\n" + table)
    return table


def seg_inference(a) -> list[tuple]:
    """Table rows for the segmentor's forward on a batch of crops and for sliding-window inference."""
    device = torch.device(a.device)
    dtype = ckpt_io.DTYPES[a.dtype]
    model = build_segmentor(a.seg_model).to(device).eval()  # fp32 weights, autocast, as evaluate_dataset
    s, b = a.size, a.infer_batch
    g = torch.Generator().manual_seed(0)
    crops = torch.randn(b, 3, s, s, generator=g).to(device)
    image = torch.randn(1, 3, s, 2 * s, generator=g).to(device)  # Cityscapes test scale 1024 x 512 at S = 512

    def amp():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.no_grad(), amp():
            model(crops)

    def slide():
        with torch.no_grad(), amp():
            predict_logits(model, image, "slide", crop=s, stride=s // 2)

    t_fwd, m_fwd = time_median(forward, device, a.infer_warmup, a.repeats)
    t_sl, m_sl = time_median(slide, device, a.infer_warmup, a.repeats)
    del model
    gc.collect()
    return [("segmentation forward", f"{a.seg_model} forward, batch {b} × {s}² crops", f"{b / t_fwd:.2f} images/s",
             m_fwd, f"median of {a.repeats}; weights included in memory"),
            ("segmentation.evaluate slide", f"{a.seg_model}, {2 * s}×{s} image, 3 windows of {s}², stride {s // 2}",
             f"{1 / t_sl:.2f} images/s", m_sl, "predict_logits(mode='slide'), windows 4 per call")]


def main(argv: list[str] | None = None) -> str:
    p = cli.parser("python bench/training.py", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd15", help="model sizes (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="mixed-precision dtype")
    p.add_argument("--size", type=cli.positive_int, help="crop side (default: 512 for sd15, 64 for tiny)")
    p.add_argument("--batch", type=cli.positive_int, default=4, help="micro-batch of the diffusion scripts")
    p.add_argument("--seg-batch", type=cli.positive_int, default=2, help="segmentation training batch (the recipe's 2)")
    p.add_argument("--seg-model", choices=sorted(SEG_PRESETS), help="segmentor preset (default: the preset's)")
    p.add_argument("--infer-batch", type=cli.positive_int, default=4, help="crops per segmentation forward")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="timed optimizer steps after the warm-up")
    p.add_argument("--warmup", type=cli.non_negative_int, default=10,
                   help="steps not timed (CUDA/cuDNN set-up, allocator)")
    p.add_argument("--repeats", type=cli.positive_int, default=10, help="timed inference calls (median)")
    p.add_argument("--infer-warmup", type=cli.non_negative_int, default=3, help="inference calls not timed")
    p.add_argument("--gradient-checkpointing", action="store_true", help="for both diffusion scripts")
    p.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="scripts to time")
    p.add_argument("--images", type=cli.positive_int, default=8, help="street scenes drawn for the data folder")
    p.add_argument("--workers", type=cli.non_negative_int, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    p.add_argument("--timeout", type=cli.positive, default=600, help="seconds per training script")
    p.add_argument("--workdir", help="build here and keep it (default: a temporary folder, removed)")
    p.add_argument("--write", help="append the table to this markdown file")
    a = p.parse_args(argv)
    a.size = a.size or PRESETS[a.preset]["size"]
    a.seg_model = a.seg_model or PRESETS[a.preset]["seg_model"]
    a.workers = a.workers if a.workers is not None else (4 if a.device.startswith("cuda") else 0)
    cuda = a.device.startswith("cuda")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_training_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    total, log_every = a.warmup + a.steps, math.gcd(a.warmup, a.steps)
    span = f"steps {a.warmup + 1}-{total}" if a.steps > 1 else f"step {total}"
    try:
        base, data = make_workspace(work, a.preset, a.size, a.images)
        for key in a.only:
            out = work / f"run_{key}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: metrics.jsonl must not hold older rows
            metrics, rss = run_script(key, script_args(key, a, base, data, out, total, log_every), out, a.timeout)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # GBs of optimizer state, not needed
            per_step = a.seg_batch if key in SEGMENTATION else a.batch
            r = steady_rate(metrics, a.warmup, per_step, f"train/{SCRIPTS[key]}.py ({out / 'metrics.jsonl'})", cuda)
            rate = f"{r['samples_per_s']:.2f} samples/s ({r['it_per_s']:.2f} it/s)"
            peak = r["peak_gib"] if cuda else rss
            if key == "segmentation":
                rows.append((f"train/{SCRIPTS[key]}.py", f"{a.seg_model} training, {a.size}² crops, batch {per_step}",
                             rate, peak, f"{span}; CE loss, AdamW, poly lr"))
                rows += seg_inference(a)
            elif key == "uda":
                rows.append((f"train/{SCRIPTS[key]}.py", f"{a.seg_model} self-training (MIC), {a.size}² source + "
                             f"target crops, batch {per_step}", rate, peak,
                             f"{span}; EMA teacher, ClassMix, masked consistency: 3 forward-backward passes + "
                             "1 teacher forward per step"))
            else:
                what, note = WHAT[key]
                rows.append((f"train/{SCRIPTS[key]}.py", f"{what}, {a.size}², batch {per_step}", rate, peak,
                             f"{span}; {note}"))
            for row in rows[-3 if key == "segmentation" else -1:]:  # partial results survive a later failure
                print("[bench] " + " | ".join(map(str, row)), file=sys.stderr, flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    dev = (torch.cuda.get_device_name(torch.device(a.device)) if cuda
           else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    cmd = shlex.join(["python", "bench/training.py", *(sys.argv[1:] if argv is None else argv)])
    models = "random SD-1.5-size U-Net / VAE / CLIP" if a.preset == "sd15" else "random tiny U-Net / VAE / CLIP"
    table = (f"### Training throughput and peak memory ({a.preset})\n\n"
             f"{datetime.date.today()}, {dev}, {a.dtype}, torch {torch.__version__}; `{cmd}`\n\n"
             f"{models} and a random {a.seg_model} segmentor, {a.images} procedurally drawn {2 * a.size}×{a.size} "
             f"street scenes; grad-accum 1, {'with' if a.gradient_checkpointing else 'no'} gradient checkpointing. "
             f"Training rates: samples of {span} over the sum of the scripts' logged window times (metrics.jsonl "
             f"`samples_per_s`, logged every {log_every} step(s)), after {a.warmup} warm-up step(s). "
             + ("Peak memory: `max_mem_gb` of the script (torch.cuda.max_memory_allocated, whole run) or of the "
                "timed inference calls.\n\n" if cuda else
                "Peak memory: the peak resident set size of the script's process (ru_maxrss; interpreter, "
                "libraries and data included); n/a for the inference calls, which run in this process.\n\n")
             + "| script | what | samples or iterations per s | peak memory GiB | notes |\n|---|---|---|---|---|\n")
    table += "".join(f"| {s} | {w} | {r} | {'n/a' if m is None else f'{m:.2f}'} | {n} |\n" for s, w, r, m, n in rows)
    return emit(table, a.write)


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: main(argv) and 0))  # a BenchError (a RuntimeError) is one line
