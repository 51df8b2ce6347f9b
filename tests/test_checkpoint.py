"""ldm.checkpoint / ldm.diffusers_keys: formats, conversions, strict loading, saving, CLI.

diffusers and transformers are used only as reference oracles here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import checkpoint as ck
from ldm import diffusers_keys as dk
from ldm import formats, weights
from ldm.checkpoint import CheckpointError
from ldm.clip import CLIPTextModel
from ldm.config import SD15_CLIP, SD15_UNET, SD15_VAE, AutoencoderConfig, CLIPTextConfig, UNetConfig
from ldm.unet import EncoderHalf, UNetModel
from ldm.vae import AutoencoderKL
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

SD2_UNET = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_projection=True)  # heads of 64
SDXL_LIKE_UNET = UNetConfig(channels=(320, 640, 1280), attention_levels=(False, True, True), num_heads=(5, 10, 20),
                            context_dim=2048, use_linear_projection=True, transformer_depth=2)


def tiny_models(seed: int = 0) -> dict:
    return {
        "unet": randomize_(UNetModel(UNetConfig.tiny()), seed=seed + 1).eval(),
        "vae": randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=seed + 2).eval(),
        "text_encoder": randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=seed + 3).eval(),
    }


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.fixture(scope="module")
def compvis_file(tiny, tmp_path_factory):
    return ck.save_compvis(tmp_path_factory.mktemp("cv") / "tiny.safetensors", tiny)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert a.cfg == b.cfg
    for k, v in sa.items():
        want = v.to(dtype) if dtype is not None else v
        assert sb[k].dtype == want.dtype, k
        assert torch.equal(sb[k].cpu(), want), k


def meta_shapes(state_dict) -> dict:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def zeros_like_shapes(shapes: dict, prefix: str = "") -> dict:
    """Full-size stand-ins without memory: one zero element expanded to each shape."""
    base = torch.zeros(1, dtype=torch.float16)
    return {prefix + k: base.expand(s) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------
# Rule tables and configs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), SD15_UNET, SD2_UNET], ids=["tiny", "sd15", "sd2"])
def test_unet_rules_give_exactly_the_diffusers_keys_and_shapes(cfg):
    with torch.device("meta"):
        theirs = meta_shapes(diffusers.UNet2DConditionModel.from_config(dk.unet_config_to_diffusers(cfg)).state_dict())
        ours = ck.build_model("unet", cfg).state_dict()
    mapped = meta_shapes(ck.native_to_diffusers("unet", cfg, ours))
    assert mapped == theirs


@pytest.mark.parametrize("cfg", [AutoencoderConfig.tiny(), SD15_VAE], ids=["tiny", "sd15"])
def test_vae_rules_give_exactly_the_diffusers_keys_and_shapes(cfg):
    with torch.device("meta"):
        theirs = meta_shapes(diffusers.AutoencoderKL.from_config(dk.vae_config_to_diffusers(cfg)).state_dict())
        ours = ck.build_model("vae", cfg).state_dict()
    mapped = meta_shapes(ck.native_to_diffusers("vae", cfg, ours))
    assert mapped == theirs
    assert mapped["encoder.mid_block.attentions.0.to_q.weight"] == (cfg.channels[-1],) * 2  # linear, not 1x1 conv


@pytest.mark.parametrize("cfg", [CLIPTextConfig.tiny(), SD15_CLIP], ids=["tiny", "sd15"])
def test_text_encoder_names_are_transformers_names(cfg):
    hf_cfg = transformers.CLIPTextConfig(**dk.clip_config_to_transformers(cfg))
    with torch.device("meta"):
        theirs = meta_shapes(transformers.CLIPTextModel(hf_cfg).state_dict())
        ours = meta_shapes(ck.build_model("text_encoder", cfg).state_dict())
    # transformers 5 drops the `text_model.` level in memory and adds it back when saving.
    theirs = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in theirs.items()}
    assert ours == theirs


def test_encoder_half_rules_cover_the_encoder_half_alone():
    """The ControlNet converter reuses UNET_ENCODER_RULES on an EncoderHalf."""
    cfg = UNetConfig.tiny()
    with torch.device("meta"):
        keys = list(EncoderHalf(cfg).state_dict())
    km = dk.key_map(dk.UNET_ENCODER_RULES, dk.unet_encoder_slots(cfg), keys)
    assert set(km) == set(keys)
    assert km["input_blocks.3.0.op.weight"].key == "down_blocks.0.downsamplers.0.conv.weight"
    assert km["middle_block.1.proj_in.weight"].key == "mid_block.attentions.0.proj_in.weight"
    with pytest.raises(KeyError, match="output_blocks"):  # the decoder needs UNET_DECODER_RULES
        dk.key_map(dk.UNET_ENCODER_RULES, dk.unet_slots(cfg), ["output_blocks.0.0.in_layers.0.weight"])


def test_key_map_rejects_gaps_and_collisions():
    with pytest.raises(KeyError, match="no conversion rule"):
        dk.key_map([dk.Rule("a", "x")], {}, ["a.weight", "b.weight"])
    with pytest.raises(KeyError, match="one-to-one"):
        dk.key_map([dk.Rule("a", "x"), dk.Rule("b", "x")], {}, ["a.weight", "b.weight"])


# The published stable-diffusion-v1-5 unet/config.json and stable-diffusion-2-1 unet/config.json.
SD15_DIFFUSERS_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_DIFFUSERS_UNET = {
    **SD15_DIFFUSERS_UNET, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
    "sample_size": 96, "upcast_attention": True, "use_linear_projection": True,
}


def test_unet_config_from_diffusers_handles_the_head_quirk():
    assert dk.unet_config_from_diffusers(SD15_DIFFUSERS_UNET) == SD15_UNET
    assert dk.unet_config_from_diffusers(SD21_DIFFUSERS_UNET) == SD2_UNET
    # `num_attention_heads`, when given, wins over `attention_head_dim` (which then means head size).
    d = {**SD15_DIFFUSERS_UNET, "attention_head_dim": 64, "num_attention_heads": [5, 10, 20, 20]}
    assert dk.unet_config_from_diffusers(d).num_heads == (5, 10, 20, 20)
    # all-equal per-level lists are one value
    d = {**SD15_DIFFUSERS_UNET, "layers_per_block": [2, 2, 2, 2], "transformer_layers_per_block": [1, 1, 1, 1]}
    assert dk.unet_config_from_diffusers(d) == SD15_UNET
    for cfg in (UNetConfig.tiny(), SD15_UNET, SD2_UNET):
        assert dk.unet_config_from_diffusers(dk.unet_config_to_diffusers(cfg)) == cfg


@pytest.mark.parametrize("change, field", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"transformer_layers_per_block": [1, 2, 10]}, "transformer_layers_per_block"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"cross_attention_dim": [768, 1024, 768, 768]}, "cross_attention_dim"),
    ({"some_future_field": 3}, "some_future_field"),
    ({"up_block_types": ["CrossAttnUpBlock2D"] * 4}, "up_block_types"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types"),
])
def test_unet_config_rejects_unimplemented_features(change, field):
    with pytest.raises(ValueError, match=field):
        dk.unet_config_from_diffusers({**SD15_DIFFUSERS_UNET, **change})


def test_vae_and_clip_configs_round_trip_and_reject():
    for cfg in (AutoencoderConfig.tiny(), SD15_VAE):
        assert dk.vae_config_from_diffusers(dk.vae_config_to_diffusers(cfg)) == cfg
    for cfg in (CLIPTextConfig.tiny(), SD15_CLIP, SD15_CLIP.replace(act="gelu")):
        assert dk.clip_config_from_transformers(dk.clip_config_to_transformers(cfg)) == cfg
        hf = transformers.CLIPTextConfig(**dk.clip_config_to_transformers(cfg))
        assert dk.clip_config_from_transformers(hf.to_dict()) == cfg  # transformers' own serialisation
    sdxl_vae = {**dk.vae_config_to_diffusers(SD15_VAE), "scaling_factor": 0.13025}
    assert dk.vae_config_from_diffusers(sdxl_vae).scaling_factor == 0.13025
    with pytest.raises(ValueError, match="shift_factor"):
        dk.vae_config_from_diffusers({**dk.vae_config_to_diffusers(SD15_VAE), "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="hidden_act"):
        dk.clip_config_from_transformers({**dk.clip_config_to_transformers(SD15_CLIP), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        dk.clip_config_from_transformers({**dk.clip_config_to_transformers(SD15_CLIP),
                                          "architectures": ["CLIPTextModelWithProjection"]})


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

def test_native_round_trip_with_config_in_metadata(tiny, tmp_path):
    for name, m in tiny.items():
        path = ck.save_native(tmp_path / f"{name}.safetensors", m)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ldm.component"] == name and meta["ldm.format_version"] == ck.FORMAT_VERSION
        assert type(m.cfg).from_dict(json.loads(meta["ldm.config"])) == m.cfg
        (loaded,) = ck.load_components(path).values()  # sizes come from the metadata, not a preset
        assert_same(m, loaded)
    path = ck.save_native(tmp_path / "pipe.safetensors", tiny)
    loaded = ck.load_components(path)
    assert list(loaded) == ["unet", "vae", "text_encoder"]
    for name in tiny:
        assert_same(tiny[name], loaded[name])
    assert_same(tiny["vae"], ck.load_vae(path))


def test_native_diffusers_native_is_identity(tiny, tmp_path):
    for name, m in tiny.items():  # in memory
        sd = m.state_dict()
        back = ck.diffusers_to_native(name, m.cfg, ck.native_to_diffusers(name, m.cfg, sd))
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    folder = ck.save_diffusers(tmp_path / "pipe", tiny)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "CLIPTextModel"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    loaded = ck.load_components(folder)
    for name in tiny:
        assert_same(tiny[name], loaded[name])
    assert_same(tiny["unet"], ck.load_unet(folder))  # a pipeline folder
    assert_same(tiny["vae"], ck.load_vae(folder / "vae"))  # a component folder


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_native_compvis_native_is_identity(tiny, tmp_path, suffix):
    path = ck.save_compvis(tmp_path / f"model{suffix}", tiny)
    raw, _ = ck.read_state_dict(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in raw
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in raw
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in raw
    assert raw["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert torch.allclose(raw["alphas_cumprod"][[0, -1]], torch.tensor([0.99915, 0.0047]), atol=1e-4)
    loaded = ck.load_components(path)
    for name in tiny:
        assert_same(tiny[name], loaded[name])
    assert ck.read_checkpoint(path).format == "compvis"


def test_compvis_file_and_diffusers_written_folder_load_identical(tiny, compvis_file, tmp_path):
    """A folder written by diffusers/transformers themselves (from diffusers' own CompVis
    conversion) and the CompVis file give the same tensors."""
    raw, _ = ck.read_state_dict(compvis_file)
    folder = tmp_path / "pipe"
    ucfg = dk.unet_config_to_diffusers(tiny["unet"].cfg)
    unet = diffusers.UNet2DConditionModel.from_config(ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(raw, ucfg))
    unet.save_pretrained(folder / "unet")
    vcfg = dk.vae_config_to_diffusers(tiny["vae"].cfg)
    vae = diffusers.AutoencoderKL.from_config(vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(raw, vcfg))
    vae.save_pretrained(folder / "vae")
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dk.clip_config_to_transformers(tiny["text_encoder"].cfg)))
    te.load_state_dict({k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(raw).items()})
    te.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", **{n: list(c) for n, c in dk.PIPELINE_CLASSES.items()},
         "tokenizer": ["transformers", "CLIPTokenizer"]}))
    a, b = ck.load_components(compvis_file), ck.load_components(folder)
    assert ck.read_checkpoint(folder).ignored == ["tokenizer"]
    for name in tiny:
        assert_same(a[name], b[name])
        assert_same(tiny[name], b[name])


def _compare_with_oracle(ours: dict, theirs: dict, real: bool):
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        if real:
            assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_converter_agrees_with_diffusers_convert_ldm(size):
    if size == "tiny":
        models = tiny_models(seed=10)
    else:  # full size on the meta device: names and shapes only
        models = {n: ck.build_model(n) for n in ck.COMPONENTS}
    raw = ck.compvis_state_dict(models)
    real = size == "tiny"
    u, v = models["unet"].cfg, models["vae"].cfg
    _compare_with_oracle(ck.native_to_diffusers("unet", u, models["unet"].state_dict()),
                         sfu.convert_ldm_unet_checkpoint(raw, dk.unet_config_to_diffusers(u)), real)
    _compare_with_oracle(ck.native_to_diffusers("vae", v, models["vae"].state_dict()),
                         sfu.convert_ldm_vae_checkpoint(raw, dk.vae_config_to_diffusers(v)), real)
    _compare_with_oracle(models["text_encoder"].state_dict(), sfu.convert_ldm_clip_checkpoint(raw), real)


@torch.no_grad()
def test_diffusers_export_runs_in_diffusers_and_transformers(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    unet, vae, te = tiny["unet"], tiny["vae"], tiny["text_encoder"]

    ck.save_diffusers(tmp_path / "unet", unet)
    d_unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 7, unet.cfg.context_dim, generator=g)
    t = torch.tensor([10, 800])
    assert rel_err(d_unet(x, t, encoder_hidden_states=ctx).sample, unet(x, t, ctx)) <= 1e-5

    ck.save_diffusers(tmp_path / "vae", vae)
    d_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert rel_err(d_vae.encode(img).latent_dist.mean, vae.encode(img).mean) <= 1e-5
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert rel_err(d_vae.decode(z).sample, vae.decode(z)) <= 1e-5

    ck.save_diffusers(tmp_path / "text_encoder", te)
    hf = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = torch.randint(0, te.cfg.vocab_size, (2, 77), generator=g)
    assert rel_err(hf(input_ids=ids).last_hidden_state, te(ids)) <= 1e-5


# ---------------------------------------------------------------------------------------
# Variants of the formats
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_weights", [False, True])
def test_old_diffusers_vae_attention_names(tiny, tmp_path, conv_weights):
    folder = ck.save_diffusers(tmp_path / "vae", tiny["vae"])
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    old = {}
    for k, v in sd.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
                v = v[:, :, None, None].contiguous() if conv_weights and v.ndim == 2 else v
        old[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, weights, metadata={"format": "pt"})
    assert_same(tiny["vae"], ck.load_vae(folder))


def _with_ema(models, offset=1.0):
    raw = ck.compvis_state_dict(models)
    for k, v in models["unet"].state_dict().items():
        raw[ck.compvis_ema_key(k)] = v + offset
    raw["model_ema.decay"] = torch.tensor(0.9999)
    raw["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return raw


def test_ema_selection(tiny, tmp_path):
    raw = _with_ema(tiny)
    assert "model_ema.diffusion_modelinput_blocks00weight" in raw  # the CompVis naming
    path = tmp_path / "ema.safetensors"
    save_file(raw, path)
    assert_same(tiny["unet"], ck.load_unet(path, config=UNetConfig.tiny()))
    ema = ck.load_unet(path, config=UNetConfig.tiny(), ema=True)
    for k, v in tiny["unet"].state_dict().items():
        assert torch.equal(ema.state_dict()[k], v + 1.0), k
    both = ck.load_components(path, ema=True, configs={n: m.cfg for n, m in tiny.items()})
    assert torch.equal(both["unet"].out[2].bias, tiny["unet"].out[2].bias + 1.0)
    assert_same(tiny["vae"], both["vae"])  # EMA applies to the U-Net only
    d = ck.describe(path)
    assert d["ema"]["present"] and "model_ema.decay" in d["tolerated"]

    del raw[ck.compvis_ema_key("out.2.bias")]
    save_file(raw, path)
    with pytest.raises(CheckpointError, match=r"1 missing key: out\.2\.bias"):
        ck.load_unet(path, config=UNetConfig.tiny(), ema=True)
    plain = ck.save_compvis(tmp_path / "plain.safetensors", tiny)
    with pytest.raises(CheckpointError, match="has no EMA weights") as e:
        ck.load_unet(plain, ema=True)
    assert str(plain) in str(e.value)


def test_fp16_files_and_dtype(tiny, tmp_path):
    path = ck.save_compvis(tmp_path / "half.safetensors", tiny, dtype=torch.float16)
    raw, _ = ck.read_state_dict(path)
    assert {v.dtype for v in raw.values()} == {torch.float16}
    as_fp32 = ck.load_components(path)  # default fp32
    kept = ck.load_components(path, dtype=None)
    for name, m in tiny.items():
        half = type(m)(m.cfg).half()
        half.load_state_dict(m.state_dict())
        assert_same(half, kept[name])
        assert_same(half, as_fp32[name], dtype=torch.float32)
    bf = ck.load_unet(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def test_fp16_variant_folders(tiny, tmp_path):
    folder = ck.save_diffusers(tmp_path / "pipe", tiny, dtype=torch.float16, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    loaded = ck.load_components(folder, dtype=None)  # the only weights there: the fp16 variant
    for name, m in tiny.items():
        assert_same(m, loaded[name], dtype=torch.float16)
    # With both files present the plain one is the default and the variant is chosen by name.
    formats.write_component_folder(folder / "unet", ck.UNET, tiny["unet"], None, None)
    assert ck.load_unet(folder, dtype=None).out[2].weight.dtype == torch.float32
    assert ck.load_unet(folder, dtype=None, variant="fp16").out[2].weight.dtype == torch.float16
    with pytest.raises(CheckpointError, match="bf16"):
        ck.load_unet(folder, variant="bf16")


def test_old_clip_names_and_position_ids(tiny, tmp_path):
    raw = ck.compvis_state_dict(tiny)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in raw.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight" in old
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in old
    assert "cond_stage_model.transformer.final_layer_norm.weight" in old
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old, "global_step": 470000}, path)
    te = ck.load_text_encoder(path, config=CLIPTextConfig.tiny())
    assert_same(tiny["text_encoder"], te)
    # a bare text encoder file in the old naming
    bare = {k.removeprefix("cond_stage_model.transformer."): v for k, v in old.items()
            if k.startswith("cond_stage_model.transformer.")}
    save_file(bare, tmp_path / "te.safetensors")
    assert_same(tiny["text_encoder"], ck.load_text_encoder(tmp_path / "te.safetensors", config=CLIPTextConfig.tiny()))


def test_sharded_diffusers_weights(tiny, tmp_path):
    folder = ck.save_diffusers(tmp_path / "unet", tiny["unet"])
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    os.remove(folder / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / fname)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(tiny["unet"], ck.load_unet(folder))


# ---------------------------------------------------------------------------------------
# Bad input: one clear error naming the file
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated_safetensors", "truncated_ckpt", "random_bytes", "empty",
                                    "pickled_object"])
def test_corrupt_files_raise_one_clear_error(tiny, tmp_path, damage):
    if damage.startswith("truncated"):
        suffix = ".safetensors" if "safetensors" in damage else ".ckpt"
        good = ck.save_compvis(tmp_path / f"good{suffix}", {"vae": tiny["vae"]})
        data = good.read_bytes()
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random_bytes":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
    elif damage == "empty":
        path = tmp_path / "bad.ckpt"
        path.write_bytes(b"")
    else:  # a pickle with a non-tensor object: weights_only refuses it
        path = tmp_path / "bad.ckpt"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/")}, path)
    for fn in (ck.load_vae, ck.describe, ck.load_components):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        assert str(path) in str(e.value)


def test_sniff_tells_safetensors_from_a_legacy_pickle_by_more_than_the_first_byte(tmp_path):
    """A safetensors header length whose low byte is 0x80 starts the file like a legacy torch pickle;
    the file is still read as safetensors, metadata included."""
    tensors = {"x": torch.arange(4.0)}
    for k in range(256):
        path = tmp_path / f"pad{k}.safetensors"
        save_file(tensors, str(path), metadata={"pad": "x" * k})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert weights.sniff(path) == "safetensors"
    sd, meta = weights.read_state_dict(path)
    assert meta == {"pad": "x" * k} and torch.equal(sd["x"], tensors["x"])
    legacy = tmp_path / "legacy.pt"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[0] == 0x80 and weights.sniff(legacy) == "torch"
    assert torch.equal(weights.read_state_dict(legacy)[0]["x"], tensors["x"])


def test_sd2_shaped_unet_fails_clearly(tmp_path):
    # tiny scale, real values: an SD-2-style U-Net (linear proj, other context width and heads)
    sd2_tiny = UNetConfig.tiny().replace(context_dim=64, use_linear_projection=True, num_heads=(1, 2, 2))
    path = ck.save_compvis(tmp_path / "sd2_tiny.ckpt", randomize_(UNetModel(sd2_tiny)))
    with pytest.raises(CheckpointError) as e:
        ck.load_unet(path, config=UNetConfig.tiny())
    msg = str(e.value)
    assert str(path) in msg and "mis-shaped" in msg and "proj_in.weight: file (32, 32) vs model (32, 32, 1, 1)" in msg
    assert "SD-2.x" in msg
    # full size: the key set of SD-2 with zero-cost tensors, in a CompVis file with an OpenCLIP encoder
    shapes = meta_shapes(ck.build_model("unet", SD2_UNET).state_dict())
    raw = zeros_like_shapes(shapes, "model.diffusion_model.")
    raw["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(1).expand(3072, 1024)
    path = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": raw}, path)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError) as e:
        ck.load_unet(path)  # no config in the file: the SD-1.5 preset
    msg = str(e.value)
    assert str(path) in msg and "mis-shaped" in msg and "SD-2.x" in msg
    assert "attn2.to_k.weight: file (320, 1024) vs model (320, 768)" in msg
    assert "cond_stage_model.model." in msg  # the unknown text encoder is listed as unexpected
    assert "more)" in msg  # long lists are truncated with a count
    assert not ck.describe(path)["components"]["unet"]["fits"]


def test_sdxl_shaped_checkpoint_fails_clearly(tmp_path):
    shapes = meta_shapes(ck.build_model("unet", SDXL_LIKE_UNET).state_dict())
    raw = zeros_like_shapes(shapes, "model.diffusion_model.")
    raw["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(1).expand(1280, 2816)
    raw["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(768)
    raw.update(zeros_like_shapes(meta_shapes(ck.build_model("vae").state_dict()), "first_stage_model."))
    path = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": raw}, path)
    with pytest.raises(CheckpointError) as e:
        ck.load_components(path)
    msg = str(e.value)
    assert str(path) in msg and "SDXL" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg
    with pytest.raises(CheckpointError, match="conditioner.embedders"):  # the VAE alone is no excuse
        ck.load_vae(path)


def test_missing_and_unexpected_keys(tiny, tmp_path):
    raw = ck.compvis_state_dict({"unet": tiny["unet"]})
    del raw["model.diffusion_model.out.2.weight"]
    raw["model.diffusion_model.out.3.weight"] = torch.zeros(3)
    raw["some_random_key"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(raw, path)
    with pytest.raises(CheckpointError) as e:
        ck.load_unet(path, config=UNetConfig.tiny())
    msg = str(e.value)
    assert str(path) in msg
    assert "1 missing key: out.2.weight" in msg
    assert "2 unexpected keys:" in msg and "out.3.weight" in msg and "some_random_key" in msg
    with pytest.raises(CheckpointError) as e:  # allowed extras are tolerated; the missing key still fails
        ck.load_unet(path, config=UNetConfig.tiny(), allow_unexpected=["out.3.*", "some_*"])
    assert "unexpected key" not in str(e.value) and "1 missing key" in str(e.value)
    many = ck.compvis_state_dict({"unet": tiny["unet"]})
    for k in list(many)[:20]:
        del many[k]
    save_file(many, path)
    with pytest.raises(CheckpointError, match=r"20 missing keys: .*\(12 more\)"):
        ck.load_unet(path, config=UNetConfig.tiny())
    with pytest.raises(CheckpointError, match="holds no vae"):
        ck.load_vae(path)


def test_load_into_reports_and_copies(tiny):
    m = UNetModel(UNetConfig.tiny())
    sd = dict(tiny["unet"].state_dict())
    sd["out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"(?s)my-source: .*out\.2\.bias: file \(5,\) vs model \(4,\)"):
        ck.load_into(m, sd, source="my-source")
    before = m.out[2].bias
    ck.load_into(m, tiny["unet"].state_dict())  # a materialised module is copied into, not re-assigned
    assert m.out[2].bias is before
    assert_same(tiny["unet"], m)


# ---------------------------------------------------------------------------------------
# Meta-device loading
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_device_loading(tiny, compvis_file, dtype):
    models = ck.load_components(compvis_file, dtype=dtype)
    for name, m in models.items():
        tensors = list(m.parameters()) + list(m.buffers())
        assert not any(t.is_meta for t in tensors), name
        assert {t.dtype for t in tensors} == {dtype}, name
        assert all(t.device.type == "cpu" for t in tensors)
        assert all(p.requires_grad for p in m.parameters())
        assert_same(tiny[name], m, dtype=dtype)
    assert all(t.is_meta for t in ck.build_model("unet").parameters())


def test_meta_loading_assigns_without_copying(tiny):
    sd = tiny["unet"].state_dict()
    m = ck.load_into(ck.build_model("unet", UNetConfig.tiny()), sd, dtype=None)
    assert all(v.data_ptr() == sd[k].data_ptr() for k, v in m.state_dict().items())  # same memory: no second copy
    half = ck.load_into(ck.build_model("unet", UNetConfig.tiny()), sd, dtype=torch.float16)
    assert all(v.data_ptr() != sd[k].data_ptr() for k, v in half.state_dict().items())


def test_meta_build_skips_initialisation():
    # Initialising meta tensors would import torch._dynamo (seconds per process); a CPU build still initialises.
    code = ("import sys; from ldm import checkpoint as ck\n"
            "m = ck.build_model('text_encoder'); assert next(m.parameters()).is_meta\n"
            "assert 'torch._dynamo' not in sys.modules, 'meta build imported torch._dynamo'\n"
            "import torch; from ldm.config import CLIPTextConfig\n"
            "c = ck.build_model('text_encoder', CLIPTextConfig.tiny(), device='cpu')\n"
            "assert c.text_model.embeddings.token_embedding.weight.std() > 0.5")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------
# Detection, inspection, CLI, atomic writes, local HF cache
# ---------------------------------------------------------------------------------------

def test_format_and_component_detection(tiny, compvis_file, tmp_path):
    c = ck.read_checkpoint(compvis_file)
    assert (c.format, list(c.parts)) == ("compvis", ["unet", "vae", "text_encoder"])
    assert set(c.tolerated) == set(ck.COMPVIS_SCHEDULE)
    bare_vae = tmp_path / "vae.safetensors"
    save_file(dict(tiny["vae"].state_dict()), bare_vae)  # like vae-ft-mse-840000: no prefix, no config
    c = ck.read_checkpoint(bare_vae)
    assert (c.format, list(c.parts), c.parts["vae"].config) == ("native", ["vae"], None)
    assert_same(tiny["vae"], ck.load_vae(bare_vae, config=AutoencoderConfig.tiny()))
    folder = ck.save_diffusers(tmp_path / "pipe", tiny)
    c = ck.read_checkpoint(folder)
    assert c.format == "diffusers" and c.parts["unet"].layout == "diffusers"
    assert c.parts["unet"].config == tiny["unet"].cfg
    c = ck.read_checkpoint(folder / "text_encoder")
    assert list(c.parts) == ["text_encoder"]
    bare_diffusers_unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    c = ck.read_checkpoint(bare_diffusers_unet)  # a diffusers weights file on its own
    assert (c.format, c.parts["unet"].layout) == ("diffusers", "diffusers")
    assert_same(tiny["unet"], ck.load_unet(bare_diffusers_unet, config=UNetConfig.tiny()))
    single = tmp_path / "one"
    single.mkdir()
    ck.save_native(single / "u.safetensors", tiny["unet"])
    assert_same(tiny["unet"], ck.load_unet(single))  # a folder holding exactly one weights file


def test_pipeline_folder_without_model_index(tiny, tmp_path, capsys):
    """Only unet/ vae/ text_encoder/ (each with config.json) and a stray weight-like file: the
    subfolders are the pipeline, the stray file is not "the" checkpoint."""
    folder = ck.save_diffusers(tmp_path / "pipe", tiny)
    (folder / "model_index.json").unlink()
    torch.save({"x": torch.zeros(3)}, folder / "notes.bin")
    c = ck.read_checkpoint(folder)
    assert (c.format, sorted(c.parts)) == ("diffusers", sorted(tiny))
    loaded = ck.load_components(folder)
    for name in tiny:
        assert_same(tiny[name], loaded[name])
    assert_same(tiny["vae"], ck.load_vae(folder))
    assert ck.main(["inspect", str(folder)]) == 0
    assert "notes.bin" not in capsys.readouterr().out
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet: no diffusers weights") as e:  # the broken part is named
        ck.load_unet(folder)
    assert "notes.bin" not in str(e.value)


def test_cli_inspect(compvis_file, tmp_path, capsys):
    assert ck.main(["inspect", str(compvis_file)]) == 0
    out = capsys.readouterr().out
    assert "format:  compvis" in out and "EMA:     none" in out
    n = sum(p.numel() for p in UNetModel(UNetConfig.tiny()).parameters())
    assert f"unet: {n:,} parameters" in out and "fits" in out and "float32" in out
    assert ck.main(["inspect", "--json", str(compvis_file)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert AutoencoderConfig.from_dict(d["components"]["vae"]["config"]) == AutoencoderConfig.tiny()
    assert d["components"]["unet"]["config_from"] == "checkpoint"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert ck.main(["inspect", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err


def test_cli_convert(tiny, tmp_path, capsys):
    ema_file = tmp_path / "ema.safetensors"
    save_file(_with_ema(tiny, offset=0.5), ema_file, metadata=formats.metadata(tiny, ck.KINDS, "compvis"))
    out = tmp_path / "diffusers"
    assert ck.main(["convert", str(ema_file), str(out), "--to", "diffusers", "--dtype", "fp16", "--ema"]) == 0
    loaded = ck.load_components(out, dtype=None)
    assert loaded["vae"].decoder.conv_out.weight.dtype == torch.float16
    assert_same(tiny["vae"], loaded["vae"], dtype=torch.float16)
    want = (tiny["unet"].out[0].weight + 0.5).half()
    assert torch.equal(loaded["unet"].out[0].weight, want)
    assert ck.main(["convert", str(out), str(tmp_path / "back.ckpt"), "--to", "compvis", "--dtype", "fp32"]) == 0
    back = ck.load_components(tmp_path / "back.ckpt", dtype=None)
    assert_same(loaded["text_encoder"], back["text_encoder"], dtype=torch.float32)
    assert ck.main(["convert", str(ema_file), str(tmp_path / "u.safetensors"), "--to", "native"]) == 0
    assert ck.read_checkpoint(tmp_path / "u.safetensors").format == "native"
    assert ck.main(["convert", str(ema_file), str(out), "--to", "diffusers"]) == 1  # exists
    assert "exists" in capsys.readouterr().err
    assert ck.main(["convert", str(ema_file), str(out), "--to", "diffusers", "--overwrite"]) == 0
    assert_same(tiny["unet"], ck.load_unet(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_atomic_writes_leave_nothing_behind_on_failure(tiny, tmp_path, monkeypatch):
    dst = ck.save_native(tmp_path / "u.safetensors", tiny["unet"])
    before = dst.read_bytes()

    def boom(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights, "write_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save_native(dst, tiny["unet"], overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save_diffusers(tmp_path / "d", tiny)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.safetensors"]


def test_resolve_path_local_hf_cache(tiny, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--sd"
    for rev in ("aaaa", "bbbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    ck.save_diffusers(repo / "snapshots" / "bbbb" / "pipe", tiny)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert ck.resolve_path("org/sd") == repo / "snapshots" / "bbbb"
    assert ck.resolve_path("org/sd", revision="aaaa") == repo / "snapshots" / "aaaa"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_same(tiny["vae"], ck.load_vae("org/sd/pipe"))
    with pytest.raises(CheckpointError, match="local Hugging Face cache") as e:
        ck.resolve_path("org/other")
    assert "models--org--other" in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        ck.load_unet(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------
# Full SD-1.5 size
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_round_trip(tmp_path):
    models = {}
    for i, name in enumerate(ck.COMPONENTS):
        m = ck.build_model(name).half().to_empty(device="cpu")
        models[name] = randomize_(m, seed=i).eval()
    assert sum(p.numel() for p in models["unet"].parameters()) == 859_520_964
    # CompVis file -> fp16 models
    path = ck.save_compvis(tmp_path / "sd15.safetensors", models)
    loaded = ck.load_components(path, dtype=torch.float16)
    for name, m in models.items():
        assert_same(m, loaded[name])
    del loaded
    # diffusers layout and back, against diffusers' own converter, in memory
    raw = ck.compvis_state_dict(models)
    for name, convert in (("unet", sfu.convert_ldm_unet_checkpoint), ("vae", sfu.convert_ldm_vae_checkpoint)):
        cfg = models[name].cfg
        theirs = ck.native_to_diffusers(name, cfg, models[name].state_dict())
        to_json = dk.unet_config_to_diffusers if name == "unet" else dk.vae_config_to_diffusers
        _compare_with_oracle(theirs, convert(raw, to_json(cfg)), real=True)
        back = ck.diffusers_to_native(name, cfg, theirs)
        assert all(torch.equal(back[k], v) for k, v in models[name].state_dict().items())
