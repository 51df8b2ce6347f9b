"""MRLF two-pass generation: views batched through ControlNet + U-Net vs the one-view-at-a-time loop.

    python bench/mrlf_views.py                                   # tiny random model, CPU
    python bench/mrlf_views.py --preset sd15 --device cuda --dtype fp16 --size 512 --stride 8 --steps 20

All variants run in the same process on the same weights and seeds (on CUDA also with the network
call replayed as CUDA graphs); the table gives seconds per image, images per hour and the peak memory
(CUDA allocator, or peak RSS over the start on CPU). Speed-ups are against the eager one-view loop.
"""
from __future__ import annotations

import datetime
import sys
import time

import torch

from controlnet import ControlNet
from ldm import cli
from ldm.sd import StableDiffusion
from mrlf.pipeline import MRLFSettings, Pipeline, SamplingSettings
from segmentation.synthetic import street_scene


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run(pipe, label, settings, fusion, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    pipe.mrlf(label, "road sidewalk building sky car", torch.Generator().manual_seed(0), settings=settings, fusion=fusion)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (_rss_kb("VmHWM") - base) / 1024
    return time.perf_counter() - t0, peak


def main(argv=None):
    p = cli.parser("python bench/mrlf_views.py", __doc__)
    p.add_argument("--preset", choices=["tiny", "sd15"], default="tiny", help="random model sizes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights and inputs")
    p.add_argument("--size", type=cli.positive_int, default=256, help="base image side in pixels")
    p.add_argument("--window", type=cli.positive_int, default=None, help="latent window (default size/8)")
    p.add_argument("--stride", type=cli.positive_int, default=8, help="latent view stride")
    p.add_argument("--steps", type=cli.positive_int, default=4, help="DDIM steps per pass")
    p.add_argument("--view-batch", type=cli.positive_int, default=16, help="views per network call (batched variant)")
    p.add_argument("--write", help="append the table to this markdown file")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    sd = StableDiffusion.random(a.preset, seed=0, dtype=dtype, device=device)
    hint_blocks = (8, 8, 16, 16) if a.preset == "tiny" else (16, 32, 96, 256)
    cn = ControlNet.from_unet(sd.unet, 20, hint_blocks).to(device, dtype).eval()
    pipes = {False: Pipeline(sd, cn)}
    if device.type == "cuda":
        pipes[True] = Pipeline(sd, cn, cuda_graphs=True)
    label = street_scene(a.size, a.size, 0)
    window = a.window or a.size // 8
    settings = SamplingSettings(steps=a.steps)
    base = MRLFSettings(window=window, stride=a.stride, component_threshold=a.size ** 2 // 13)
    n_views = ((2 * a.size // 8 - window) // a.stride + 1) ** 2
    rows = []
    for graphs, pipe in pipes.items():
        # Warm-up: the batched run meets every shape the one-view loop uses (pass 1 = one view), so it
        # also captures the graphs both measured runs replay.
        run(pipe, label, settings, base.__class__(**{**base.__dict__, "view_batch": a.view_batch}), device)
        for vb in (1, a.view_batch):
            s, mb = run(pipe, label, settings, base.__class__(**{**base.__dict__, "view_batch": vb}), device)
            rows.append((vb, graphs, s, mb))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = (f"### MRLF: batched views vs one-view loop\n\n{datetime.date.today()}, {dev}, {a.preset} model, {a.dtype}, "
             f"torch {torch.__version__}; base {a.size}², x2 tiled pass with {n_views} views, {a.steps} steps; "
             f"`python bench/mrlf_views.py --preset {a.preset} --device {a.device} --dtype {a.dtype} --size {a.size} "
             f"--stride {a.stride} --steps {a.steps} --view-batch {a.view_batch}`\n\n"
             "| views per call | CUDA graphs | s / image | images / hour | peak MB | speed-up |\n|---|---|---|---|---|---|\n")
    table += "".join(f"| {vb} | {'yes' if g else 'no'} | {s:.2f} | {3600 / s:.0f} | {mb:.0f} | {rows[0][2] / s:.2f}x |\n"
                     for vb, g, s, mb in rows)
    print(table)
    if a.write:
        with open(a.write, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
