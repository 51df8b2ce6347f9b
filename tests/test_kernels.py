"""Triton kernels (ldm.kernels) against the PyTorch specifications, at small shapes.

Without CUDA the kernels run on the Triton CPU interpreter (TRITON_INTERPRET=1, set by conftest.py
and again below, before triton is imported) on CPU tensors; with CUDA they are compiled and run on the GPU, with one
config per head dim (LDM_TRITON_AUTOTUNE=0) so the file stays quick; ``python bench/kernels.py``
checks the autotuned configs at the real shapes. bf16 runs only on CUDA (the interpreter's bf16 is
not trustworthy with triton 3.8), in ``TestCUDA``.
Every kernel output starts as NaN (``ldm.kernels.common.poison_outputs``), and ``_close`` fails on any NaN,
so a tile the kernel never wrote fails the test.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
os.environ.setdefault("LDM_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to test")
if os.environ.get("TRITON_INTERPRET") == "1" and type(triton.language.sum).__name__ != "InterpretedFunction":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it "
                       "first): the interpreter cannot run these kernels in this process")

from ldm import kernels, ops  # noqa: E402
from ldm.attention import attention, math_attention  # noqa: E402
from ldm.kernels import common  # noqa: E402
from ldm.layers import GroupNorm32  # noqa: E402
from ldm.unet import GEGLU  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative L2 error


@pytest.fixture(autouse=True)
def _poison():
    with common.poison_outputs():
        yield


def _close(out, ref, tol, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def test_close_rejects_nan_and_error():
    ref = torch.randn(4, 5)
    with pytest.raises(AssertionError, match="non-finite"):
        _close(torch.full_like(ref, float("nan")), ref, 1.0)
    with pytest.raises(AssertionError, match="relative error"):
        _close(ref * 1.01, ref, 1e-3)


def test_poison_fills_nan():
    assert torch.isnan(common.empty((3,), torch.float16, "cpu")).all()
    assert torch.isnan(common.empty_like(torch.zeros(2, 3).t())).all()


def _qkv(B, H, N, M, D, dtype, layout="bnhd"):
    """q, k, v as the projections hand them over: (B, N, H, D) memory viewed as (B, H, N, D)."""
    if layout == "bnhd":
        q = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        kv = torch.randn(B, M, 2, H, D, device=DEVICE, dtype=dtype)  # a fused k/v projection
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return tuple(torch.randn(B, H, L, D, device=DEVICE, dtype=dtype) for L in (N, M, M))


def _run(q, k, v, causal):
    """Kernel and reference outputs and gradients (reference: math path in fp32, autograd)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = kernels.flash_attention(q, k, v, causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = math_attention(qr, kr, vr, causal)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    return out, grads, ref, ref_grads


HEAD_DIMS = (40, 64, 80, 128, 160)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_flash_attention_cross(D, dtype):
    """77 keys (a masked key tail) and 33 queries (a masked query tail), strided views, fwd + bwd."""
    q, k, v = _qkv(2, 2, 33, 77, D, dtype)
    out, grads, ref, ref_grads = _run(q, k, v, causal=False)
    assert out.dtype == dtype
    _close(out, ref, TOL[dtype], "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        _close(g, r, TOL[dtype], f"d{name}")


@pytest.mark.parametrize("N,M,causal", [(64, 64, False), (77, 77, True), (20, 77, True), (100, 33, False),
                                        (1, 77, False), (130, 130, True)])
@pytest.mark.parametrize("D", [40, 160])
def test_flash_attention_lengths(N, M, causal, D):
    """Exact tile multiples, causal (CLIP) with and without a tail, more queries than keys, one query."""
    q, k, v = _qkv(1, 2, N, M, D, torch.float32, layout="bhnd")
    out, grads, ref, ref_grads = _run(q, k, v, causal)
    _close(out, ref, TOL[torch.float32], "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        _close(g, r, TOL[torch.float32], f"d{name}")


def test_flash_attention_strides():
    """Odd strides everywhere (a strided head dim included); output and gradient layouts."""
    B, H, N, M, D = 2, 3, 40, 50, 80
    q, k, v = _qkv(B, H, N, M, D, torch.float32)
    v = torch.randn(B, H, M, 2 * D, device=DEVICE)[..., ::2]  # stride 2 along the head dim
    out, grads, ref, ref_grads = _run(q, k, v, causal=False)
    _close(out, ref, 1e-4, "out")
    order = lambda t: sorted(range(4), key=lambda i: -t.stride(i))  # noqa: E731
    for name, g, r, t in zip("qkv", grads, ref_grads, (q, k, v)):
        _close(g, r, 1e-4, f"d{name}")
        assert order(g) == order(t), f"d{name} strides {g.stride()} are not in the order of {t.stride()}"
    assert grads[0].stride() == q.stride()  # a dense view: the very same layout
    # (B, N, H, D) memory underneath: the caller's "b h n d -> b n (h d)" needs no copy.
    assert out.transpose(1, 2).is_contiguous()


def test_flash_attention_through_dispatch():
    q, k, v = _qkv(2, 2, 33, 77, 40, torch.float32)
    with ops.use(attention="triton"):
        _close(attention(q, k, v), math_attention(q.double(), k.double(), v.double()), 1e-4)


def test_flash_attention_rejects_bad_inputs():
    q, k, v = _qkv(1, 2, 8, 8, 48, torch.float32, layout="bhnd")
    with pytest.raises(ValueError, match="head dim 48"):
        kernels.flash_attention(q, k, v)
    q, k, v = _qkv(1, 2, 9, 8, 40, torch.float32, layout="bhnd")
    with pytest.raises(ValueError, match="causal"):
        kernels.flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="k and v"):
        kernels.flash_attention(q, k[:, :1], v)


def test_supported_is_false_on_cpu(monkeypatch):
    """The model never picks a kernel for CPU tensors, interpreter or not (attention: only when named)."""
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: pytest.fail("the Triton kernel ran"))
    x = torch.randn(1, 8, 16, 40)
    for backend in ("auto", "sdpa", "math"):
        with ops.use(attention=backend):
            attention(x, x, x)
    assert not kernels.group_norm_supported(torch.randn(1, 32, 4, 4))
    assert not kernels.geglu_supported(torch.randn(1, 4, 16))


def test_ldm_imports_without_triton():
    """A CPU-only install (no triton) imports ldm and ldm.kernels, every predicate says False, and
    asking for the Triton attention says why it cannot run."""
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch, ldm, ldm.attention, ldm.layers, ldm.ops, ldm.kernels as K\n"
            "assert not K.triton_available()\n"
            "assert not K.group_norm_supported(torch.randn(1, 32, 4, 4))\n"
            "x = torch.randn(1, 8, 16, 40)\n"
            "assert torch.allclose(ldm.attention.attention(x, x, x), ldm.attention.math_attention(x, x, x), atol=1e-5)\n"
            "with ldm.ops.use(attention='triton'):\n"
            "    try:\n"
            "        ldm.attention.attention(x, x, x)\n"
            "    except RuntimeError as e:\n"
            "        assert 'triton does not import' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('the Triton attention ran without triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------- GroupNorm
def _gn_ref(x, G, w, b, eps, silu):
    y = F.group_norm(x.double(), G, None if w is None else w.double(), None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


def _gn_check(shape, G, dtype, silu, block=None, offset=0.0, eps=1e-5, affine=True):
    x = (torch.randn(shape, device=DEVICE) * 2 + offset).to(dtype).requires_grad_()
    C = shape[1]
    w = torch.randn(C, device=DEVICE).requires_grad_() if affine else None
    b = torch.randn(C, device=DEVICE).requires_grad_() if affine else None
    y = kernels.group_norm(x, G, w, b, eps, silu=silu, block=block)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    refs = [t.detach().double().requires_grad_() for t in inputs]
    xr, wr, br = (refs + [None, None])[:3]
    yr = _gn_ref(xr, G, wr, br, eps, silu)
    ref_grads = torch.autograd.grad(yr, refs, dy.double())
    _close(y, yr, TOL[dtype], "y")
    for name, g, r in zip(("dx", "dw", "db"), grads, ref_grads):
        _close(g, r, TOL[dtype], name)


@pytest.mark.parametrize("silu", [False, True], ids=["gn", "gn_silu"])
def test_group_norm_split_reduction(silu):
    """Groups of 4 x 35 = 140 elements in chunks of 16: 9 partial statistics per group, ragged last chunk;
    the backward splits H*W = 35 into 3 chunks."""
    assert triton.cdiv(4 * 35, 16) == 9
    _gn_check((2, 8, 5, 7), 2, torch.float32, silu, block=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_group_norm_one_pass(dtype):
    """32 groups (SD), each group within one chunk: the single-kernel path."""
    _gn_check((2, 64, 4, 4), 32, dtype, silu=True, eps=1e-6)


def test_group_norm_large_mean():
    """mean 1000, std 2 in fp32: sum / sum-of-squares statistics would lose the variance."""
    _gn_check((2, 8, 16, 16), 4, torch.float32, silu=False, block=64, offset=1000.0)


def test_group_norm_no_affine_and_1d():
    _gn_check((3, 6, 10), 3, torch.float32, silu=True, block=16, affine=False)


def test_group_norm_module_matches_groupnorm32():
    norm = GroupNorm32(4, 16).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    _close(kernels.group_norm_module(norm, x, silu=True), F.silu(norm(x)), 1e-4)


# ----------------------------------------------------------------------------------------------- GEGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("F_,with_bias", [(48, True), (1100, False)])
def test_geglu(F_, with_bias, dtype):
    """F = 48: a masked column tail; F = 1100: two column blocks of 1024."""
    h = (torch.randn(2, 3, 2 * F_, device=DEVICE) * 2).to(dtype).requires_grad_()
    bias = torch.randn(2 * F_, device=DEVICE, dtype=dtype).requires_grad_() if with_bias else None
    out = kernels.geglu(h, bias)
    dout = torch.randn_like(out)
    inputs = [t for t in (h, bias) if t is not None]
    grads = torch.autograd.grad(out, inputs, dout)
    refs = [t.detach().double().requires_grad_() for t in inputs]
    hb = refs[0] + refs[1] if with_bias else refs[0]
    a, g = hb.chunk(2, -1)
    ref = a * F.gelu(g)
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    _close(out, ref, TOL[dtype], "out")
    for name, gk, r in zip(("dh", "dbias"), grads, ref_grads):
        _close(gk, r, TOL[dtype], name)


def test_geglu_linear_matches_module():
    m = GEGLU(16, 40).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    _close(kernels.geglu_linear(x, m.proj.weight, m.proj.bias), m(x), 1e-4)


def test_bench_without_cuda_exits_cleanly(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "no CUDA" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET, reason="needs CUDA and compiled kernels (TRITON_INTERPRET=1 is set)")
class TestCUDA:
    @pytest.mark.parametrize("D", [40, 80, 160])
    def test_flash_attention_bf16(self, D):
        q, k, v = _qkv(2, 2, 33, 77, D, torch.bfloat16)
        out, grads, ref, ref_grads = _run(q, k, v, causal=False)
        _close(out, ref, TOL[torch.bfloat16], "out")
        for name, g, r in zip("qkv", grads, ref_grads):
            _close(g, r, TOL[torch.bfloat16], f"d{name}")

    @pytest.mark.parametrize("N,M", [(4096, 4096), (1024, 77)])
    def test_flash_attention_sd_shape_fp16(self, N, M):
        q, k, v = _qkv(2, 8, N, M, 40 if N == 4096 else 80, torch.float16)
        out = kernels.flash_attention(q, k, v)
        _close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), 5e-3, "out")

    def test_predicates(self):
        x = torch.randn(2, 32, 4, 4, device="cuda", dtype=torch.float16)
        h = torch.randn(2, 4, 16, device="cuda", dtype=torch.float16)
        assert kernels.group_norm_supported(x) and kernels.geglu_supported(h)
        assert not kernels.group_norm_supported(x.double()) and not kernels.geglu_supported(h.double())
        with ops.use(triton=False):
            assert not kernels.group_norm_supported(x) and not kernels.geglu_supported(h)
            with pytest.raises(RuntimeError, match="triton=off"):
                kernels.flash_attention(*_qkv(1, 8, 16, 16, 40, torch.float16))
        assert not kernels.group_norm_supported(x.to(memory_format=torch.channels_last))

    def test_group_norm_bf16_sd_shape(self):
        _gn_check((2, 320, 16, 16), 32, torch.bfloat16, silu=True)

    def test_geglu_bf16(self):
        h = torch.randn(2, 64, 2 * 1280, device="cuda", dtype=torch.bfloat16)
        a, g = h.double().chunk(2, -1)
        _close(kernels.geglu(h), a * F.gelu(g), TOL[torch.bfloat16])
