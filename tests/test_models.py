"""Invariants of our networks that need no reference library."""
import pytest
import torch

from controlnet import ControlNet, ControlNetConfig
from helpers import randomize_, rel_err
from ldm import AutoencoderConfig, AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNetConfig, UNetModel
from ldm import ops
from ldm.attention import attention, math_attention
from ldm.layers import timestep_embedding
from ldm.vae import DiagonalGaussian


@pytest.fixture(scope="module")
def unet():
    return randomize_(UNetModel(UNetConfig.tiny()), seed=1).eval()


def _inputs(b=2, h=16, ctx=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 4, h, h, generator=g), torch.tensor([10, 900][:b]), torch.randn(b, 7, ctx, generator=g)


@pytest.mark.parametrize("n,m,d,causal", [(64, 64, 40, False), (33, 77, 80, False), (5, 9, 160, False),
                                           (77, 77, 64, True), (64, 64, 40, True)])
def test_sdpa_matches_math(n, m, d, causal):
    q, k, v = torch.randn(2, 3, n, d), torch.randn(2, 3, m, d), torch.randn(2, 3, m, d)
    ref = math_attention(q, k, v, causal)
    with ops.use(attention="sdpa"):
        assert rel_err(attention(q, k, v, causal), ref) < 1e-5
    # the math path itself against a literal softmax
    s = (q @ k.transpose(-1, -2)) / d ** 0.5
    if causal:
        s = s + torch.full((n, m), float("-inf")).triu(1)
    assert rel_err(ref, s.softmax(-1) @ v) < 1e-5


def test_attention_backend_errors():
    with pytest.raises(ValueError, match="backend"):
        with ops.use(attention="nope"):
            pass


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(e[1, 0], torch.cos(torch.tensor(5.0)))


def test_unet_backends_agree(unet):
    x, t, ctx = _inputs()
    with torch.no_grad():
        with ops.use(attention="math"):
            a = unet(x, t, ctx)
        with ops.use(attention="sdpa"):
            b = unet(x, t, ctx)
    assert rel_err(b, a) < 1e-5


def test_unet_batch_independence(unet):
    x, t, ctx = _inputs()
    with torch.no_grad():
        both = unet(x, t, ctx)
        one = unet(x[1:], t[1:], ctx[1:])
    assert rel_err(one, both[1:]) < 1e-5


def test_zero_controlnet_leaves_unet_unchanged(unet):
    cn = ControlNet.from_unet(unet, hint_channels=20, hint_block_channels=(8, 8, 16, 16)).eval()
    x, t, ctx = _inputs()
    hint = torch.rand(2, 20, 128, 128)
    with torch.no_grad():
        control = cn(x, hint, t, ctx)
        assert len(control) == len(unet.skip_channels) + 1 == 10 and all(c.abs().max() == 0 for c in control)
        assert torch.equal(unet(x, t, ctx, control=control), unet(x, t, ctx))


def test_controlnet_from_unet_copies_encoder(unet):
    cn = ControlNet.from_unet(unet, hint_channels=3, hint_block_channels=(8, 8, 16, 16))
    for name, p in unet.input_blocks.state_dict().items():
        assert torch.equal(cn.input_blocks.state_dict()[name], p)
    assert cn.input_hint_block[0].weight.shape[1] == 3


def test_controlnet_scale_scales_residuals():
    cn = randomize_(ControlNet(ControlNetConfig.tiny()), seed=2).eval()
    x, t, ctx = _inputs()
    hint = torch.rand(2, 20, 128, 128)
    with torch.no_grad():
        one = cn(x, hint, t, ctx, scale=1.0)
        half = cn(x, hint, t, ctx, scale=0.5)
        guess = cn(x, hint, t, ctx, guess_mode=True)
    assert all(torch.allclose(h, 0.5 * o) for h, o in zip(half, one))
    scales = 10 ** torch.linspace(-1, 0, len(one))  # diffusers' guess-mode rule, shallowest first
    assert all(torch.allclose(g, s * o, atol=1e-7) for g, s, o in zip(guess, scales.tolist(), one))
    unet = randomize_(UNetModel(UNetConfig.tiny()), seed=5).eval()
    with torch.no_grad():
        assert rel_err(unet(x, t, ctx, control=one), unet(x, t, ctx)) > 1e-3  # residuals really arrive


def test_guess_mode_gives_the_unconditional_half_no_residuals():
    from mrlf.fusion import controlled_model

    cn = randomize_(ControlNet(ControlNetConfig.tiny()), seed=2).eval()
    unet = randomize_(UNetModel(UNetConfig.tiny()), seed=5).eval()
    x, _, ctx = _inputs()
    t, hint = torch.tensor([500, 500]), torch.rand(2, 20, 128, 128)
    with torch.no_grad():
        out = controlled_model(unet, cn, 1.0, guess_mode=True)(x, t, ctx, hint)  # the batch [uncond; cond]
        uncond = unet(x[:1], t[:1], ctx[:1])
        cond = unet(x[1:], t[1:], ctx[1:], control=cn(x[1:], hint[1:], t[1:], ctx[1:], guess_mode=True))
        plain = controlled_model(unet, cn, 1.0)(x, t, ctx, hint)
    assert rel_err(out[:1], uncond) < 1e-5 and rel_err(out[1:], cond) < 1e-5
    assert rel_err(plain[:1], uncond) > 1e-3  # without guess mode the unconditional half is controlled too


def test_input_validation(unet):
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="multiple of"):
        unet(torch.randn(1, 4, 18, 16), 1, ctx[:1])
    with pytest.raises(ValueError, match="latents"):
        unet(torch.randn(1, 3, 16, 16), 1, ctx[:1])
    with pytest.raises(ValueError, match="control"):
        unet(x, t, ctx, control=[x])
    cn = ControlNet(ControlNetConfig.tiny())
    with pytest.raises(ValueError, match="hint size"):
        cn(x, torch.rand(2, 20, 64, 64), t, ctx)
    with pytest.raises(ValueError, match="hint"):
        cn(x, torch.rand(2, 3, 128, 128), t, ctx)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.randn(1, 3, 60, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(unet, dtype):
    x, t, ctx = _inputs()
    low = UNetModel(unet.cfg).to(dtype).eval()
    low.load_state_dict(unet.state_dict())
    with torch.no_grad():
        ref = unet(x, t, ctx)
        out = low(x.to(dtype), t, ctx.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_gradient_checkpointing_same_gradients(unet):
    x, t, ctx = _inputs()
    grads = []
    for ckpt in (False, True):
        m = UNetModel(unet.cfg)
        m.load_state_dict(unet.state_dict())
        m.train().gradient_checkpointing = ckpt
        m(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_vae_posterior_sampling_is_seeded():
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval()
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = vae.encode(img)
        a = post.sample(torch.Generator().manual_seed(7))
        b = post.sample(torch.Generator().manual_seed(7))
        c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 4, 8, 8) and torch.equal(post.mode(), post.mean)
    wide = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.tensor([-50.0, -10, 10, 50]).view(1, 4, 1, 1)
                                       .expand(1, 4, 2, 2)], dim=1))
    assert wide.logvar[0, :, 0, 0].tolist() == [-30.0, -10.0, 10.0, 20.0]  # CompVis' clamp


def test_vae_fp16_decode_never_overflows():
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval()
    with torch.no_grad():
        norm = vae.decoder.mid.block_1.norm2  # activations past 65504 in fp16; later GroupNorms rescale them
        norm.weight.mul_(3e4)
        norm.bias.mul_(3e4)
        z = torch.randn(1, 4, 8, 8)
        ref = vae.decode(z)
        half = vae.half()
        raw = half.decoder(half.post_quant_conv(z.half()))
        out = half.decode(z.half())
    assert not torch.isfinite(raw).all(), "the test must overflow without the fallback"
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 1e-2


def test_clip_skip_and_validation():
    clip = randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=6).eval()
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        last, pen = clip(ids), clip(ids, skip=1)
        raw = clip(ids, skip=1, final_norm=False)
    assert last.shape == (2, 77, 32) and not torch.allclose(last, pen)
    assert torch.allclose(clip.text_model.final_layer_norm(raw), pen)
    with pytest.raises(ValueError):
        clip(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError):
        clip(ids, skip=2)


def test_clip_is_causal():
    clip = randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=6).eval()
    ids = torch.randint(0, 49408, (1, 77))
    ids2 = ids.clone()
    ids2[0, 40:] = 5
    with torch.no_grad():
        a, b = clip(ids), clip(ids2)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.allclose(a[:, 40:], b[:, 40:])
