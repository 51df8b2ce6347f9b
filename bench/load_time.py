"""Time loading a full SD-1.5-size CompVis single file with ldm.checkpoint.

Builds random full-size U-Net + VAE + CLIP text encoder, saves them as one CompVis file in a
temporary folder, then times ``load_components(path, dtype=...)`` in fresh child processes
(so each run starts from an empty Python heap) and reports seconds and the child's peak RSS.
The file was just written (and fsync'ed), so it sits in the page cache: these are warm-cache
numbers, i.e. the cost of our code, page faults and the dtype cast, not of the disk.

    python bench/load_time.py                      # fp32 .safetensors file -> fp16 models
    python bench/load_time.py --file-dtype fp16 --format ckpt --load-dtype fp32 --runs 3
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm import checkpoint, cli
from ldm.config import UNetConfig
from ldm.unet import UNetModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_random(dtype: torch.dtype) -> dict:
    models = {}
    g = torch.Generator().manual_seed(0)
    for name in checkpoint.COMPONENTS:
        m = checkpoint.build_model(name).to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.02, generator=g)
        models[name] = m
    return models


def _load(path: str, dtype: str, device: str, queue) -> None:
    # Warm-up: the first load_state_dict in a process lazily imports parts of torch
    # (seconds on a machine without a bytecode cache); keep that out of the measurement.
    t0 = time.perf_counter()
    tiny = {"unet": UNetModel(UNetConfig.tiny())}
    checkpoint.load_into(checkpoint.build_model("unet", UNetConfig.tiny()), tiny["unet"].state_dict(),
                         dtype=DTYPES[dtype], device=device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    models = checkpoint.load_components(path, dtype=DTYPES[dtype], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for m in models.values() for p in m.parameters())
    # Peak RSS counts the mmap'd file pages read (page cache, reclaimable); RssAnon is the
    # process's own memory after loading: about the loaded models, i.e. nothing doubled.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    anon = int(status.get("RssAnon", "0 kB").split()[0]) / 2**20
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, anon, n, warmup))


def time_load(path: Path, dtype: str, device: str) -> tuple[float, float, float, int, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_load, args=(str(path), dtype, device, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main(argv=None) -> None:
    ap = cli.parser("python bench/load_time.py", __doc__)
    ap.add_argument("--file-dtype", choices=tuple(DTYPES), default="fp32", help="dtype stored in the file")
    ap.add_argument("--load-dtype", choices=tuple(DTYPES), default="fp16", help="dtype to load into")
    ap.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors", help="file format")
    ap.add_argument("--device", default="cpu", help="device to load onto")
    ap.add_argument("--runs", type=cli.positive_int, default=3, help="timed loads, each in a fresh process")
    ap.add_argument("--dir", default=None, help="where to write the temporary file (default: system tmp)")
    args = ap.parse_args(argv)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        models = build_random(DTYPES[args.file_dtype])
        path = checkpoint.save_compvis(Path(tmp) / f"sd15.{args.format}", models)
        del models
        with open(path, "rb") as f:  # finish the write-back first, or the loads below compete with it
            os.fsync(f.fileno())
        size = path.stat().st_size / 2**30
        print(f"wrote {args.file_dtype} CompVis file {path.name}: {size:.2f} GiB in {time.perf_counter() - t0:.1f} s")
        times = []
        for i in range(args.runs):
            seconds, rss, anon, n, warmup = time_load(path, args.load_dtype, args.device)
            times.append(seconds)
            print(f"run {i}: load_components(dtype={args.load_dtype}) {seconds:.2f} s, {n / 1e9:.3f} B parameters, "
                  f"child peak RSS {rss:.2f} GiB (incl. file pages), RssAnon after load {anon:.2f} GiB "
                  f"(process warm-up, not counted: {warmup:.2f} s)")
        print(f"median {statistics.median(times):.2f} s, best {min(times):.2f} s "
              f"(warm page cache; {args.file_dtype} {args.format} -> {args.load_dtype})")


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
