"""Inference forwards (autograd off) overwrite their own fresh intermediates to save memory.

They must give bit-for-bit the outputs of the grad-enabled (out-of-place, training) path, must
never touch a tensor the caller passed in, and must actually use less memory.
"""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from controlnet import ControlNet, ControlNetConfig
from helpers import randomize_
from ldm import AutoencoderConfig, AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNetConfig, UNetModel
from ldm.layers import GroupNorm32


def _unet_and_controlnet(use_linear=False):
    ucfg = UNetConfig(**{**UNetConfig.tiny().to_dict(), "use_linear_projection": use_linear})
    unet = randomize_(UNetModel(ucfg), seed=1).eval()
    cn = randomize_(ControlNet(ControlNetConfig(unet=ucfg, hint_block_channels=(8, 8, 16, 16))), seed=2).eval()
    return unet, cn


def _inputs(b=2, h=16):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 4, h, h, generator=g), torch.tensor([10, 900][:b]), torch.randn(b, 7, 32, generator=g),
            torch.rand(b, 20, 8 * h, 8 * h, generator=g))


def _guided(unet, cn, x, t, ctx, hint, scale=1.0, guess_mode=False):
    control = cn(x, hint, t, ctx, scale=scale, guess_mode=guess_mode)
    return [c.detach() for c in control], unet(x, t, ctx, control=control)


def _run_recording(fn, modules):
    """fn()'s outputs, then every module output along the way, copied when made (later in-place ops
    on them must not hide a difference)."""
    seen = []

    def hook(module, args, out):
        seen.extend(t.detach().clone() for t in tree_leaves(out) if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        out = [t.detach() for t in tree_leaves(fn()) if isinstance(t, torch.Tensor)]
    finally:
        for h in handles:
            h.remove()
    return out + seen


def _grad_vs_inference(fn, *models):
    """fn() with autograd on (training's code path) and under no_grad / inference_mode: the same bits,
    dtypes and memory layouts, for the outputs and for every intermediate module output of `models`."""
    modules = [m for model in models for m in model.modules()]
    with torch.enable_grad():
        ref = _run_recording(fn, modules)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = _run_recording(fn, modules)
        assert len(out) == len(ref)
        for i, (a, b) in enumerate(zip(out, ref)):
            assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b), (mode.__name__, i)


def _snapshot(*tensors):
    return [t.clone() for t in tree_leaves(tensors)]


def _unchanged(snapshot, *tensors):
    now = tree_leaves(tensors)
    return len(now) == len(snapshot) and all(torch.equal(a, b) for a, b in zip(now, snapshot))


@pytest.mark.parametrize("use_linear", [False, True])
def test_unet_with_control_is_bitwise_the_grad_path(use_linear):
    unet, cn = _unet_and_controlnet(use_linear)
    x, t, ctx, hint = _inputs()
    _grad_vs_inference(lambda: _guided(unet, cn, x, t, ctx, hint), unet, cn)
    _grad_vs_inference(lambda: _guided(unet, cn, x, t, ctx, hint, scale=[0.5] * 5 + [1.5] * 5, guess_mode=True),
                       unet, cn)
    _grad_vs_inference(lambda: unet(x, t, ctx), unet)


def test_unet_under_autocast_is_bitwise_the_grad_path():
    unet, cn = _unet_and_controlnet()
    x, t, ctx, hint = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _grad_vs_inference(lambda: _guided(unet, cn, x, t, ctx, hint), unet, cn)


def test_unet_and_controlnet_leave_the_callers_tensors_alone():
    unet, cn = _unet_and_controlnet()
    x, t, ctx, hint = _inputs()
    before = _snapshot(x, t, ctx, hint)
    with torch.inference_mode():
        control = cn(x, hint, t, ctx, scale=0.7)
        held = _snapshot(control)
        unet(x, t, ctx, control=control)
        unet(x, t, ctx)
    assert _unchanged(before, x, t, ctx, hint)
    assert _unchanged(held, control)  # the residuals are added into the U-Net's skips, not the other way


def test_no_module_overwrites_the_tensors_it_is_given():
    """Every submodule (U-Net, ControlNet, VAE, CLIP) leaves its tensor arguments as they were (the
    SiLUs after norms run inside NormSiLUSequential, on the norm's fresh output)."""
    unet, cn = _unet_and_controlnet()
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval()
    clip = randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=6).eval()
    x, t, ctx, hint = _inputs()
    changed, given = [], {}

    def pre(module, args, kwargs):
        given[id(module)] = [(a, a.clone()) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]

    def post(module, args, kwargs, out):
        if any(not torch.equal(a, copy) for a, copy in given.pop(id(module))):
            changed.append(type(module).__name__)

    modules = [m for model in (unet, cn, vae, clip) for m in model.modules()]
    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                            m.register_forward_hook(post, with_kwargs=True))]
    try:
        with torch.inference_mode():
            _guided(unet, cn, x, t, ctx, hint)
            vae.decode(vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).mean)
            clip(torch.randint(0, 49408, (2, 77)))
    finally:
        for h in handles:
            h.remove()
    assert not changed


def test_vae_encode_decode_are_bitwise_the_grad_path_and_leave_inputs_alone():
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval()
    g = torch.Generator().manual_seed(5)
    img, z = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 4, 4, generator=g)
    before = _snapshot(img, z)
    _grad_vs_inference(lambda: (vae.encode(img).mean, vae.encode(img).std, vae.decode(z)), vae)
    assert _unchanged(before, img, z)


def test_clip_is_bitwise_the_grad_path_and_leaves_ids_alone():
    clip = randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=6).eval()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(7))
    before = _snapshot(ids)
    _grad_vs_inference(lambda: (clip(ids), clip(ids, skip=1)), clip)
    assert _unchanged(before, ids)


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and still alive; the storages
    of `known` tensors (weights, inputs) are not counted, even when a view of them comes out."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}

    def __enter__(self):
        self.live, self.peak, self.seen = 0, 0, set(self.known)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (st := t.untyped_storage()).data_ptr() not in self.seen:
                key, n = st.data_ptr(), st.nbytes()
                self.seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def _peak(fn, model, inputs, grad):
    with torch.set_grad_enabled(grad), _PeakBytes([*model.parameters(), *model.buffers(), *inputs]) as m:
        fn()
    return m.peak


@pytest.mark.parametrize("what", ["unet", "vae decode", "vae encode"])
def test_inference_peak_is_lower_than_the_out_of_place_path(what):
    # The out-of-place path is the same forward with grad mode on but nothing requiring grad (no graph kept).
    unet, cn = _unet_and_controlnet()
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval()
    x, t, ctx, hint = _inputs()
    z, img = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        control = cn(x, hint, t, ctx)
    model, inputs, fn = {
        "unet": (unet, [x, t, ctx, *control], lambda: unet(x, t, ctx, control=control)),
        "vae decode": (vae, [z], lambda: vae.decode(z)),
        "vae encode": (vae, [img], lambda: vae.encode(img).mean),
    }[what]
    model.requires_grad_(False)
    assert _peak(fn, model, inputs, grad=False) <= 0.9 * _peak(fn, model, inputs, grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((2, 64, 33, 35), 32), ((1, 96, 40, 24), 8), ((3, 48, 16, 16), 16)])
def test_groupnorm32_chunked_equals_one_shot(monkeypatch, dtype, shape, groups):
    gn = randomize_(GroupNorm32(groups, shape[1], eps=1e-6), seed=8).to(dtype)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    calls = []
    group_norm = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm", lambda *a, **k: calls.append(1) or group_norm(*a, **k))
    with torch.no_grad():
        ref = gn(x)
        assert len(calls) == 1  # small tensor: one shot
        for chunk in (1, 5000, x.numel() // 3):
            monkeypatch.setattr(GroupNorm32, "chunk_numel", chunk)
            calls.clear()
            y = gn(x)
            assert len(calls) > 1 and y.dtype == dtype and torch.equal(y, ref), chunk
    calls.clear()
    with torch.enable_grad():
        assert torch.equal(gn(x), ref) and len(calls) == 1  # training keeps the one-shot op
    gn32 = gn.float()
    with torch.no_grad():
        calls.clear()
        gn32(x.float())
        assert len(calls) == 1  # fp32 is never chunked


def test_bf16_vae_decode_with_chunked_groupnorm_is_unchanged(monkeypatch):
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4).eval().to(torch.bfloat16)
    z = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    with torch.inference_mode():
        ref = vae.decode(z)
        monkeypatch.setattr(GroupNorm32, "chunk_numel", 4096)
        assert torch.equal(vae.decode(z), ref)
