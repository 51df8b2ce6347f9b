"""Our SD-1.5 networks vs diffusers / transformers, identical weights, in the same run.

    python bench/models.py                      # CPU, fp32, small latents (default)
    python bench/models.py --device cuda --dtype fp16 --latent 64 --batch 2
    python bench/models.py --write BENCHMARKS.md

Times are medians over --repeats forwards after a warm-up, interleaved (ours, ref, ours, ...)
so machine noise hits both; memory is the peak allocated on CUDA, or on CPU the peak of the
live tensor storages created by the forward (tracked by a dispatch mode; weights excluded). The ratio column is ours / reference (< 1 is faster / smaller).
On CUDA two more rows time our calls replayed as CUDA graphs (`ldm.graphs`, as `mrlf.generate --cuda-graphs`
runs them) against the same eager reference; their memory is the peak of a fresh capture (warm-up included).
"""
from __future__ import annotations

import datetime
import gc
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import randomize_  # noqa: E402

from ldm import checkpoint, cli  # noqa: E402
from ldm import diffusers_keys as dk  # noqa: E402
from controlnet import ControlNet, ControlNetConfig  # noqa: E402
from controlnet.checkpoint import controlnet_config_to_diffusers, controlnet_to_diffusers  # noqa: E402
from ldm import AutoencoderKL, CLIPTextModel, UNetModel  # noqa: E402
from mrlf.fusion import controlled_model  # noqa: E402
from samplers import cfg  # noqa: E402
from samplers.guidance import Split  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device, fn):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as mem:
        fn()
    return mem.peak / 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive (CPU analogue of
    torch.cuda.max_memory_allocated; weights that existed before are not counted)."""

    def __enter__(self):
        self.live, self.peak, self.seen = 0, 0, set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


def compare(name, ours, ref, device, repeats, ours_mem=None):
    """ours_mem: what to run for our peak memory, if not `ours` (a graphed call: capture included)."""
    with torch.inference_mode():
        ours(), ref()  # warm-up
        _sync(device)
        t_ours, t_ref = [], []
        for _ in range(repeats):
            for fn, acc in ((ours, t_ours), (ref, t_ref)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                acc.append(time.perf_counter() - t0)
        m_ref, m_ours = _peak(device, ref), _peak(device, ours_mem or ours)
    a, b = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
    return dict(name=name, ours_ms=a, ref_ms=b, ratio=a / b, ours_mb=m_ours, ref_mb=m_ref)


CONFIG_TO_REF = {"unet": dk.unet_config_to_diffusers, "vae": dk.vae_config_to_diffusers,
                 "text_encoder": dk.clip_config_to_transformers}


def build(device, dtype):
    from diffusers import AutoencoderKL as DVAE, UNet2DConditionModel
    from transformers import CLIPTextModel as HFCLIP

    out = {}
    for name, cls in (("unet", UNetModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        ours = randomize_(cls(), seed=0).eval()
        sd = checkpoint.native_to_diffusers(name, ours.cfg, ours.state_dict())
        cfg = CONFIG_TO_REF[name](ours.cfg)
        if name == "unet":
            ref = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        elif name == "vae":
            ref = DVAE(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        else:
            from transformers import CLIPTextConfig as HFC
            ref = HFCLIP(HFC(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()} if not hasattr(ref, "text_model") else sd
        ref.load_state_dict(sd, strict=True)
        out[name] = (ours.to(device, dtype), ref.to(device, dtype).eval())
    return out


def build_controlnet(unet, device, dtype):
    from diffusers import ControlNetModel

    ours = randomize_(ControlNet(ControlNetConfig(unet=unet.cfg)), seed=1).eval()
    ref = ControlNetModel(**{k: v for k, v in controlnet_config_to_diffusers(ours.control_cfg).items()
                             if not k.startswith("_")})
    ref.load_state_dict(controlnet_to_diffusers(ours.state_dict(), ours.control_cfg), strict=True)
    return ours.to(device, dtype), ref.to(device, dtype).eval()


def main(argv=None):
    p = cli.parser("python bench/models.py", __doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and inputs")
    p.add_argument("--latent", type=cli.positive_int, default=32, help="latent side (pixels / 8)")
    p.add_argument("--batch", type=cli.positive_int, default=2, help="batch of every forward")
    p.add_argument("--repeats", type=cli.positive_int, default=5, help="timed forwards (median)")
    p.add_argument("--write", help="append the table to this markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    models = build(device, dtype)
    B, L = args.batch, args.latent
    x = torch.randn(B, 4, L, L, device=device, dtype=dtype)
    t = torch.tensor([999, 500][:B] * (B // 2 or 1), device=device)[:B]
    ctx = torch.randn(B, 77, 768, device=device, dtype=dtype)
    ids = torch.randint(0, 49408, (B, 77), device=device)
    z = torch.randn(1, 4, L, L, device=device, dtype=dtype)
    (u, du), (v, dv), (c, dc) = models["unet"], models["vae"], models["text_encoder"]
    (cn, dcn) = build_controlnet(u, device, dtype)
    hint = torch.rand(1, 20, 8 * L, 8 * L, device=device, dtype=dtype)
    ctx_uc = ctx[:1].repeat(2, 1, 1)
    ours_step = cfg(controlled_model(u, cn), 7.5, context=Split(ctx_uc[:1], ctx_uc[1:]), hint=hint)

    def ref_step():  # diffusers' pipeline body for one guided step: [uncond; cond] through ControlNet + U-Net
        xx, hh = torch.cat([x[:1]] * 2), torch.cat([hint] * 2)
        down, mid = dcn(xx, 500, ctx_uc, controlnet_cond=hh, conditioning_scale=1.0, return_dict=False)
        e = du(xx, 500, ctx_uc, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        eu, ec = e.chunk(2)
        return eu + 7.5 * (ec - eu)

    rows = [compare(f"U-Net {B}x4x{L}x{L}", lambda: u(x, t, ctx), lambda: du(x, t, ctx).sample, device, args.repeats),
            compare(f"guided ControlNet+U-Net step 1x4x{L}x{L}", lambda: ours_step(x[:1], 500), ref_step, device,
                    args.repeats),
            compare(f"VAE decode 1x4x{L}x{L}", lambda: v.decode(z), lambda: dv.decode(z).sample, device, args.repeats),
            compare(f"CLIP text {B}x77", lambda: c(ids), lambda: dc(ids).last_hidden_state, device, args.repeats)]
    if device.type == "cuda":  # our product path on CUDA can replay the call as a CUDA graph (ldm.graphs)
        from ldm.graphs import CUDAGraphed

        t500 = torch.tensor(500, device=device)
        g_unet = CUDAGraphed(u)
        g_step = cfg(CUDAGraphed(controlled_model(u, cn)), 7.5, context=Split(ctx_uc[:1], ctx_uc[1:]), hint=hint)
        rows += [compare(f"U-Net {B}x4x{L}x{L}, ours as CUDA graph", lambda: g_unet(x, t, ctx),
                         lambda: du(x, t, ctx).sample, device, args.repeats,
                         ours_mem=lambda: CUDAGraphed(u)(x, t, ctx)),
                 compare(f"guided ControlNet+U-Net step 1x4x{L}x{L}, ours as CUDA graph", lambda: g_step(x[:1], t500),
                         ref_step, device, args.repeats,
                         ours_mem=lambda: cfg(CUDAGraphed(controlled_model(u, cn)), 7.5,
                                              context=Split(ctx_uc[:1], ctx_uc[1:]), hint=hint)(x[:1], t500))]
    import diffusers
    import transformers
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    head = (f"### SD-1.5 networks vs diffusers {diffusers.__version__} / transformers {transformers.__version__}\n\n"
            f"{datetime.date.today()}, {dev}, {args.dtype}, torch {torch.__version__}; "
            f"`python bench/models.py --device {args.device} --dtype {args.dtype} --latent {L} --batch {B}`\n\n"
            "| module | ours ms | reference ms | time ratio | ours peak MB | reference peak MB |\n|---|---|---|---|---|---|\n")
    table = head + "".join(f"| {r['name']} | {r['ours_ms']:.1f} | {r['ref_ms']:.1f} | {r['ratio']:.2f} | "
                           f"{r['ours_mb']:.0f} | {r['ref_mb']:.0f} |\n" for r in rows)
    print(table)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
