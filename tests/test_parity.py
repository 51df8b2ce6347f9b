"""Our networks against diffusers / transformers with identical random weights moved across by our
own converters (ldm.checkpoint / ldm.diffusers_keys), fp32 on CPU, relative error <= 1e-5."""
import pytest
import torch

from controlnet import ControlNet, ControlNetConfig
from controlnet.checkpoint import controlnet_config_to_diffusers, controlnet_to_diffusers
from helpers import randomize_, rel_err
from ldm import AutoencoderConfig, AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNetConfig, UNetModel
from ldm import checkpoint
from ldm import diffusers_keys as dk

TOL = 1e-5


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _ref_unet(ours):
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(**_clean(dk.unet_config_to_diffusers(ours.cfg)))
    ref.load_state_dict(checkpoint.native_to_diffusers("unet", ours.cfg, ours.state_dict()), strict=True)
    return ref.eval()


def _ref_vae(ours):
    from diffusers import AutoencoderKL as DVAE

    ref = DVAE(**_clean(dk.vae_config_to_diffusers(ours.cfg)))
    ref.load_state_dict(checkpoint.native_to_diffusers("vae", ours.cfg, ours.state_dict()), strict=True)
    return ref.eval()


def _ref_clip(ours):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFCLIP

    ref = HFCLIP(HFConfig(**_clean(dk.clip_config_to_transformers(ours.cfg))))
    sd = checkpoint.native_to_diffusers("text_encoder", ours.cfg, ours.state_dict())
    if not hasattr(ref, "text_model"):  # transformers >= 5 dropped the text_model wrapper
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    ref.load_state_dict(sd, strict=False)
    return ref.eval()


def _check_unet(cfg, size, seed=0):
    ours = randomize_(UNetModel(cfg), seed=seed).eval()
    ref = _ref_unet(ours)
    g = torch.Generator().manual_seed(seed)
    for t in (torch.tensor([0, 999]), torch.tensor([500.0, 37.5]), 951):
        x = torch.randn(2, 4, size, size, generator=g)
        ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
        with torch.no_grad():
            assert rel_err(ours(x, t, ctx), ref(x, t, ctx).sample) <= TOL


def _check_vae(cfg, size, seed=0):
    ours = randomize_(AutoencoderKL(cfg), seed=seed).eval()
    ref = _ref_vae(ours)
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(1, 4, size // 8, size // 8, generator=g)
    with torch.no_grad():
        a, b = ours.encode(img), ref.encode(img).latent_dist
        assert rel_err(a.mean, b.mean) <= TOL and rel_err(a.logvar, b.logvar) <= TOL
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= TOL


def _check_clip(cfg, seed=0):
    ours = randomize_(CLIPTextModel(cfg), seed=seed).eval()
    ref = _ref_clip(ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 77), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        final_norm = ref.final_layer_norm if not hasattr(ref, "text_model") else ref.text_model.final_layer_norm
        assert rel_err(ours(ids), out.last_hidden_state) <= TOL
        assert rel_err(ours(ids, skip=1, final_norm=False), out.hidden_states[-2]) <= TOL
        assert rel_err(ours(ids, skip=1), final_norm(out.hidden_states[-2])) <= TOL


def test_unet_tiny():
    _check_unet(UNetConfig.tiny(), 16)


def test_unet_tiny_sd2_style_projection():
    _check_unet(UNetConfig.tiny().replace(use_linear_projection=True, transformer_depth=2), 8, seed=3)


def test_vae_tiny():
    _check_vae(AutoencoderConfig.tiny(), 64)


def test_clip_tiny():
    _check_clip(CLIPTextConfig.tiny())


@pytest.mark.parametrize("hint_channels", [20, 3])
def test_controlnet_tiny(hint_channels):
    from diffusers import ControlNetModel

    cfg = ControlNetConfig.tiny(hint_channels)
    ours = randomize_(ControlNet(cfg), seed=4).eval()
    ref = ControlNetModel(**_clean(controlnet_config_to_diffusers(cfg)))
    ref.load_state_dict(controlnet_to_diffusers(ours.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    hint, t = torch.rand(2, hint_channels, 128, 128, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        a = ours(x, hint, t, ctx, scale=0.7)
        down, mid = ref.eval()(x, t, ctx, controlnet_cond=hint, conditioning_scale=0.7, return_dict=False)
    assert max(rel_err(p, q) for p, q in zip(a, [*down, mid])) <= TOL
    unet = randomize_(UNetModel(cfg.unet), seed=5).eval()
    with torch.no_grad():  # the U-Net with residuals against diffusers' additional-residual inputs
        r = _ref_unet(unet)(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert rel_err(unet(x, t, ctx, control=a), r) <= TOL


@pytest.mark.slow
def test_unet_full_size():
    _check_unet(UNetConfig(), 8)


@pytest.mark.slow
def test_vae_full_size():
    _check_vae(AutoencoderConfig(), 32)


@pytest.mark.slow
def test_clip_full_size():
    _check_clip(CLIPTextConfig())
