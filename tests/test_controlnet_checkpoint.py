"""controlnet.checkpoint: lllyasviel / diffusers / native formats, conversions, strict loading, CLI.

diffusers is used only as the reference oracle (ControlNetModel, convert_controlnet_checkpoint).
"""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet import ControlNet, ControlNetConfig
from controlnet import checkpoint as cc
from ldm import checkpoint as lck
from ldm import formats, weights
from ldm.checkpoint import CheckpointError
from ldm.clip import CLIPTextModel
from ldm.config import AutoencoderConfig, CLIPTextConfig, UNetConfig
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

TINY = UNetConfig.tiny()

# yurujaja/DGInStyle, ControlNet_UNet-S/config.json as released (reference-dginstyle.md 2.3):
# no `conditioning_channels`, `attention_head_dim` 8 meaning 8 heads.
DGINSTYLE_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}


def tiny_controlnet(hint: int = 20, seed: int = 0) -> ControlNet:
    return randomize_(ControlNet(ControlNetConfig.tiny(hint)), seed=seed).eval()


@pytest.fixture(scope="module", params=[20, 3], ids=["hint20", "hint3"])
def tiny(request):
    return tiny_controlnet(request.param, seed=request.param)


@pytest.fixture(scope="module")
def tiny20():
    return tiny_controlnet(20, seed=7)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert a.control_cfg == b.control_cfg
    for k, v in sa.items():
        want = v.to(dtype) if dtype is not None else v
        assert sb[k].dtype == want.dtype, k
        assert torch.equal(sb[k].cpu(), want), k


def meta_shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def tiny_sd_pipeline(seed: int = 0) -> dict:
    """A CompVis single-file state dict of a tiny SD (U-Net, VAE, CLIP, schedule buffers)."""
    models = {"unet": randomize_(UNetModel(TINY), seed=seed + 1),
              "vae": randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=seed + 2),
              "text_encoder": randomize_(CLIPTextModel(CLIPTextConfig.tiny()), seed=seed + 3)}
    return lck.compvis_state_dict(models)


# ---------------------------------------------------------------------------------------
# Rule tables and configs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [ControlNetConfig.tiny(20), ControlNetConfig.tiny(3), ControlNetConfig(),
                                 ControlNetConfig(hint_channels=3)], ids=["tiny20", "tiny3", "sd15_20", "sd15_3"])
def test_rules_give_exactly_the_diffusers_keys_shapes_and_config(cfg):
    d = cc.controlnet_config_to_diffusers(cfg)
    assert d["conditioning_channels"] == cfg.hint_channels  # stock diffusers would default to 3
    with torch.device("meta"):
        theirs = meta_shapes(diffusers.ControlNetModel.from_config(d).state_dict())
        ours = cc.build_controlnet(cfg).state_dict()
    assert meta_shapes(cc.controlnet_to_diffusers(ours, cfg)) == theirs
    assert cc.controlnet_config_from_diffusers(d) == cfg
    if cfg == ControlNetConfig():
        assert len(theirs) == 340 and sum(v.numel() for v in ours.values()) == 361_281_568


def test_named_diffusers_keys():
    km = formats.diffusers_map(cc.CONTROLNET, ControlNetConfig())
    assert km["input_hint_block.0.weight"].key == "controlnet_cond_embedding.conv_in.weight"
    assert [km[f"input_hint_block.{n}.bias"].key for n in range(2, 14, 2)] == [
        f"controlnet_cond_embedding.blocks.{i}.bias" for i in range(6)]
    assert km["input_hint_block.14.weight"].key == "controlnet_cond_embedding.conv_out.weight"
    assert km["zero_convs.11.0.weight"].key == "controlnet_down_blocks.11.weight"
    assert km["middle_block_out.0.bias"].key == "controlnet_mid_block.bias"
    assert km["time_embed.2.weight"].key == "time_embedding.linear_2.weight"
    assert km["input_blocks.0.0.weight"].key == "conv_in.weight"
    assert km["input_blocks.11.0.out_layers.3.weight"].key == "down_blocks.3.resnets.1.conv2.weight"
    assert km["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].key == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def test_dginstyle_released_config_takes_hint_channels_from_the_weights():
    with torch.device("meta"):
        weights = diffusers.ControlNetModel.from_config({**DGINSTYLE_CONFIG, "conditioning_channels": 20}).state_dict()
    assert tuple(weights["controlnet_cond_embedding.conv_in.weight"].shape) == (16, 20, 3, 3)
    cfg = cc.controlnet_config_from_diffusers(DGINSTYLE_CONFIG, weights)
    assert cfg == ControlNetConfig()  # SD-1.5 encoder, 8 heads everywhere, 20 hint channels, (16, 32, 96, 256)
    assert cfg.unet.num_heads == (8, 8, 8, 8) and cfg.unet.head_dims == (40, 80, 160, 160)
    with pytest.raises(ValueError, match="conditioning_channels"):
        cc.controlnet_config_from_diffusers(DGINSTYLE_CONFIG)  # no weights to read it from
    # widths too come from the weights when the config leaves them out
    no_widths = {k: v for k, v in DGINSTYLE_CONFIG.items() if k != "conditioning_embedding_out_channels"}
    small = {"controlnet_cond_embedding.conv_in.weight": torch.empty(8, 3, 3, 3, device="meta"),
             **{f"controlnet_cond_embedding.blocks.{i}.weight": torch.empty(c, c, 3, 3, device="meta")
                for i, c in enumerate([8, 24, 24, 64])},
             "controlnet_cond_embedding.conv_out.weight": torch.empty(320, 64, 3, 3, device="meta")}
    cfg = cc.controlnet_config_from_diffusers(no_widths, small)
    assert (cfg.hint_channels, cfg.hint_block_channels) == (3, (8, 24, 64))


@pytest.mark.parametrize("cfg", [ControlNetConfig(), ControlNetConfig.tiny(3)], ids=["sd15", "tiny3"])
def test_infer_hint_config_on_every_layout(cfg):
    sd = cc.build_controlnet(cfg).state_dict()
    want = (cfg.hint_channels, cfg.hint_block_channels)
    assert cc.infer_hint_config(sd) == want
    assert cc.infer_hint_config(cc.controlnet_to_lllyasviel(sd)) == want
    assert cc.infer_hint_config(cc.controlnet_to_diffusers(sd, cfg)) == want
    assert cc.infer_hint_config({k: v for k, v in sd.items() if "hint" not in k}) is None


@pytest.mark.parametrize("change, match", [
    ({"controlnet_conditioning_channel_order": "bgr"}, "channel_order"),
    ({"global_pool_conditions": True}, "global_pool"),
    ({"_class_name": "UNet2DConditionModel"}, "ControlNetModel"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"some_new_field": 1}, "some_new_field"),
    ({"down_block_types": ["CrossAttnDownBlock2D", "SimpleDown"] * 2}, "down_block_types"),
])
def test_config_rejects_unimplemented_features(change, match):
    with pytest.raises(ValueError, match=match):
        cc.controlnet_config_from_diffusers({**DGINSTYLE_CONFIG, "conditioning_channels": 20, **change})


# ---------------------------------------------------------------------------------------
# Round trips and the diffusers oracle
# ---------------------------------------------------------------------------------------

def test_in_memory_conversions_are_inverse(tiny):
    cfg, sd = tiny.control_cfg, tiny.state_dict()
    theirs = cc.controlnet_to_diffusers(sd, cfg)
    assert theirs["controlnet_cond_embedding.conv_out.weight"] is sd["input_hint_block.14.weight"]  # renamed, not copied
    back = cc.controlnet_from_diffusers(theirs, cfg)
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="not part of a ControlNet"):
        cc.controlnet_to_diffusers({**sd, "zero_convs.99.0.weight": sd["zero_convs.0.0.weight"]}, cfg)


def test_native_diffusers_lllyasviel_round_trips_are_identity(tiny, tmp_path):
    cfg = tiny.control_cfg
    native = cc.save_controlnet(tmp_path / "cn.safetensors", tiny)
    meta = lck.read_state_dict(native)[1]
    assert meta["ldm.component"] == "controlnet" and json.loads(meta["ldm.config"])["hint_channels"] == cfg.hint_channels
    m1 = cc.load_controlnet(native)
    assert_same(tiny, m1)
    m2 = cc.load_controlnet(cc.save_controlnet(tmp_path / "diffusers", m1, layout="diffusers"))
    assert_same(tiny, m2)
    for name in ("cn.pth", "cn_ll.safetensors"):
        path = cc.save_controlnet(tmp_path / name, m2, layout="lllyasviel")
        keys = list(lck.read_state_dict(path)[0])
        assert keys and all(k.startswith("control_model.") for k in keys)
        m3 = cc.load_controlnet(path)
        assert_same(tiny, m3)
    m4 = cc.load_controlnet(cc.save_controlnet(tmp_path / "single_diffusers.safetensors", m3, layout="diffusers"))
    assert_same(tiny, m4)
    assert cc.read_controlnet_checkpoint(tmp_path / "single_diffusers.safetensors").format == "diffusers-file"
    assert cc.load_controlnet(cc.save_controlnet(tmp_path / "back.safetensors", m4)).state_dict().keys() == \
        tiny.state_dict().keys()


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_converter_agrees_with_diffusers_convert_controlnet_checkpoint(size):
    model = tiny_controlnet(20, seed=3) if size == "tiny" else cc.build_controlnet()  # sd15: meta, names + shapes
    cfg, sd = model.control_cfg, model.state_dict()
    ours = cc.controlnet_to_diffusers(sd, cfg)
    config = cc.controlnet_config_to_diffusers(cfg)
    for raw in ({**cc.controlnet_to_lllyasviel(sd), "model.diffusion_model.out.2.bias": torch.zeros(4)}, dict(sd)):
        theirs = sfu.convert_controlnet_checkpoint(raw, config)
        assert set(ours) == set(theirs)
        for k, v in theirs.items():
            assert ours[k].shape == v.shape, k
            if size == "tiny":
                assert torch.equal(ours[k], v), k


@torch.no_grad()
@pytest.mark.parametrize("hint", [20, 3])
def test_diffusers_export_runs_in_diffusers(hint, tmp_path):
    ours = tiny_controlnet(hint, seed=hint + 1)
    folder = cc.save_controlnet(tmp_path / "cn", ours, layout="diffusers")
    theirs = diffusers.ControlNetModel.from_pretrained(folder).eval()
    assert theirs.config.conditioning_channels == hint
    g = torch.Generator().manual_seed(hint)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = (torch.rand(2, hint, 64, 64, generator=g) > 0.5).float()
    ctx = torch.randn(2, 7, ours.cfg.context_dim, generator=g)
    t = torch.tensor([10, 800])
    scale = 0.7
    down, mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=scale,
                       return_dict=False)
    res = ours(x, cond, t, ctx, scale=scale)
    assert len(res) == len(down) + 1 == 10
    for a, b in zip(res, [*down, mid]):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-5
    # and what diffusers itself writes loads back into ours
    theirs.save_pretrained(tmp_path / "by_diffusers")
    assert_same(ours, cc.load_controlnet(tmp_path / "by_diffusers"))


def test_dginstyle_style_folder_without_conditioning_channels(tiny20, tmp_path):
    folder = cc.save_controlnet(tmp_path / "ControlNet_UNet-S", tiny20, layout="diffusers")
    config = json.loads((folder / "config.json").read_text())
    del config["conditioning_channels"]
    config["_diffusers_version"] = "0.17.0.dev0"
    for k in ("mid_block_type", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
              "addition_embed_type", "addition_time_embed_dim", "num_attention_heads", "addition_embed_type_num_heads"):
        del config[k]  # fields diffusers 0.17 did not write yet
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(OrderedDict(load_file(weights)), folder / "diffusion_pytorch_model.bin")  # fp32 pickle, like the release
    weights.unlink()
    ck = cc.read_controlnet_checkpoint(folder)
    assert ck.source.name == "diffusion_pytorch_model.bin" and "from the weights" in ck.config_from
    loaded = cc.load_controlnet(folder)
    assert loaded.control_cfg.hint_channels == 20
    assert_same(tiny20, loaded)
    # a config that claims 3 channels against 20-channel weights is a clear, named error
    (folder / "config.json").write_text(json.dumps({**config, "conditioning_channels": 3}))
    with pytest.raises(CheckpointError, match=r"(?s)diffusion_pytorch_model\.bin.*input_hint_block\.0\.weight"):
        cc.load_controlnet(folder)


def test_fp16_variant_folder_and_pipeline_subfolder(tiny20, tmp_path):
    folder = cc.save_controlnet(tmp_path / "pipe" / "controlnet", tiny20, layout="diffusers",
                                dtype=torch.float16, variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionControlNetPipeline", "controlnet": ["diffusers", "ControlNetModel"]}))
    for path in (folder, tmp_path / "pipe"):
        m = cc.load_controlnet(path, variant="fp16", dtype=None)
        assert_same(tiny20, m, dtype=torch.float16)
    m = cc.load_controlnet(folder)  # the variant is found without asking; dtype=float32 casts back
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_pipeline_subfolder_without_model_index_and_sd_reader_refusal(tiny20, tmp_path):
    folder = cc.save_controlnet(tmp_path / "pipe" / "controlnet", tiny20, layout="diffusers")
    unet = randomize_(UNetModel(TINY), seed=2)
    lck.save_diffusers(tmp_path / "pipe" / "unet", unet)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pipe" / "stray.pth")
    assert_same(tiny20, cc.load_controlnet(tmp_path / "pipe"))  # no model_index.json: the subfolders say it
    assert lck.read_checkpoint(tmp_path / "pipe").ignored == ["controlnet"]  # not an SD component
    assert torch.equal(lck.load_unet(tmp_path / "pipe").out[2].weight, unet.out[2].weight)
    with pytest.raises(CheckpointError, match=r"controlnet: config.json describes a ControlNetModel"):
        lck.load_unet(folder)  # the SD reader knows no ControlNet, and says what the folder is


# ---------------------------------------------------------------------------------------
# lllyasviel v1.0 / v1.1 files
# ---------------------------------------------------------------------------------------

def test_v10_full_file_and_v11_control_only_files_load_identically(tiny20, tmp_path):
    control = cc.controlnet_to_lllyasviel(tiny20.state_dict())
    sd_pipeline = tiny_sd_pipeline()
    assert any(k.startswith("model.diffusion_model.") for k in sd_pipeline) and "betas" in sd_pipeline
    torch.save({**sd_pipeline, **control}, tmp_path / "control_sd15_seg.pth")  # v1.0: whole ControlLDM
    torch.save(control, tmp_path / "control_v11p_sd15_seg.pth")  # v1.1: control only
    save_file(dict(tiny20.state_dict()), tmp_path / "no_prefix.safetensors")  # v1.1 without prefix
    loaded = [cc.load_controlnet(tmp_path / n, unet_config=TINY)
              for n in ("control_sd15_seg.pth", "control_v11p_sd15_seg.pth", "no_prefix.safetensors")]
    for m in loaded:
        assert m.control_cfg == ControlNetConfig.tiny(20)  # hint channels and widths from the weights
        assert_same(tiny20, m)
    # the SD reader loads the U-Net of a v1.0 file only when told to tolerate the control part
    with pytest.raises(CheckpointError, match=r"unexpected keys: control_model\."):
        lck.load_unet(tmp_path / "control_sd15_seg.pth")
    unet = lck.load_unet(tmp_path / "control_sd15_seg.pth", config=TINY, allow_unexpected=["control_model.*"])
    assert torch.equal(unet.out[2].bias, sd_pipeline["model.diffusion_model.out.2.bias"])
    d = cc.describe(tmp_path / "control_sd15_seg.pth", unet_config=TINY)
    assert d["format"] == "lllyasviel-v1.0" and d["fits"]
    assert d["ignored"]["model.diffusion_model."] == sum(k.startswith("model.diffusion_model.") for k in sd_pipeline)
    assert "betas" in d["ignored"] and d["tensors"] == len(control)
    assert cc.describe(tmp_path / "control_v11p_sd15_seg.pth", unet_config=TINY)["format"] == "lllyasviel"


def test_v10_file_with_foreign_keys_is_refused_unless_allowed(tiny20, tmp_path):
    control = cc.controlnet_to_lllyasviel(tiny20.state_dict())
    path = tmp_path / "v10.pth"
    torch.save({**tiny_sd_pipeline(), **control, "lora_unet_x.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"(?s)v10\.pth.*1 unexpected key.*lora_unet_x\.weight"):
        cc.load_controlnet(path, unet_config=TINY)
    assert_same(tiny20, cc.load_controlnet(path, unet_config=TINY, allow_unexpected=["lora_*"]))


def test_files_without_config_default_to_the_sd15_preset(tiny20, tmp_path):
    path = tmp_path / "cn.pth"
    torch.save(cc.controlnet_to_lllyasviel(tiny20.state_dict()), path)
    ck = cc.read_controlnet_checkpoint(path)
    assert ck.config.unet == UNetConfig() and ck.config.hint_channels == 20 and "SD-1.5" in ck.config_from
    with pytest.raises(CheckpointError, match=r"(?s)cn\.pth.*mis-shaped.*SD-1.5 U-Net preset"):
        cc.load_controlnet(path)


# ---------------------------------------------------------------------------------------
# Loading details and bad input
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_meta_build_and_assign_into_dtype(tiny20, tmp_path, dtype):
    path = cc.save_controlnet(tmp_path / "cn.safetensors", tiny20, layout="lllyasviel")
    m = cc.load_controlnet(path, dtype=dtype, device="cpu")
    tensors = list(m.parameters()) + list(m.buffers())
    assert not any(t.is_meta for t in tensors) and all(t.device.type == "cpu" for t in tensors)
    assert_same(tiny20, m, dtype=dtype)
    assert cc.load_controlnet(path, config=ControlNetConfig.tiny(20)).control_cfg == ControlNetConfig.tiny(20)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_one_clear_error(tiny20, tmp_path, suffix):
    path = cc.save_controlnet(tmp_path / f"cn{suffix}", tiny20, layout="lllyasviel")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cn{suffix}.*(truncated|corrupt)"):
        cc.load_controlnet(path)


def test_unet_only_files_are_refused_by_name(tmp_path):
    unet = randomize_(UNetModel(TINY), seed=5)
    lck.save_compvis(tmp_path / "sd_ldm.safetensors", {"unet": unet})
    save_file(lck.compvis_state_dict({"unet": unet}), tmp_path / "sd.safetensors")  # no metadata
    save_file(dict(unet.state_dict()), tmp_path / "unet_plain.safetensors")
    save_file(lck.native_to_diffusers("unet", TINY, unet.state_dict()), tmp_path / "unet_diffusers.safetensors")
    lck.save_diffusers(tmp_path / "unet_folder", unet)
    lck.save_native(tmp_path / "unet_native.safetensors", unet)
    for name, match in (("sd.safetensors", "holds no ControlNet.*SD single file"),
                        ("sd_ldm.safetensors", "a unet checkpoint written by ldm.checkpoint, not a ControlNet"),
                        ("unet_plain.safetensors", "holds no ControlNet.*U-Net"),
                        ("unet_diffusers.safetensors", "holds no ControlNet.*U-Net"),
                        ("unet_folder", "UNet2DConditionModel, not a ControlNetModel"),
                        ("unet_native.safetensors", "a unet checkpoint written by ldm.checkpoint, not a ControlNet")):
        with pytest.raises(CheckpointError, match=f"{name}.*{match}"):
            cc.load_controlnet(tmp_path / name)


def test_wrong_shapes_and_missing_keys_are_listed(tiny20, tmp_path):
    sd = cc.controlnet_to_lllyasviel(tiny20.state_dict())
    bad = dict(sd)
    bad["control_model.zero_convs.3.0.weight"] = torch.zeros(5, 5, 1, 1)
    del bad["control_model.middle_block_out.0.bias"], bad["control_model.input_blocks.1.0.emb_layers.1.weight"]
    bad["control_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(bad, path)
    with pytest.raises(CheckpointError) as e:
        cc.load_controlnet(path, unet_config=TINY)
    msg = str(e.value)
    assert str(path) in msg
    assert "2 missing keys" in msg and "middle_block_out.0.bias" in msg and "input_blocks.1.0.emb_layers.1.weight" in msg
    assert "1 unexpected key" in msg and "extra.weight" in msg
    assert "1 mis-shaped key" in msg and "zero_convs.3.0.weight: file (5, 5, 1, 1)" in msg
    d = cc.describe(path, unet_config=TINY)
    assert not d["fits"] and len(d["missing"]) == 2 and len(d["mis_shaped"]) == 1 and d["unexpected"] == ["extra.weight"]
    # a 3-channel config against 20-channel weights
    good = cc.save_controlnet(tmp_path / "good.safetensors", tiny20)
    with pytest.raises(CheckpointError, match=r"(?s)good\.safetensors.*input_hint_block\.0\.weight: file \(8, 20, 3, 3\)"):
        cc.load_controlnet(good, config=ControlNetConfig.tiny(3))


def test_saving_is_atomic_and_refuses_to_overwrite(tiny20, tmp_path, monkeypatch):
    path = cc.save_controlnet(tmp_path / "cn.safetensors", tiny20)
    with pytest.raises(CheckpointError, match="exists"):
        cc.save_controlnet(path, tiny20)
    cc.save_controlnet(path, tiny20, overwrite=True)
    with pytest.raises(CheckpointError, match=r"\.safetensors files"):
        cc.save_controlnet(tmp_path / "cn.pth", tiny20, layout="native")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights, "write_tensors", boom)
    for layout, name in (("diffusers", "folder"), ("lllyasviel", "x.pth")):
        with pytest.raises(RuntimeError, match="disk full"):
            cc.save_controlnet(tmp_path / name, tiny20, layout=layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn.safetensors"]


def test_cli_inspect_and_convert(tiny20, tmp_path, capsys):
    src = cc.save_controlnet(tmp_path / "cn.pth", tiny20, layout="lllyasviel")
    assert cc.main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "lllyasviel" in out and "hint: 20 channels" in out and "fits" in out
    assert cc.main(["inspect", "--json", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hint_channels"] == 20
    assert cc.main(["convert", str(src), str(tmp_path / "d"), "--to", "diffusers", "--dtype", "fp16"]) == 0
    assert cc.main(["convert", str(tmp_path / "d"), str(tmp_path / "n.safetensors"), "--to", "native"]) == 0
    assert_same(tiny20, cc.load_controlnet(tmp_path / "n.safetensors", dtype=None), dtype=torch.float16)
    capsys.readouterr()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert cc.main(["inspect", str(tmp_path / "junk.pth")]) == 1
    assert "junk.pth" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Full SD-1.5 size
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_round_trip(tmp_path):
    """DGInStyle's ControlNet (20 hint channels, fp16 to keep it quick): a prefix-less
    lllyasviel file -> inferred config -> diffusers names (vs the oracle) -> back."""
    model = randomize_(cc.build_controlnet().half().to_empty(device="cpu"), seed=1).eval()
    assert sum(p.numel() for p in model.parameters()) == 361_281_568
    path = tmp_path / "dginstyle_controlnet.safetensors"
    save_file(cc.controlnet_to_lllyasviel(model.state_dict()), path)  # no metadata: a foreign file
    loaded = cc.load_controlnet(path, dtype=None)
    assert loaded.control_cfg == ControlNetConfig()
    assert_same(model, loaded)
    del loaded
    cfg, sd = model.control_cfg, model.state_dict()
    theirs = cc.controlnet_to_diffusers(sd, cfg)
    oracle = sfu.convert_controlnet_checkpoint(cc.controlnet_to_lllyasviel(sd), cc.controlnet_config_to_diffusers(cfg))
    assert set(theirs) == set(oracle) and all(torch.equal(theirs[k], v) for k, v in oracle.items())
    back = cc.controlnet_from_diffusers(theirs, cfg)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
