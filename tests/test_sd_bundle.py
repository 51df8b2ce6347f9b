"""The StableDiffusion bundle: one-call loading from every layout, prompt/image encoding."""
import pytest
import torch

from helpers import randomize_
from ldm import checkpoint
from ldm.sd import StableDiffusion


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sd = StableDiffusion.random("tiny", seed=0)
    for i, m in enumerate((sd.unet, sd.vae, sd.text_encoder)):
        randomize_(m, seed=i)
    d = tmp_path_factory.mktemp("sd")
    parts = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}
    checkpoint.save_native(d / "native.safetensors", parts)
    checkpoint.save_compvis(d / "compvis.ckpt", parts)
    checkpoint.save_diffusers(d / "diffusers", parts)
    return sd, d


@pytest.mark.parametrize("name", ["native.safetensors", "compvis.ckpt", "diffusers"])
def test_loads_every_layout_identically(saved, name):
    sd, d = saved
    loaded = StableDiffusion.from_checkpoint(d / name)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(sd, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.unet.cfg == sd.unet.cfg and loaded.vae.cfg == sd.vae.cfg


def test_loads_into_requested_dtype(saved):
    _, d = saved
    half = StableDiffusion.from_checkpoint(d / "native.safetensors", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vae_dtype == torch.bfloat16
    assert all(p.device.type == "cpu" for p in half.parameters())


def test_encode_prompt_and_images(saved):
    sd, _ = saved
    ctx = sd.encode_prompt(["road car", ""])
    assert ctx.shape == (2, 77, sd.text_encoder.cfg.width)
    assert torch.equal(sd.encode_prompt(""), ctx[1:])  # the empty prompt is the CFG unconditional context
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    z = sd.encode_image(img, torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    mean = sd.encode_image(img, sample=False)
    post = sd.vae.encode(img)
    assert torch.allclose(mean, post.mean * 0.18215)
    out = sd.decode_latents(z)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        sd.encode_image(torch.rand(1, 3, 60, 64))


def test_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises((checkpoint.CheckpointError, FileNotFoundError), match="nowhere"):
        StableDiffusion.from_checkpoint(tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError):
        StableDiffusion.random("huge")


def test_diffusers_export_opens_as_a_diffusers_pipeline(saved):
    from diffusers import StableDiffusionPipeline

    sd, d = saved
    pipe = StableDiffusionPipeline.from_pretrained(d / "diffusers", safety_checker=None, local_files_only=True)
    ids = pipe.tokenizer(["road car"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert torch.equal(ids, sd.tokenizer(["road car"]))
    with torch.no_grad():
        ref = pipe.text_encoder(ids).last_hidden_state
    assert torch.allclose(ref, sd.encode_prompt("road car"), atol=1e-5)
