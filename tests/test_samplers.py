"""samplers/: schedule, DDIM, CFG, Euler and DPM-Solver++ against diffusers (the oracle).

All on CPU with tiny latents; diffusers is used only here, never by product code.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import rel_err
from samplers import (
    SAMPLERS,
    SD15,
    Schedule,
    Split,
    add_noise,
    cfg,
    cfg_combine,
    ddim_levels,
    ddim_sample,
    ddim_step,
    ddim_step_with_x0,
    dpm_timesteps,
    dpmpp_2m_levels,
    dpmpp_2m_sample,
    euler_levels,
    euler_sample,
    euler_timesteps,
    get_sampler,
    guided_eps,
    img2img_start,
    img2img_timesteps,
    noised,
    predict_x0,
    prev_timestep,
    randn,
    spaced_timesteps,
    step_alphas,
)

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 8, 8)


def _config(schedule: Schedule, **overrides) -> dict:
    cfg_ = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule,
        steps_offset=schedule.steps_offset,
        timestep_spacing=schedule.timestep_spacing,
    )
    cfg_.update(overrides)
    return cfg_


def hf_ddim(schedule: Schedule = SD15, **overrides):
    kw = dict(clip_sample=False, set_alpha_to_one=schedule.set_alpha_to_one)
    kw.update(overrides)
    return diffusers.DDIMScheduler(**_config(schedule, **kw))


def eps_fn(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth, t-dependent stand-in for a denoiser (float32)."""
    t = float(t)
    ramp = torch.arange(x.numel(), dtype=x.dtype).view_as(x)
    return 0.9 * torch.sin(x * (1 + t / 1000)) + 0.3 * torch.cos(0.01 * ramp + t / 100)


def x_init(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def test_alphas_cumprod_bit_exact_vs_diffusers():
    ref = hf_ddim()
    assert SD15.alphas_cumprod.dtype == torch.float32
    assert torch.equal(SD15.betas, ref.betas)
    assert torch.equal(SD15.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(SD15.final_alpha_cumprod, ref.final_alpha_cumprod)
    one = Schedule(set_alpha_to_one=True)
    assert one.final_alpha_cumprod.item() == 1.0 == hf_ddim(one).final_alpha_cumprod.item()
    lin = Schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(lin.alphas_cumprod, hf_ddim(lin).alphas_cumprod)


@pytest.mark.parametrize(
    "t, value",
    [(0, 0.99915), (1, 0.998296), (50, 0.951577), (901, 0.014005), (950, 0.008247), (951, 0.008155), (999, 0.004660)],
)
def test_alphas_cumprod_check_values(t, value):
    assert SD15.alphas_cumprod[t].item() == pytest.approx(value, abs=6e-7)


def test_final_alpha_and_sigma_min():
    assert SD15.final_alpha_cumprod.item() == pytest.approx(0.99915, abs=1e-7)
    assert math.sqrt(1 - SD15.final_alpha_cumprod.item()) == pytest.approx(0.029155, abs=1e-6)


def test_sd15_twenty_leading_steps():
    # Parity trap: leading spacing + steps_offset 1 -> 951, 901, ..., 1 (= 50k + 1).
    assert SD15.timesteps(20).tolist() == [50 * k + 1 for k in range(19, -1, -1)]
    assert Schedule(steps_offset=0).timesteps(20).tolist() == [50 * k for k in range(19, -1, -1)]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    ref = hf_ddim(Schedule(steps_offset=offset, timestep_spacing=spacing))
    for n in (1, 3, 7, 10, 20, 50, 333, 999, 1000):
        ref.set_timesteps(n)
        ours = spaced_timesteps(n, 1000, spacing, offset)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, ref.timesteps), (spacing, offset, n)
        assert torch.equal(Schedule(steps_offset=offset, timestep_spacing=spacing).timesteps(n), ours)


def test_schedule_validation():
    with pytest.raises(ValueError):
        Schedule(timestep_spacing="uniform")
    with pytest.raises(ValueError):
        Schedule(beta_schedule="cosine")
    with pytest.raises(ValueError):
        SD15.timesteps(0)
    with pytest.raises(ValueError):
        SD15.timesteps(1001)
    with pytest.raises(ValueError):
        SD15.alpha_bar(1000)


def test_prev_timestep_and_final_alpha():
    assert prev_timestep(951, 20) == 901
    assert prev_timestep(1, 20) == -49
    a_t, a_prev = step_alphas(SD15, 1, 20)
    # Parity trap: the last step goes to ᾱ_0, not to 1 (set_alpha_to_one=False).
    assert a_t.item() == SD15.alphas_cumprod[1].item()
    assert a_prev.item() == SD15.alphas_cumprod[0].item()
    assert step_alphas(Schedule(set_alpha_to_one=True), 1, 20)[1].item() == 1.0
    assert step_alphas(SD15, 951, 20)[1].item() == SD15.alphas_cumprod[901].item()


# --------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------


def _hf_ddim_loop(ref, n, x, eta=0.0, seed=None, timesteps=None):
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    xs, x0s = [], []
    for t in ref.timesteps if timesteps is None else timesteps:
        out = ref.step(eps_fn(x, int(t)), t, x, eta=eta, generator=g)
        x = out.prev_sample
        xs.append(x)
        x0s.append(out.pred_original_sample)
    return xs, x0s


def _our_ddim_loop(n, x, schedule=SD15, **kw):
    xs, x0s, ts = [], [], []

    def record(i, t, x_prev, x0):
        ts.append(t)
        xs.append(x_prev)
        x0s.append(x0)

    final = ddim_sample(eps_fn, x, n, schedule, callback=record, **kw)
    assert final is xs[-1]
    return xs, x0s, ts


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_loop_matches_diffusers_every_step(eta):
    x = x_init()
    ref_xs, ref_x0s = _hf_ddim_loop(hf_ddim(), 20, x, eta=eta, seed=123)
    xs, x0s, ts = _our_ddim_loop(20, x, eta=eta, generator=torch.Generator().manual_seed(123))
    assert ts == SD15.timesteps(20).tolist()
    assert len(xs) == len(ref_xs) == 20
    for i in range(20):
        assert rel_err(xs[i], ref_xs[i]) <= 1e-6, i
        assert rel_err(x0s[i], ref_x0s[i]) <= 1e-6, i
    # Same op sequence on 0-d float32 coefficients as diffusers: bit-identical on CPU.
    assert torch.equal(xs[-1], ref_xs[-1])


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_loop_other_spacings_match_diffusers(spacing):
    # diffusers steps to t - N//n for every spacing (not to the next grid point); so do we.
    sched = Schedule(timestep_spacing=spacing)
    x = x_init(1)
    ref_xs, _ = _hf_ddim_loop(hf_ddim(sched), 10, x)
    xs, _, _ = _our_ddim_loop(10, x, sched)
    for a, b in zip(xs, ref_xs, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_ddim_clip_x0_matches_diffusers_clip_sample():
    x = 3 * x_init(2)
    ref_xs, ref_x0s = _hf_ddim_loop(hf_ddim(clip_sample=True), 10, x)
    xs, x0s, _ = _our_ddim_loop(10, x, clip_x0=1.0)
    assert max(v.abs().max().item() for v in x0s) <= 1.0
    for a, b in zip(xs, ref_xs, strict=True):
        assert rel_err(a, b) <= 1e-6
    unclipped, _, _ = _our_ddim_loop(10, x)
    assert rel_err(unclipped[-1], xs[-1]) > 1e-3  # clipping really acted


def test_ddim_step_formula_and_per_sample_alphas():
    x, eps = x_init(3), x_init(4)
    a_t, a_prev = 0.3, 0.8
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expect = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    out = ddim_step_with_x0(x, eps, a_t, a_prev)
    assert rel_err(out.prev_sample, expect) <= 1e-6
    assert rel_err(out.pred_x0, x0) <= 1e-6
    assert rel_err(predict_x0(x, eps, a_t), x0) <= 1e-6
    # per-sample ᾱ (B,) equals one call per sample
    at, ap = torch.tensor([0.3, 0.05]), torch.tensor([0.8, 0.4])
    noise = x_init(5)
    batched = ddim_step(x, eps, at, ap, eta=0.5, noise=noise)
    for b in range(2):
        single = ddim_step(x[b : b + 1], eps[b : b + 1], at[b].item(), ap[b].item(), eta=0.5, noise=noise[b : b + 1])
        assert rel_err(batched[b : b + 1], single) <= 1e-6
    with pytest.raises(ValueError):
        ddim_step(x, eps, a_t, a_prev, eta=0.5)  # eta > 0 needs noise


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_perfect_x0_oracle(spacing):
    x0 = x_init(6)
    n = x_init(7)

    def make_oracle(schedule):
        def oracle(x, t):
            a = schedule.alphas_cumprod[t]
            return (x - a.sqrt() * x0) / (1 - a).sqrt()

        return oracle

    # With ᾱ_final = 1 DDIM (eta 0) lands exactly on x0.
    one = Schedule(set_alpha_to_one=True, timestep_spacing=spacing)
    t0 = one.timesteps(20)[0].item()
    xt = add_noise(x0, n, t0, one)
    x0s = []
    out = ddim_sample(make_oracle(one), xt, 20, one, callback=lambda i, t, x, p: x0s.append(p))
    assert rel_err(out, x0) <= 1e-5
    assert all(rel_err(p, x0) <= 1e-5 for p in x0s)
    # SD-1.5 (ᾱ_final = ᾱ_0) keeps √(1-ᾱ_0)·n of the original noise.
    sd = Schedule(timestep_spacing=spacing)
    xt = add_noise(x0, n, sd.timesteps(20)[0].item(), sd)
    out = ddim_sample(make_oracle(sd), xt, 20, sd)
    a0 = sd.alphas_cumprod[0]
    assert rel_err(out, a0.sqrt() * x0 + (1 - a0).sqrt() * n) <= 1e-5
    assert rel_err(out, x0) > 1e-3


def test_add_noise_matches_diffusers():
    ref = hf_ddim()
    x0, n = x_init(8), x_init(9)
    t = torch.tensor([999, 3])
    assert torch.equal(add_noise(x0, n, t), ref.add_noise(x0, n, t))
    assert torch.equal(add_noise(x0, n, 500), ref.add_noise(x0, n, torch.tensor(500)))
    assert torch.equal(add_noise(x0, n, torch.tensor(500)), ref.add_noise(x0, n, torch.tensor(500)))
    a = SD15.alphas_cumprod[3]
    assert rel_err(add_noise(x0, n, t)[1], a.sqrt() * x0[1] + (1 - a).sqrt() * n[1]) <= 1e-7
    x16, n16 = x0.half(), n.half()
    assert torch.equal(add_noise(x16, n16, t), ref.add_noise(x16, n16, t))
    with pytest.raises(TypeError):
        add_noise(x0, n, 0.5)


def test_callback_can_replace_latent():
    seen = []

    def spy(x, t):
        seen.append(x.clone())
        return eps_fn(x, t)

    def blend(i, t, x, x0):
        return torch.zeros_like(x) if i == 4 else None

    ddim_sample(spy, x_init(), 10, callback=blend)
    assert torch.count_nonzero(seen[5]) == 0
    assert torch.count_nonzero(seen[4]) > 0


# --------------------------------------------------------------------------------------
# Noise and reproducibility
# --------------------------------------------------------------------------------------


def test_same_seed_same_result():
    x = x_init()

    def run(seed):
        return ddim_sample(eps_fn, x, 10, eta=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_randn_cpu_draw_and_per_sample_generators():
    a = randn((3, 4, 2, 2), torch.Generator().manual_seed(1))
    assert torch.equal(a, torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(1)))
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    b = randn((3, 4, 2, 2), gens)
    for i, s in enumerate((10, 11, 12)):
        # sample i's noise does not depend on the batch it is drawn in
        assert torch.equal(b[i : i + 1], randn((1, 4, 2, 2), torch.Generator().manual_seed(s)))
    h = randn((2, 3), torch.Generator().manual_seed(1), dtype=torch.float16)
    assert h.dtype == torch.float16
    with pytest.raises(ValueError):
        randn((2, 3), gens)


# --------------------------------------------------------------------------------------
# img2img
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, strength", [(20, 1.0), (20, 0.75), (20, 0.5), (10, 0.3), (50, 0.05), (7, 0.999)])
def test_img2img_timesteps_match_diffusers(n, strength):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )

    ref = hf_ddim()
    ref.set_timesteps(n)
    fake_pipe = SimpleNamespace(scheduler=ref)
    ts_ref, n_left = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, n, strength, "cpu")
    ts = img2img_timesteps(n, strength)
    assert torch.equal(ts, ts_ref)
    assert len(ts) == n_left


def test_img2img_strength_zero_raises():
    with pytest.raises(ValueError):
        img2img_timesteps(20, 0.0)
    with pytest.raises(ValueError):
        img2img_timesteps(50, 0.01)  # int(0.5) = 0 steps
    with pytest.raises(ValueError):
        img2img_timesteps(20, 1.5)


def test_img2img_loop_matches_diffusers():
    # The truncated loop still steps by N // n (50), not N // len(tail).
    n, strength = 20, 0.5
    z0 = x_init(11)
    xt, ts = img2img_start(z0, n, strength, generator=torch.Generator().manual_seed(4))
    ref = hf_ddim()
    ref.set_timesteps(n)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4))
    ref_xt = ref.add_noise(z0, noise, ts[:1].repeat(z0.shape[0]))
    assert ts.tolist() == [451, 401, 351, 301, 251, 201, 151, 101, 51, 1]
    assert torch.equal(xt, ref_xt)
    ref_xs, _ = _hf_ddim_loop(ref, n, ref_xt, timesteps=ref.timesteps[n - len(ts) :])
    xs, _, seen_t = _our_ddim_loop(n, xt, timesteps=ts)
    assert seen_t == ts.tolist()
    for a, b in zip(xs, ref_xs, strict=True):
        assert rel_err(a, b) <= 1e-6


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------


class Recorder:
    """A batched 'denoiser' whose output depends on x, context and hint, recording its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, hint=None, scale=None):
        self.calls.append(dict(x=x, t=t, context=context, hint=hint, scale=scale))
        out = torch.tanh(x) + context.mean(dim=(1, 2))[:, None, None, None]
        if hint is not None:
            out = out + 0.1 * hint.mean(dim=1, keepdim=True)
        return out


def test_cfg_batches_uncond_then_cond_in_one_call():
    B = 2
    x = x_init(12, (B, 4, 8, 8))
    u, c = torch.zeros(B, 77, 16), torch.ones(B, 77, 16)
    hint = torch.randn(B, 20, 8, 8)
    model = Recorder()
    eps = cfg(model, 7.5, context=Split(u, c), hint=hint, scale=0.8)(x, 951)

    assert len(model.calls) == 1
    call = model.calls[0]
    assert torch.equal(call["x"], torch.cat([x, x]))
    assert torch.equal(call["context"], torch.cat([u, c]))  # diffusers' order: [uncond; cond]
    assert torch.equal(call["hint"], torch.cat([hint, hint]))  # same hint for both halves
    assert call["t"] == 951 and call["scale"] == 0.8

    e_u, e_c = Recorder()(x, 951, u, hint), Recorder()(x, 951, c, hint)
    assert rel_err(eps, e_u + 7.5 * (e_c - e_u)) <= 1e-6
    assert torch.equal(cfg_combine(e_u, e_c, 7.5), e_u + 7.5 * (e_c - e_u))


def test_cfg_scale_one_skips_uncond_and_negative_prompt():
    x = x_init(13)
    u, c, neg = torch.zeros(2, 77, 16), torch.ones(2, 77, 16), torch.full((2, 77, 16), -2.0)
    hint = torch.randn(2, 20, 8, 8)
    model = Recorder()
    eps = guided_eps(model, x, 1, 1.0, context=Split(u, c), hint=hint)
    assert len(model.calls) == 1 and model.calls[0]["x"] is x and model.calls[0]["context"] is c
    assert model.calls[0]["hint"] is hint
    assert torch.equal(eps, Recorder()(x, 1, c, hint))
    # A negative prompt is just another uncond context.
    eps_neg = guided_eps(Recorder(), x, 1, 5.0, context=Split(neg, c))
    e_n, e_c = Recorder()(x, 1, neg), Recorder()(x, 1, c)
    assert rel_err(eps_neg, e_n + 5.0 * (e_c - e_n)) <= 1e-6


def test_cfg_duplicates_per_sample_t_and_nested_lists():
    x = x_init(14)
    seen = {}

    def model(x, t, context, hints):
        seen.update(t=t, hints=hints)
        return x * 0 + context.mean()

    t = torch.tensor([5, 9])
    h1, h2 = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    guided_eps(model, x, t, 2.0, context=Split(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)), hints=[h1, h2])
    assert seen["t"].tolist() == [5, 9, 5, 9]
    assert torch.equal(seen["hints"][0], torch.cat([h1, h1])) and torch.equal(seen["hints"][1], torch.cat([h2, h2]))


def test_cfg_in_ddim_loop_matches_manual_guidance():
    x = x_init(15)
    u, c = torch.zeros(2, 77, 16), torch.ones(2, 77, 16)
    model = Recorder()
    out = ddim_sample(cfg(model, 7.5, context=Split(u, c)), x, 5)
    assert len(model.calls) == 5 and all(call["x"].shape[0] == 4 for call in model.calls)

    def manual(x, t):
        e_u, e_c = Recorder()(x, t, u), Recorder()(x, t, c)
        return e_u + 7.5 * (e_c - e_u)

    assert rel_err(out, ddim_sample(manual, x, 5)) <= 1e-6


# --------------------------------------------------------------------------------------
# Euler and DPM-Solver++(2M)
# --------------------------------------------------------------------------------------


def _run_hf(sched, n, x):
    sched.set_timesteps(n)
    x = x * sched.init_noise_sigma
    xs = []
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        x = sched.step(eps_fn(model_in, t.item()), t, x).prev_sample
        xs.append(x)
    return sched.timesteps, xs


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 20])
def test_euler_matches_diffusers(spacing, n):
    sched = Schedule(timestep_spacing=spacing)
    ref = diffusers.EulerDiscreteScheduler(**_config(sched))
    ts_ref, ref_xs = _run_hf(ref, n, x_init(16))
    ts, sigmas = euler_timesteps(n, sched)
    assert torch.equal(ts, ts_ref) and torch.equal(sigmas, ref.sigmas)
    xs = []
    euler_sample(eps_fn, x_init(16), n, sched, callback=lambda i, t, x, x0: xs.append(x))
    assert len(xs) == len(ref_xs)
    for a, b in zip(xs, ref_xs, strict=True):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 10, 20])
def test_dpmpp_2m_matches_diffusers(spacing, n):
    sched = Schedule(timestep_spacing=spacing)
    ref = diffusers.DPMSolverMultistepScheduler(**_config(sched))
    ts_ref, ref_xs = _run_hf(ref, n, x_init(17))
    ts, sigmas = dpm_timesteps(n, sched)
    assert torch.equal(ts, ts_ref) and torch.equal(sigmas, ref.sigmas)
    xs = []
    dpmpp_2m_sample(eps_fn, x_init(17), n, sched, callback=lambda i, t, x, x0: xs.append(x))
    assert len(xs) == len(ref_xs)
    for a, b in zip(xs, ref_xs, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_solvers_reach_x0_with_oracle():
    x0 = x_init(18)

    def oracle(x_vp, t):
        # x_vp = √ᾱ_t x0 + √(1-ᾱ_t) n; "trailing" grids are integral for both solvers.
        assert float(t).is_integer()
        a = SD15.alphas_cumprod[int(t)]
        return (x_vp - a.sqrt() * x0) / (1 - a).sqrt()

    for sample in (euler_sample, dpmpp_2m_sample):
        out = sample(oracle, x_init(19), 10, Schedule(timestep_spacing="trailing"))
        assert rel_err(out, x0) <= 1e-4, sample.__name__


# --------------------------------------------------------------------------------------
# The registry and the noise levels of each sampler's states
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_levels_are_where_each_sampler_state_sits(name):
    """With an oracle that knows x0 and the noise, the state after step i is exactly x0 and the
    noise at ``levels`` i: scale·(√ᾱ·x0 + √(1-ᾱ)·noise), for every sampler of the registry."""
    sampler = SAMPLERS[name]
    x0, n = x_init(20), x_init(21)

    def oracle(x_vp, t):
        sigma = SD15.sigma_grid(torch.tensor([float(t)]))[0]
        a = 1 / (sigma**2 + 1)
        return (x_vp - a.sqrt() * x0) / (1 - a).sqrt()

    first_t = {"ddim": SD15.timesteps(10), "euler": euler_timesteps(10)[0], "dpmpp_2m": dpm_timesteps(10)[0]}[name][0]
    a0 = 1 / (SD15.sigma_grid(torch.tensor([float(first_t)]))[0] ** 2 + 1)
    states = []
    sampler.sample(oracle, noised(x0, n, a0), 10, SD15, callback=lambda i, t, x, p: states.append(x))
    levels = sampler.levels(10, SD15)
    assert len(states) == len(levels.alpha_bar) == len(levels.scale) == 10
    for i, x in enumerate(states):
        assert rel_err(x, noised(x0, n, levels.alpha_bar[i], levels.scale[i])) <= 1e-5, (name, i)
    assert levels.alpha_bar[-1].item() == (SD15.final_alpha_cumprod.item() if name == "ddim" else 1.0)
    if name == "euler":  # σ-space: x0 + σ·noise
        sigmas = euler_timesteps(10)[1]
        assert rel_err(states[3], x0 + sigmas[4] * n) <= 1e-5
    else:
        assert torch.equal(levels.scale, torch.ones(10))


def test_ddim_levels_follow_the_img2img_tail():
    ts = img2img_timesteps(20, 0.5)
    levels = ddim_levels(20, SD15, timesteps=ts)
    assert torch.equal(levels.alpha_bar, torch.stack([step_alphas(SD15, t, 20)[1] for t in ts.tolist()]))
    assert torch.equal(levels.alpha_bar, ddim_levels(20).alpha_bar[-len(ts):]) and len(ts) == 10


def test_noised_equals_add_noise_to_the_bit():
    x0, n = x_init(22), x_init(23)
    for t in (999, 501, 0):
        assert torch.equal(noised(x0, n, SD15.alphas_cumprod[t]), add_noise(x0, n, t))
    assert torch.equal(noised(x0.half(), n.half(), SD15.alphas_cumprod[7]), add_noise(x0.half(), n.half(), 7))
    assert rel_err(noised(x0, n, 0.25, 2.0), 2 * (0.5 * x0 + 0.75**0.5 * n)) <= 1e-7
    assert torch.equal(noised(x0, n, 1.0), x0)


def test_registry():
    assert set(SAMPLERS) == {"ddim", "euler", "dpmpp_2m"}
    assert get_sampler("euler") == (euler_sample, euler_levels)
    assert get_sampler("ddim").sample is ddim_sample and get_sampler("dpmpp_2m").levels is dpmpp_2m_levels
    with pytest.raises(ValueError, match="dpmpp_2m"):
        get_sampler("plms")


# --------------------------------------------------------------------------------------
# Layering
# --------------------------------------------------------------------------------------


def test_samplers_import_only_torch_numpy_and_stdlib():
    allowed = {"torch", "numpy", "__future__", "functools", "dataclasses", "typing", "math"}
    root = Path(__file__).resolve().parents[1] / "samplers"
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "schedule.py", "ddim.py", "guidance.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative: inside samplers/
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{f.name} imports {name}"
