"""Benchmark the Triton kernels against PyTorch's best at SD-1.5's shapes (CUDA only).

    python bench/kernels.py                      # attention sweep, GroupNorm, GEGLU, U-Net and ControlNet steps
    python bench/kernels.py --quick              # fewer shapes (a smoke run)
    python bench/kernels.py --write BENCHMARKS.md

Attention: batch 2 x 8 heads, queries N in {4096, 16384, 1024, 256, 64}, head dims {40, 80, 160},
keys N (self-attention) or 77 (cross-attention), fp16, q/k/v as (B, N, H, D) memory viewed as
(B, H, N, D) the way the projections hand them over. Every SDPA backend is timed separately under
``torch.nn.attention.sdpa_kernel`` (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH),
and SDPA with PyTorch's own choice ("sdpa default"); "n/a" means the backend refused the shape. FLOPs: forward 4*B*H*N*M*D (two matmuls); backward
2.5x that (four matmuls plus the recomputed scores, as in triton's tutorial); % of peak is against
989 TFLOP/s (H100 SXM dense fp16). Times are medians of ``triton.testing.do_bench`` after warm-up
(which includes the autotuning; compile + tuning time is reported separately for the model steps).
Each Triton result is checked against SDPA (relative L2 error) before it is timed.

The model steps run one U-Net forward, and one DGInStyle-style ControlNet + U-Net forward (batch 2
or ``--batch``, 64x64 latents, 77-token context, fp16, random weights) per ``ldm.ops`` setting,
interleaved over several rounds: attention through SDPA, through the Triton kernel, and the Triton
kernel plus the fused GroupNorm(+SiLU) and GEGLU; each also replayed as a CUDA graph (``--no-graphs``
leaves those out), which shows the kernels' speed without the CPU launch cost (a graph's peak memory
is measured over its first call, so its memory pool is counted).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from controlnet.model import ControlNet, ControlNetConfig
from ldm import cli, kernels, ops
from ldm.config import UNetConfig
from ldm.graphs import CUDAGraphed
from ldm.layers import GroupNorm32
from ldm.unet import UNetModel

PEAK_TFLOPS = 989.0  # H100 SXM, dense fp16/bf16
BATCH, HEADS = 2, 8
SEQ = (4096, 16384, 1024, 256, 64)
DIMS = (40, 80, 160)
CONTEXT = 77
MATH_MAX_SCORES = 4096 * 4096  # the MATH backend materialises B*H*N*M scores: skip it above this


def _bench(fn, **kw):
    from triton.testing import do_bench

    return do_bench(fn, warmup=kw.get("warmup", 10), rep=kw.get("rep", 60), return_mode="median",
                    grad_to_none=kw.get("grad_to_none"))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [(n, getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _attention_providers():
    from torch.nn.attention import sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    providers = [("triton", lambda q, k, v: kernels.flash_attention(q, k, v)),
                 ("sdpa default", F.scaled_dot_product_attention)]  # what attention(backend="sdpa") gets
    providers += [(f"sdpa {name.split('_')[0].lower()}", sdpa(b)) for name, b in _sdpa_backends()]
    return providers


def attention_sweep(dtype, seqs, dims, modes=("fwd", "bwd")):
    rows = []
    dev = "cuda"
    for N in seqs:
        for D in dims:
            for M in (N, CONTEXT):
                q = torch.randn(BATCH, N, HEADS, D, device=dev, dtype=dtype).transpose(1, 2)
                k = torch.randn(BATCH, M, HEADS, D, device=dev, dtype=dtype).transpose(1, 2)
                v = torch.randn(BATCH, M, HEADS, D, device=dev, dtype=dtype).transpose(1, 2)
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                do = torch.randn(BATCH, HEADS, N, D, device=dev, dtype=dtype)
                flops = 4.0 * BATCH * HEADS * N * M * D
                ref = F.scaled_dot_product_attention(q, k, v)
                ref_grads = torch.autograd.grad(ref, (q, k, v), do)
                for name, fn in _attention_providers():
                    if name == "sdpa math" and BATCH * HEADS * N * M > BATCH * HEADS * MATH_MAX_SCORES:
                        continue
                    row = dict(N=N, M=M, D=D, provider=name)
                    try:
                        with warnings.catch_warnings():  # a refusing backend explains itself at length
                            warnings.simplefilter("ignore")
                            out = fn(q, k, v)
                            grads = torch.autograd.grad(out, (q, k, v), do)
                    except RuntimeError as e:  # the backend refuses this shape
                        rows.append(dict(row, mode=None, ms=None, note=str(e).split("\n")[0][:60]))
                        continue
                    err = max([_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)])
                    if "fwd" in modes:
                        with torch.no_grad():
                            ms = _bench(lambda: fn(q, k, v))
                        rows.append(dict(row, mode="fwd", ms=ms, tflops=flops / ms * 1e-9, err=err))
                    if "bwd" in modes:
                        out = fn(q, k, v)
                        ms = _bench(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
                        rows.append(dict(row, mode="bwd", ms=ms, tflops=2.5 * flops / ms * 1e-9, err=err))
                    del out, grads
                del q, k, v, do, ref, ref_grads
                torch.cuda.empty_cache()
    return rows


def group_norm_sweep(dtype):
    """SD-1.5's GroupNorm(32)+SiLU inputs at batch 2, 64x64 latents: GroupNorm32 (fp32 upcast, as in
    ldm.layers), native F.group_norm in the input dtype, and the fused kernel."""
    shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 960, 64, 64)]
    rows = []
    for shape in shapes:
        C = shape[1]
        norm = GroupNorm32(32, C).to("cuda", dtype)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        xs = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4)]  # rotate: not all in L2
        nbytes = 2 * xs[0].numel() * xs[0].element_size()  # read x once, write y once
        providers = {
            "GroupNorm32 + SiLU (fp32 upcast)": lambda x: F.silu(norm(x)),
            "F.group_norm + SiLU (native dtype)": lambda x: F.silu(F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)),
            "triton fused": lambda x: kernels.group_norm_module(norm, x, silu=True),
        }
        ref = F.silu(norm(xs[0]).double())
        with torch.no_grad():
            for name, fn in providers.items():
                err = _rel(fn(xs[0]), ref)
                it = iter(range(10**9))
                ms = _bench(lambda: fn(xs[next(it) % 4]))
                rows.append(dict(shape="x".join(map(str, shape)), provider=name, ms=ms,
                                 gbs=nbytes / ms * 1e-6, err=err))
    return rows


def geglu_sweep(dtype):
    """SD-1.5's feed-forward at batch 2: x (2, N, C) -> Linear(C, 8C) -> GEGLU -> (2, N, 4C)."""
    rows = []
    for N, C in ((4096, 320), (1024, 640), (256, 1280), (64, 1280)):
        x = torch.randn(2, N, C, device="cuda", dtype=dtype)
        lin = torch.nn.Linear(C, 8 * C).to("cuda", dtype)

        def torch_path():
            a, g = lin(x).chunk(2, dim=-1)
            return a * F.gelu(g)

        providers = {
            "Linear + chunk/gelu/mul (PyTorch)": torch_path,
            "matmul + fused bias/GEGLU (triton)": lambda: kernels.geglu_linear(x, lin.weight, lin.bias),
        }
        with torch.no_grad():
            ref = torch_path().float()
            for name, fn in providers.items():
                err = _rel(fn(), ref)
                rows.append(dict(shape=f"2x{N}x{C}", provider=name, ms=_bench(fn), err=err))
    return rows


# ---------------------------------------------------------------------------------------------- model steps
STEP_CONFIGS = [  # name, ldm.ops setting
    ("sdpa", dict(attention="sdpa", fused="none")),
    ("triton attention", dict(attention="triton", fused="none")),
    ("triton attention + GN", dict(attention="triton", fused="groupnorm")),
    ("triton attention + GN + GEGLU", dict(attention="triton", fused="groupnorm+geglu")),
]
GFLOP_PER_SAMPLE = {"U-Net": 803, "ControlNet + U-Net": 803 + 283}  # at 64x64 latents (design/performance.md)


def step_inputs(device, dtype, batch=2, latent=64):
    """Latents, timesteps and a 77-token context for one denoising step."""
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, CONTEXT, 768, device=device, dtype=dtype)
    return x, t, ctx


def _flops(step, batch, latent):
    return GFLOP_PER_SAMPLE[step] * 1e9 * batch * (latent / 64) ** 2


def unet_step(device, dtype, batch=2, latent=64):
    """One U-Net forward at SD-1.5 size; returns (step function, FLOPs per step)."""
    unet = UNetModel(UNetConfig()).to(device, dtype).eval()
    x, t, ctx = step_inputs(device, dtype, batch, latent)
    return (lambda: unet(x, t, ctx)), _flops("U-Net", batch, latent)


def controlnet_unet_step(device, dtype, batch=2, latent=64):
    """One DGInStyle-style controlled step: ControlNet (20-channel one-hot hint at 8x the latent size), then the U-Net."""
    unet = UNetModel(UNetConfig()).to(device, dtype).eval()
    cn = ControlNet(ControlNetConfig()).to(device, dtype).eval()
    x, t, ctx = step_inputs(device, dtype, batch, latent)
    f = cn.control_cfg.hint_downsample_factor
    hint = torch.randn(batch, 20, latent * f, latent * f, device=device, dtype=dtype)

    def step():
        return unet(x, t, ctx, control=cn(x, hint, t, ctx))

    return step, _flops("ControlNet + U-Net", batch, latent)


STEPS = [("U-Net", unet_step), ("ControlNet + U-Net", controlnet_unet_step)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, repeats):
    """Per-call wall times in ms (CUDA events on the GPU: they include any CPU launch stalls)."""
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def model_steps(steps, dtype, batch=2, device="cuda", rounds=5, repeats=8, graphs=True):
    """Time every STEP_CONFIGS entry on each step, interleaved: ``rounds`` passes over the configs,
    ``repeats`` calls each, so clock ramps and machine noise hit every configuration alike.
    The first call of each configuration (compilation, autotuning, graph capture) is reported on its own.
    graphs: also time each configuration replayed as a CUDA graph (``ldm.graphs``), which removes the
    CPU launch cost that otherwise hides the kernels' own speed at these sizes."""
    variants = [(name, cfg, False) for name, cfg in STEP_CONFIGS]
    if graphs:
        variants += [(name + ", CUDA graph", cfg, True) for name, cfg in STEP_CONFIGS]
    rows = []
    for step_name, build in steps:
        fn, flops = build(device, dtype, batch)
        anchor = torch.empty(0, device=device)  # a CUDA argument: tells CUDAGraphed where the call runs
        calls = {name: (lambda g=CUDAGraphed(lambda _: fn()): g(anchor)) if graphed else fn
                 for name, _, graphed in variants}
        first, outs, peak, times = {}, {}, {}, {v[0]: [] for v in variants}
        with torch.inference_mode():
            for name, cfg, graphed in variants:
                with ops.use(**cfg):
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    out = calls[name]()
                    _sync(device)
                    first[name] = time.perf_counter() - t0
                    if graphed:  # the capture allocates the graph's memory pool: count it here
                        peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    outs[name] = (out[0] if isinstance(out, (list, tuple)) else out).float()
                    if not graphed:  # eager: a second call, after autotuning's own allocations
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        calls[name]()
                        _sync(device)
                        peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            for _ in range(rounds):
                for name, cfg, _ in variants:
                    with ops.use(**cfg):
                        calls[name]()  # one untimed call after switching
                        times[name] += _time_ms(calls[name], device, repeats)
        ref = outs[STEP_CONFIGS[0][0]]
        for name, *_ in variants:
            ms = statistics.median(times[name])
            rows.append(dict(step=step_name, batch=batch, config=name, ms=ms, first_s=first[name], peak_mb=peak.get(name, 0.0),
                             tflops=flops / ms * 1e-9, err=_rel(outs[name], ref)))
        del fn, outs, calls
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report
def environment(dtype) -> str:
    import triton

    p = torch.cuda.get_device_properties(0)
    return (f"{datetime.date.today().isoformat()}, {p.name} ({p.multi_processor_count} SMs), "
            f"{str(dtype).replace('torch.', '')}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton.__version__}, Python {platform.python_version()}")


def _attention_table(attn):
    out = ["Attention (batch 2 x 8 heads; ms = median; TFLOP/s from 4·B·H·N·M·D forward, 2.5x that "
           f"backward; % of {PEAK_TFLOPS:.0f} TFLOP/s; err = max relative L2 error of out/dq/dk/dv vs SDPA):", ""]
    providers = list(dict.fromkeys(r["provider"] for r in attn))
    out.append("| N | keys | d | mode | " + " | ".join(providers) + " | best SDPA | triton / best SDPA |")
    out.append("|---|---|---|---|" + "---|" * len(providers) + "---|---|")
    keys = list(dict.fromkeys((r["N"], r["M"], r["D"], r["mode"]) for r in attn if r.get("ms") is not None))
    for N, M, D, mode in keys:
        cells, best = [], None
        by = {r["provider"]: r for r in attn if (r["N"], r["M"], r["D"]) == (N, M, D) and r["mode"] in (mode, None)}
        for p in providers:
            r = by.get(p)
            if r is None or r.get("ms") is None:
                cells.append("n/a" if r is not None else "—")
                continue
            cells.append(f"{r['ms']:.3f} ms, {r['tflops']:.0f} TF ({100 * r['tflops'] / PEAK_TFLOPS:.0f}%)")
            if p != "triton" and (best is None or r["ms"] < best[1]):
                best = (p, r["ms"])
        tri = by.get("triton")
        ratio = f"{tri['ms'] / best[1]:.2f}" if tri and tri.get("ms") and best else "n/a"
        err = f" (err {tri['err']:.1e})" if tri and tri.get("err") is not None else ""
        out.append(f"| {N} | {M} | {D} | {mode} | " + " | ".join(cells)
                   + f" | {best[0] if best else 'n/a'} | {ratio}{err} |")
    return "\n".join(out + [""])


def _group_norm_table(gn):
    out = ["GroupNorm(32) + SiLU (GB/s counts one read and one write of x):", "",
           "| shape | provider | ms | GB/s | err |", "|---|---|---|---|---|"]
    out += [f"| {r['shape']} | {r['provider']} | {r['ms']:.4f} | {r['gbs']:.0f} | {r['err']:.1e} |" for r in gn]
    return "\n".join(out + [""])


def _geglu_table(gg):
    out = ["Feed-forward projection + GEGLU:", "", "| shape | provider | ms | err |", "|---|---|---|---|"]
    out += [f"| {r['shape']} | {r['provider']} | {r['ms']:.4f} | {r['err']:.1e} |" for r in gg]
    return "\n".join(out + [""])


def _steps_table(steps):
    out = ["Model steps (64x64 latents, random weights; ms = median of 5 interleaved rounds x 8 calls; "
           "first call = compile + autotune (+ graph capture); err vs the sdpa row):", "",
           "| step | batch | configuration | ms | vs sdpa | TFLOP/s | first call s | peak MB | err |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in steps:
        base.setdefault(r["step"], r["ms"])
        out.append(f"| {r['step']} | {r['batch']} | {r['config']} | {r['ms']:.2f} | {r['ms'] / base[r['step']]:.3f} | "
                   f"{r['tflops']:.0f} | {r['first_s']:.1f} | {r['peak_mb']:.0f} | {r['err']:.1e} |")
    return "\n".join(out + [""])


def report(env, command, attn, gn, gg, steps) -> str:
    out = ["### Triton kernels vs PyTorch SDPA at SD-1.5 shapes", "", f"{env}; `{command}`", ""]
    for rows, table in ((attn, _attention_table), (gn, _group_norm_table), (gg, _geglu_table),
                        (steps, _steps_table)):
        if rows:
            out.append(table(rows))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = cli.parser("python bench/kernels.py", __doc__)
    ap.add_argument("--write", metavar="FILE", help="append the tables to this Markdown file")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="dtype of every benchmark")
    ap.add_argument("--batch", type=cli.positive_int, default=2, help="batch of the model steps (2 = one guided image; "
                    "MRLF batches views: try 32)")
    ap.add_argument("--no-graphs", action="store_true", help="model steps: leave out the CUDA-graph variants")
    ap.add_argument("--skip", nargs="*", default=[], choices=["attention", "groupnorm", "geglu", "steps"],
                    help="benchmarks to leave out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the kernels are benchmarked on a GPU only. "
              "Nothing measured.")
        return 0
    if not kernels.triton_available():
        print("bench/kernels.py: triton does not import; nothing measured.")
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    command = " ".join(["python bench/kernels.py"] + (argv if argv is not None else sys.argv[1:]))
    seqs, dims = ((4096, 64), (40, 160)) if args.quick else (SEQ, DIMS)
    env = environment(dtype)
    print(env, flush=True)
    # Each table is printed as soon as it is measured, so a run cut short still reports something.
    attn = gn = gg = st = []
    if "attention" not in args.skip:
        attn = attention_sweep(dtype, seqs, dims)
        print(_attention_table(attn), flush=True)
    if "groupnorm" not in args.skip:
        gn = group_norm_sweep(dtype)
        print(_group_norm_table(gn), flush=True)
    if "geglu" not in args.skip:
        gg = geglu_sweep(dtype)
        print(_geglu_table(gg), flush=True)
    if "steps" not in args.skip:
        st = model_steps(STEPS, dtype, args.batch, graphs=not args.no_graphs)
        print(_steps_table(st), flush=True)
    text = report(env, command, attn, gn, gg, st)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)
        print(f"appended to {Path(args.write).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
