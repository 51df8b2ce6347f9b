"""Controlled generation, MRLF fusion and the two-pass driver on tiny random models."""
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlNet, ControlNetConfig
from helpers import randomize_, rel_err
from ldm.sd import StableDiffusion
from ldm.unet import UNetModel
from mrlf.fusion import controlled_model, tiled_eps
from mrlf.pipeline import Inpaint, MRLFSettings, Pipeline, SamplingSettings, step_window, from_pil, to_pil
from mrlf.style import blend_unet_
from mrlf.tiles import View, blend_weights, get_views
from samplers import (SAMPLERS, SD15, cfg, ddim_sample, ddim_step, dpm_timesteps, euler_timesteps, guided_eps, randn,
                      step_alphas)
from segmentation.synthetic import street_scene


@pytest.fixture(scope="module")
def gen():
    sd = StableDiffusion.random("tiny", seed=0)
    randomize_(sd.unet, seed=1)
    cn = randomize_(ControlNet(ControlNetConfig.tiny(20)), seed=2).eval()
    return Pipeline(sd, cn)


def _ctx(gen, n=1):
    return gen.contexts(["road car sky"] * n)


def test_batched_views_equal_one_view_loop(gen):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 24, 24, generator=g)
    hint = gen.hint_from_labels(street_scene(96, 96, 1), 192, 192)
    views = get_views(24, 24, 16, 4)
    assert len(views) == 9
    model = controlled_model(gen.sd.unet, gen.controlnet)
    a_t, a_prev = step_alphas(SD15, 501, 20)
    kw = dict(context=_ctx(gen), guidance=7.5, hint=hint)
    one = ddim_step(z, tiled_eps(model, views, view_batch=1, **kw)(z, 501), a_t, a_prev)
    batched = ddim_step(z, tiled_eps(model, views, view_batch=4, **kw)(z, 501), a_t, a_prev)
    assert rel_err(batched, one) < 1e-5 and rel_err(one, z) > 1e-3
    # the loop itself: each view's DDIM update averaged by hand
    acc, cnt = torch.zeros_like(z), torch.zeros_like(z)
    for v in views:
        x = z[..., v.h0:v.h1, v.w0:v.w1]
        h = hint[..., v.h0 * 8:v.h1 * 8, v.w0 * 8:v.w1 * 8]
        eps = cfg(model, 7.5, context=kw["context"], hint=h)(x, 501)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        acc[..., v.h0:v.h1, v.w0:v.w1] += a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        cnt[..., v.h0:v.h1, v.w0:v.w1] += 1
    assert rel_err(one, acc / cnt) < 1e-5


def test_single_view_sampling_equals_plain_ddim_with_guidance(gen):
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    hint = gen.hint_from_labels(street_scene(128, 128, 2), 128, 128)
    ctx = _ctx(gen)
    ours = gen.sample(z0, ctx, hint, SamplingSettings(steps=4))
    eps_fn = cfg(controlled_model(gen.sd.unet, gen.controlnet), 7.5, context=ctx, hint=hint)
    ref = ddim_sample(eps_fn, z0, 4, SD15)
    assert rel_err(ours, ref) < 1e-5


def test_control_window_runs_the_unet_alone_outside_it(gen):
    """Steps outside [control_start, control_end] of the steps run are the guided U-Net without the
    ControlNet (diffusers' control_guidance_start/end); the window is over the steps an img2img run takes."""
    assert step_window(5, 0.2, 0.6) == [False, True, True, False, False]
    assert step_window(4, 0.0, 1.0) == [True] * 4 and step_window(10, 0.0, 0.7) == [True] * 7 + [False] * 3
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    hint = gen.hint_from_labels(street_scene(128, 128, 2), 128, 128)
    ctx = _ctx(gen)
    ours = gen.sample(z0, ctx, hint, SamplingSettings(steps=5, control_start=0.2, control_end=0.6))
    with_cn = cfg(controlled_model(gen.sd.unet, gen.controlnet), 7.5, context=ctx, hint=hint)
    alone = cfg(controlled_model(gen.sd.unet, None), 7.5, context=ctx)
    on = SD15.timesteps(5).tolist()[1:3]
    ref = ddim_sample(lambda x, t: (with_cn if t in on else alone)(x, t), z0, 5, SD15)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours, gen.sample(z0, ctx, hint, SamplingSettings(steps=5))) > 1e-3
    assert rel_err(ours, ddim_sample(alone, z0, 5, SD15)) > 1e-3
    assert torch.equal(gen.sample(z0, ctx, hint, SamplingSettings(steps=5, control_end=1.0)),
                       gen.sample(z0, ctx, hint, SamplingSettings(steps=5)))

    calls = []
    handle = gen.controlnet.register_forward_hook(lambda *_: calls.append(1))
    try:  # img2img at strength 0.5 runs 2 of 4 steps: end 0.5 keeps the ControlNet for the first of them
        gen.generate("x", street_scene(64, 64, 4), height=64, width=64, init_images=torch.zeros(1, 3, 64, 64),
                     settings=SamplingSettings(steps=4, strength=0.5, control_end=0.5))
    finally:
        handle.remove()
    assert len(calls) == 1
    for bad in (dict(control_start=0.5, control_end=0.5), dict(control_end=1.5), dict(control_start=-0.1)):
        with pytest.raises(ValueError, match="control window"):
            SamplingSettings(**bad)


def test_guidance_window_takes_the_conditional_prediction_alone_outside_it(gen):
    """Steps outside [guidance_start, guidance_end] of the steps run take the conditional prediction
    alone (one half-size call, the ControlNet still on); inside, guidance as usual."""
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    hint = gen.hint_from_labels(street_scene(128, 128, 2), 128, 128)
    ctx = _ctx(gen)
    ours = gen.sample(z0, ctx, hint, SamplingSettings(steps=5, guidance_start=0.2, guidance_end=0.6))
    model = controlled_model(gen.sd.unet, gen.controlnet)
    guided, cond = cfg(model, 7.5, context=ctx, hint=hint), cfg(model, 1.0, context=ctx, hint=hint)
    on = SD15.timesteps(5).tolist()[1:3]
    ref = ddim_sample(lambda x, t: (guided if t in on else cond)(x, t), z0, 5, SD15)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours, gen.sample(z0, ctx, hint, SamplingSettings(steps=5))) > 1e-3
    batches = []  # outside the window the U-Net sees the conditional half only
    handle = gen.sd.unet.register_forward_hook(lambda m, a, out: batches.append(out.shape[0]))
    try:
        gen.sample(z0, ctx, hint, SamplingSettings(steps=4, guidance_end=0.5))
    finally:
        handle.remove()
    assert batches == [2, 2, 1, 1]
    # both windows at once: the ControlNet's and the guidance's are independent
    both = gen.sample(z0, ctx, hint, SamplingSettings(steps=4, control_end=0.5, guidance_start=0.5))
    alone = cfg(controlled_model(gen.sd.unet, None), 7.5, context=ctx)  # the last two steps: guided, no ControlNet
    first = SD15.timesteps(4).tolist()[:2]  # the first two: the ControlNet, unguided
    ref = ddim_sample(lambda x, t: (cond if t in first else alone)(x, t), z0, 4, SD15)
    assert rel_err(both, ref) < 1e-5
    for bad in (dict(guidance_start=0.5, guidance_end=0.5), dict(guidance_end=1.5), dict(guidance_start=-0.1)):
        with pytest.raises(ValueError, match="guidance window"):
            SamplingSettings(**bad)


def test_generate_is_seeded_and_batch_independent(gen):
    lab = street_scene(64, 64, 4)
    s = SamplingSettings(steps=3)
    a = gen.generate(["x", "y"], lab, height=64, width=64, seeds=[7, 8], settings=s, output="tensor")
    b = gen.generate(["y"], lab, height=64, width=64, seeds=[8], settings=s, output="tensor")
    c = gen.generate(["y"], lab, height=64, width=64, seeds=[9], settings=s, output="tensor")
    assert rel_err(b[0], a[1]) < 1e-5 and rel_err(c[0], b[0]) > 1e-3
    again = gen.generate(["y"], lab, height=64, width=64, seeds=[8], settings=s, output="tensor")
    assert torch.equal(again, b)


def test_generate_options(gen):
    lab = street_scene(64, 64, 4)
    imgs = gen.generate("x", lab, height=64, width=64, images_per_prompt=2, settings=SamplingSettings(steps=2))
    assert len(imgs) == 2 and imgs[0].size == (64, 64) and imgs[0].mode == "RGB"
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    out = gen.generate("x", lab, height=64, width=64, init_images=init, output="latents",
                       settings=SamplingSettings(steps=4, strength=0.5))
    assert out.shape == (1, 4, 8, 8)
    other = gen.generate("x", lab, height=64, width=64, init_images=-init, output="latents",
                         settings=SamplingSettings(steps=4, strength=0.5))
    assert rel_err(other, out) > 1e-3  # the init image reaches the result
    # strength -> 0 (one step, from t=1) returns about the init's latents (same generator draws: noise, posterior)
    g = torch.Generator().manual_seed(0)
    randn((1, 4, 8, 8), [g])
    x0 = gen.sd.encode_image(init, [g])
    low = gen.generate("x", lab, height=64, width=64, init_images=init, output="latents", seeds=[0],
                       settings=SamplingSettings(steps=20, strength=0.05))
    assert rel_err(low, x0) < 0.3  # from noise (init ignored) it would be about 6
    steps = []
    gen.generate("x", None, height=64, width=64, settings=SamplingSettings(steps=3, guess_mode=True),
                 callback=lambda i, t, z: steps.append(t))
    assert steps == [667, 334, 1]
    with pytest.raises(ValueError, match="multiple of 32"):
        gen.generate("x", lab, height=60, width=64)
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(["x", "y"], lab, height=64, width=64, seeds=[1])


def test_inpainting_reinjects_init_latents(gen):
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    out = gen.sample(z0, _ctx(gen), None, SamplingSettings(steps=3), inpaint=Inpaint(init, mask), generator=g1)
    # after the last step (t=1) the masked part is the init noised to t-1 = 0 with the last noise draw
    for _ in range(3):
        n = torch.randn(1, 4, 16, 16, generator=g2)
    a0 = SD15.alphas_cumprod[0]
    expect = a0.sqrt() * init + (1 - a0).sqrt() * n
    assert rel_err(out[..., :8, :], expect[..., :8, :]) < 1e-6
    plain = gen.sample(z0, _ctx(gen), None, SamplingSettings(steps=3))
    assert rel_err(out[..., 8:, :], plain[..., 8:, :]) > 1e-4  # the unmasked half feels the masked half


def test_mrlf_two_pass_is_deterministic(gen):
    lab = street_scene(64, 64, 3)
    kw = dict(settings=SamplingSettings(steps=2), fusion=MRLFSettings(window=8, stride=4, component_threshold=300))
    a = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), **kw)
    b = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), **kw)
    assert a.image.size == (64, 64) and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.mask.sum() == sum(c.area for c in a.components) > 0
    one = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), settings=kw["settings"],
                   fusion=MRLFSettings(scale_factor=1))
    ref = gen.generate("road", lab, height=64, width=64, seeds=[1], settings=kw["settings"])[0]
    assert np.array_equal(np.asarray(one.image), np.asarray(ref))  # factor 1 is plain generation
    with pytest.raises(ValueError, match="label"):
        gen.mrlf(np.full((64, 64), 30, np.uint8), "road", torch.Generator())
    with pytest.raises(ValueError):
        MRLFSettings(inpaint_level="sometimes")


def test_mrlf_eta_noise_comes_from_the_sample_generator(gen):
    lab = street_scene(64, 64, 3)
    kw = dict(settings=SamplingSettings(steps=2, eta=0.8),
              fusion=MRLFSettings(window=8, stride=4, component_threshold=300))
    torch.manual_seed(0)
    a = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), **kw)
    torch.manual_seed(1)  # torch's global generator plays no part, in either pass
    b = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), **kw)
    assert np.array_equal(np.asarray(a.first_pass), np.asarray(b.first_pass))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


@torch.no_grad()
def test_tiled_eps_with_one_full_view_is_the_plain_guided_eps(gen):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    hint = gen.hint_from_labels(street_scene(128, 128, 1), 128, 128).expand(2, -1, -1, -1)
    ctx, model, t = _ctx(gen, 2), controlled_model(gen.sd.unet, gen.controlnet), torch.tensor(601)
    fused = tiled_eps(model, [View(0, 16, 0, 16)], context=ctx, guidance=7.5, hint=hint)(z, t)
    assert torch.equal(fused, guided_eps(model, z, t, 7.5, context=ctx, hint=hint))


@torch.no_grad()
def test_tiled_eps_is_the_weighted_average_of_the_views_eps(gen):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(8))
    hint = gen.hint_from_labels(street_scene(96, 96, 2), 192, 192)
    views, weights = get_views(24, 24, 16, 4), blend_weights(16, 16, "tent")
    ctx, model = _ctx(gen), controlled_model(gen.sd.unet, gen.controlnet)
    fused = tiled_eps(model, views, context=ctx, guidance=5.0, hint=hint, view_batch=4, weights=weights)(z, 301)
    acc, cnt = torch.zeros_like(z), torch.zeros(24, 24)
    for v in views:
        h = hint[..., v.h0 * 8:v.h1 * 8, v.w0 * 8:v.w1 * 8]
        eps = guided_eps(model, z[..., v.h0:v.h1, v.w0:v.w1], 301, 5.0, context=ctx, hint=h)
        acc[..., v.h0:v.h1, v.w0:v.w1] += weights * eps
        cnt[v.h0:v.h1, v.w0:v.w1] += weights
    assert rel_err(fused, acc / cnt) < 1e-5  # batched views vs one at a time: float rounding only
    uniform = tiled_eps(model, views, context=ctx, guidance=5.0, hint=hint, view_batch=4)(z, 301)
    assert rel_err(uniform, fused) > 1e-4  # the weights act


@pytest.fixture(scope="module")
def mrlf_by_sampler(gen):
    """One MRLF run per sampler: both passes, inpainting in pass 2."""
    fusion = MRLFSettings(window=8, stride=4, component_threshold=300, view_batch=4)
    return {name: gen.mrlf(street_scene(64, 64, 3), "road", torch.Generator().manual_seed(1),
                           settings=SamplingSettings(steps=3, sampler=name), fusion=fusion) for name in SAMPLERS}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_generate_and_mrlf(gen, mrlf_by_sampler, name):
    lab = street_scene(64, 64, 3)
    # generate(): one view, so exactly the sampler on the guided, controlled eps
    z0 = randn((1, 4, 8, 8), [torch.Generator().manual_seed(2)])
    ours = gen.generate("road car", lab, height=64, width=64, seeds=[2], output="latents",
                        settings=SamplingSettings(steps=3, sampler=name))
    eps_fn = cfg(controlled_model(gen.sd.unet, gen.controlnet), 7.5, context=gen.contexts(["road car"]),
                 hint=gen.hint_from_labels(lab, 64, 64))
    assert rel_err(ours, SAMPLERS[name].sample(eps_fn, z0, 3, SD15)) < 1e-5
    r = mrlf_by_sampler[name]
    assert r.mask.any() and r.image.size == (64, 64) and torch.isfinite(r.pass2_latents).all()
    for other, o in mrlf_by_sampler.items():
        if other != name:
            assert rel_err(r.pass1_latents, o.pass1_latents) > 1e-3 and rel_err(r.pass2_latents, o.pass2_latents) > 1e-3


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_inpainting_noises_the_init_to_each_samplers_level(gen, name):
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    states = []
    out = gen.sample(z0, _ctx(gen), None, SamplingSettings(steps=3, sampler=name), inpaint=Inpaint(init, mask),
                     generator=torch.Generator().manual_seed(9), callback=lambda i, t, z: states.append(z))
    g = torch.Generator().manual_seed(9)
    sigmas = (euler_timesteps if name == "euler" else dpm_timesteps)(3)[1]
    for i, z in enumerate(states):
        n = torch.randn(1, 4, 16, 16, generator=g)
        s = sigmas[i + 1]
        # "faithful" is the matched level for these samplers: Euler's state is x0 + σ·n, DPM's the VP latent
        expect = init + s * n if name == "euler" else (init + s * n) / (s**2 + 1) ** 0.5
        assert rel_err(z[..., :8, :], expect[..., :8, :]) < 1e-5, i
    assert torch.equal(out[..., :8, :], init[..., :8, :])  # σ = 0 at the end: the init itself
    assert out is states[-1]


def test_sampler_options_are_checked(gen):
    with pytest.raises(ValueError, match="ddim"):
        SamplingSettings(sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="ddim"):
        SamplingSettings(sampler="dpmpp_2m", strength=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplingSettings(sampler="plms")
    with pytest.raises(ValueError, match="img2img"):
        gen.generate("x", None, height=64, width=64, init_images=torch.zeros(1, 3, 64, 64),
                     settings=SamplingSettings(steps=2, sampler="euler"))


def test_mrlf_result_latents_and_step_callback(gen):
    lab = street_scene(64, 64, 3)
    fusion = MRLFSettings(window=8, stride=4, component_threshold=300, posterior="mean")
    seen = []
    r = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), settings=SamplingSettings(steps=3), fusion=fusion,
                 callback=lambda k, i, t, z: seen.append((k, i, t, z)))
    assert [(k, i, t) for k, i, t, _ in seen] == [(k, i, t) for k in (1, 2) for i, t in enumerate((667, 334, 1))]
    assert seen[2][3] is r.pass1_latents and seen[5][3] is r.pass2_latents
    assert r.pass1_latents.shape == (1, 4, 8, 8) and r.init_latents.shape == r.pass2_latents.shape == (1, 4, 16, 16)
    assert np.array_equal(np.asarray(to_pil(gen.sd.decode_latents(r.pass1_latents))[0]), np.asarray(r.first_pass))
    big = to_pil(gen.sd.decode_latents(r.pass2_latents))[0]
    assert np.array_equal(np.asarray(big.resize((64, 64), Image.LANCZOS)), np.asarray(r.image))
    up = from_pil(r.first_pass.resize((128, 128), Image.LANCZOS))
    expect = gen.sd.vae.encode(up).mode() * gen.sd.vae.cfg.scaling_factor  # posterior mean: no draw
    assert torch.equal(r.init_latents, expect)
    one = gen.mrlf(lab, "road", torch.Generator().manual_seed(1), settings=SamplingSettings(steps=3),
                   fusion=MRLFSettings(scale_factor=1))
    assert torch.equal(one.pass1_latents, r.pass1_latents) and one.init_latents is one.pass2_latents is None


def test_style_knob_endpoints_and_midpoint():
    up = randomize_(UNetModel(UNetModel().cfg.tiny()), seed=1)
    us = randomize_(UNetModel(up.cfg), seed=2)
    p0 = {k: v.clone() for k, v in up.state_dict().items()}
    m = UNetModel(up.cfg)
    m.load_state_dict(p0)
    blend_unet_(m, us, 0.0)
    assert all(torch.equal(m.state_dict()[k], p0[k]) for k in p0)
    blend_unet_(m, us, 1.0)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in us.state_dict().items())
    m.load_state_dict(p0)
    blend_unet_(m, us.state_dict(), 0.25)
    k = "input_blocks.1.0.in_layers.2.weight"
    assert torch.allclose(m.state_dict()[k], 0.75 * p0[k] + 0.25 * us.state_dict()[k], atol=1e-7)
    with pytest.raises(ValueError):
        blend_unet_(m, us, 1.5)
    with pytest.raises(ValueError, match="missing"):
        blend_unet_(m, {"time_embed.0.weight": p0["time_embed.0.weight"]}, 0.5)


def test_style_knob_keeps_the_named_parts_at_us():
    up = randomize_(UNetModel(UNetModel().cfg.tiny()), seed=1)
    us = randomize_(UNetModel(up.cfg), seed=2).state_dict()
    p0 = {k: v.clone() for k, v in up.state_dict().items()}
    blend_unet_(up, us, 0.0, keep=["out", "output_blocks.1"])
    kept = [k for k in p0 if k.startswith(("out.", "output_blocks.1."))]
    # "out" is a whole key component: output_blocks.* stay U^P's unless named
    assert kept and not any(k.startswith("output_blocks.0") for k in kept)
    for k, v in up.state_dict().items():
        assert torch.equal(v, us[k] if k in kept else p0[k]), k
    up.load_state_dict(p0)
    blend_unet_(up, us, 0.5, keep=["out"])
    k = "input_blocks.1.0.in_layers.2.weight"
    assert torch.allclose(up.state_dict()[k], 0.5 * p0[k] + 0.5 * us[k], atol=1e-7)
    assert torch.equal(up.state_dict()["out.2.weight"], us["out.2.weight"])
    with pytest.raises(ValueError, match=r"no U-Net tensor under output_blocks\.99, outp; its parts: .*output_blocks\.1"):
        blend_unet_(up, us, 0.0, keep=["output_blocks.99", "outp"])
