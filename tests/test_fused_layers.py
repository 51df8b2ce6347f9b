"""The fused GroupNorm(+SiLU) / GEGLU kernels wired into the model layers (``ops.use(fused=...)``).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest when there is no GPU); the
`*_supported` predicates are widened to CPU tensors for the length of a test, which is the only
thing that keeps the layers from taking the fused path on CPU in real use.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from helpers import randomize_, rel_err
from ldm import kernels, ops
from ldm.config import AutoencoderConfig, UNetConfig
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL


@pytest.fixture
def cpu_kernels(monkeypatch):
    """Count kernel calls and let the layers use the interpreted kernels on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels.triton_available():
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1)")
    calls = Counter()
    gn, gg = kernels.group_norm, kernels.geglu

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, block=None):
        calls["groupnorm+silu" if silu else "groupnorm"] += 1
        return gn(x, num_groups, weight, bias, eps, silu, block)

    def geglu(*args, **kw):
        calls["geglu"] += 1
        return gg(*args, **kw)

    monkeypatch.setattr(kernels, "_usable", lambda t: t.dtype in kernels.DTYPES)
    monkeypatch.setattr(kernels, "group_norm", group_norm)
    monkeypatch.setattr(kernels, "geglu", geglu)
    return calls


def _unet():
    cfg = UNetConfig.tiny()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.context_dim)
    return randomize_(UNetModel(cfg), seed=0).eval(), (x, torch.tensor([10, 900]), ctx)


def test_unet_and_vae_forward_match_the_pytorch_path(cpu_kernels):
    unet, args = _unet()
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=1).eval()
    z = torch.randn(1, vae.cfg.latent_channels, 8, 8)
    with torch.no_grad():
        ref_u, ref_v = unet(*args), vae.decode(z)
        assert not cpu_kernels  # off by default
        with ops.use(fused="all"):
            out_u, out_v = unet(*args), vae.decode(z)
    assert rel_err(out_u, ref_u) < 1e-5 and rel_err(out_v, ref_v) < 1e-5
    # every ResBlock norm pair fused with its SiLU; the transformer's and the VAE attention's norms alone
    assert cpu_kernels["groupnorm+silu"] > 0 and cpu_kernels["groupnorm"] > 0 and cpu_kernels["geglu"] > 0


def test_only_the_named_fusion_runs(cpu_kernels):
    unet, args = _unet()
    with torch.no_grad(), ops.use(fused="geglu"):
        unet(*args)
    assert cpu_kernels["geglu"] > 0 and not cpu_kernels["groupnorm"] and not cpu_kernels["groupnorm+silu"]


def test_training_gradients_match(cpu_kernels):
    unet, (x, t, ctx) = _unet()
    x, t, ctx = x[:1, :, :8, :8], t[:1], ctx[:1]  # the interpreted backward is slow: the smallest input
    unet.train()

    def grads():
        unet.zero_grad()
        unet(x, t, ctx).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    ref = grads()
    with ops.use(fused=("groupnorm", "geglu")):
        out = grads()
    assert rel_err(out, ref) < 1e-4 and cpu_kernels["groupnorm+silu"] > 0


def test_settings():
    fused = lambda spec: ops.parse(f"fused={spec}").fused  # noqa: E731
    assert fused("") == fused("none") == frozenset()
    assert fused("all") == fused("geglu + groupnorm") == {"groupnorm", "geglu"}
    with pytest.raises(ValueError, match="layernorm"):
        fused("groupnorm+layernorm")
    before = ops.state().fused
    with ops.use(fused="groupnorm"):
        assert ops.fused("groupnorm") and not ops.fused("geglu")
    assert ops.state().fused == before
    with ops.use(fused=("all",)):
        assert ops.fused("geglu")


def test_cpu_tensors_never_take_the_fused_path():
    unet, args = _unet()
    with torch.no_grad(), ops.use(fused="all"):  # the real predicates: CPU tensors are not "supported"
        out = unet(*args)
    with torch.no_grad():
        torch.testing.assert_close(out, unet(*args), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_unet_fused(dtype):
    unet, (x, t, ctx) = _unet()
    unet = unet.cuda().to(dtype)
    x, t, ctx = x.cuda().to(dtype), t.cuda(), ctx.cuda().to(dtype)
    with torch.no_grad():
        ref = unet(x, t, ctx).float()
        with ops.use(fused="all"):
            out = unet(x, t, ctx).float()
    assert rel_err(out, ref) < 2e-2
