"""A guided, ControlNet-controlled DDIM run against diffusers' StableDiffusionControlNetPipeline:
same tiny random weights (moved across by our converters), same prompt, label and initial latents."""
import pytest
import torch

from controlnet import ControlNet, ControlNetConfig
from controlnet.checkpoint import controlnet_config_to_diffusers, controlnet_to_diffusers
from helpers import randomize_, rel_err
from ldm.sd import StableDiffusion
from mrlf.pipeline import Pipeline, SamplingSettings
from segmentation.synthetic import street_scene
from test_parity import _clean, _ref_clip, _ref_unet, _ref_vae


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from transformers import CLIPTokenizer

    sd = StableDiffusion.random("tiny", seed=0)
    for i, m in enumerate((sd.unet, sd.vae, sd.text_encoder)):
        randomize_(m, seed=10 + i)
    cn = randomize_(ControlNet(ControlNetConfig.tiny(20)), seed=3).eval()
    tok_dir = tmp_path_factory.mktemp("tok")
    sd.tokenizer.save_hf_files(str(tok_dir))
    ref_cn = ControlNetModel(**_clean(controlnet_config_to_diffusers(cn.control_cfg)))
    ref_cn.load_state_dict(controlnet_to_diffusers(cn.state_dict(), cn.control_cfg), strict=True)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionControlNetPipeline(
        vae=_ref_vae(sd.vae), text_encoder=_ref_clip(sd.text_encoder), tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=_ref_unet(sd.unet), controlnet=ref_cn.eval(), scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline(sd, cn), pipe


@pytest.mark.parametrize("guidance,control_scale,negative,window", [(7.5, 1.0, "", (0.0, 1.0)),
                                                                    (3.0, 0.6, "blurry, night", (0.0, 1.0)),
                                                                    (7.5, 1.0, "", (0.2, 0.7))])
def test_controlled_sampling_matches_diffusers(pair, guidance, control_scale, negative, window):
    gen, pipe = pair
    label = street_scene(64, 64, 5)
    prompt = "road sidewalk building sky car"
    hint = gen.hint_from_labels(label, 64, 64)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = SamplingSettings(steps=6, guidance_scale=guidance, control_scale=control_scale,
                                control_start=window[0], control_end=window[1])
    ours = gen.sample(latents, gen.contexts([prompt], negative), hint, settings)
    with torch.no_grad():
        ref = pipe(prompt, image=hint, num_inference_steps=6, guidance_scale=guidance, negative_prompt=negative or None,
                   controlnet_conditioning_scale=control_scale, latents=latents.clone(), output_type="latent",
                   eta=0.0, control_guidance_start=window[0], control_guidance_end=window[1]).images
    assert rel_err(ours, ref) <= 1e-5
    with torch.no_grad():
        ref_img = pipe.vae.decode(ref / 0.18215).sample.clamp(-1, 1)
    assert rel_err(gen.sd.decode_latents(ours), ref_img) <= 1e-5
