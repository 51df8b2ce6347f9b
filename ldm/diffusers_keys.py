"""The diffusers / transformers layouts: templated key rules and config translation.

Our module names are the CompVis checkpoint names after the prefix strip (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.transformer.``), so the diffusers folder layout is the
only source that needs real renaming.
The renaming is written as tables, in the style of gpt-fast's ``convert_hf_checkpoint``:

- a ``Rule`` maps one *module* of ours to one module of theirs, with ``{}`` placeholders
  (``input_blocks.{n}.0`` <-> ``down_blocks.{level}.resnets.{j}``) and an *inner* table
  that renames the parameters below it (``in_layers.0`` -> ``norm1``);
- the placeholders are filled from *slots*, the index arithmetic of the CompVis flat block
  lists, computed once from the config (``unet_slots``, ``vae_slots``);
- ``key_map`` expands the rules against the keys of a model built from the same config,
  so every key has exactly one rule (a key with none is a bug in the tables, not a file
  problem) and the map is checked to be one-to-one.

``UNET_ENCODER_RULES`` (time embedding, conv_in, down blocks, mid block) is kept apart from
``UNET_DECODER_RULES`` so that the ControlNet converter can reuse it with its own extra rules.

The CLIP text encoder needs no rules: transformers' ``CLIPTextModel`` names are ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ldm.config import AutoencoderConfig, CLIPTextConfig, UNetConfig

# ---------------------------------------------------------------------------------------
# Inner tables: parameter names below one module, ours -> theirs ("" keys: same names)
# ---------------------------------------------------------------------------------------

UNET_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.14 named the VAE attention projections differently; read-only aliases.
VAE_ATTENTION_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class Rule:
    """One module of ours <-> one module of theirs.

    ours, theirs: module paths with ``str.format`` placeholders filled from the slots of
        ``each`` (one expansion per slot; ``each=None`` means a single, literal rule);
    inner: renames of the parameter names below the module (longest dotted prefix wins);
    reshape: "conv1x1" marks modules whose weights are 1x1 convs (4-D) on our side and
        Linear (2-D) on theirs.
    """

    ours: str
    theirs: str
    inner: Mapping[str, str] = field(default_factory=dict)
    each: str | None = None
    reshape: str | None = None


UNET_ENCODER_RULES: tuple[Rule, ...] = (
    Rule("time_embed.0", "time_embedding.linear_1"),
    Rule("time_embed.2", "time_embedding.linear_2"),
    Rule("input_blocks.0.0", "conv_in"),
    Rule("input_blocks.{n}.0", "down_blocks.{level}.resnets.{j}", UNET_RESNET, each="down"),
    Rule("input_blocks.{n}.1", "down_blocks.{level}.attentions.{j}", each="down_attn"),
    Rule("input_blocks.{n}.0.op", "down_blocks.{level}.downsamplers.0.conv", each="downsample"),
    Rule("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
    Rule("middle_block.1", "mid_block.attentions.0"),
    Rule("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
)

UNET_DECODER_RULES: tuple[Rule, ...] = (
    Rule("output_blocks.{n}.0", "up_blocks.{i}.resnets.{j}", UNET_RESNET, each="up"),
    Rule("output_blocks.{n}.1", "up_blocks.{i}.attentions.{j}", each="up_attn"),
    Rule("output_blocks.{n}.{k}.conv", "up_blocks.{i}.upsamplers.0.conv", each="upsample"),
    Rule("out.0", "conv_norm_out"),
    Rule("out.2", "conv_out"),
)

UNET_RULES = UNET_ENCODER_RULES + UNET_DECODER_RULES

VAE_RULES: tuple[Rule, ...] = (
    Rule("{part}.conv_in", "{part}.conv_in", each="part"),
    Rule("{part}.conv_out", "{part}.conv_out", each="part"),
    Rule("{part}.norm_out", "{part}.conv_norm_out", each="part"),
    Rule("{part}.mid.block_1", "{part}.mid_block.resnets.0", VAE_RESNET, each="part"),
    Rule("{part}.mid.attn_1", "{part}.mid_block.attentions.0", VAE_ATTENTION, each="part", reshape="conv1x1"),
    Rule("{part}.mid.block_2", "{part}.mid_block.resnets.1", VAE_RESNET, each="part"),
    Rule("encoder.down.{level}.block.{j}", "encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET, each="enc"),
    Rule("encoder.down.{level}.downsample.conv", "encoder.down_blocks.{level}.downsamplers.0.conv", each="enc_down"),
    # CompVis keeps the decoder levels in resolution order (up.0 is full size); diffusers in run order.
    Rule("decoder.up.{level}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET, each="dec"),
    Rule("decoder.up.{level}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv", each="dec_up"),
    Rule("quant_conv", "quant_conv"),
    Rule("post_quant_conv", "post_quant_conv"),
)


# ---------------------------------------------------------------------------------------
# Slots: the index arithmetic of the CompVis block lists
# ---------------------------------------------------------------------------------------

def unet_encoder_slots(cfg: UNetConfig) -> dict[str, list[dict]]:
    """input_blocks.{n}: n counts conv_in (0), then R ResBlocks and one downsample per level."""
    down, down_attn, downsample = [], [], []
    n, last = 1, len(cfg.channels) - 1
    for level, attn in enumerate(cfg.attention_levels):
        for j in range(cfg.num_res_blocks):
            down.append(dict(n=n, level=level, j=j))
            if attn:
                down_attn.append(dict(n=n, level=level, j=j))
            n += 1
        if level != last:
            downsample.append(dict(n=n, level=level))
            n += 1
    return dict(down=down, down_attn=down_attn, downsample=downsample)


def unet_slots(cfg: UNetConfig) -> dict[str, list[dict]]:
    """Encoder slots plus output_blocks.{n}: R+1 blocks per level, deepest level first.

    diffusers' up_blocks.{i} counts the same way (i = 0 is the deepest level); the upsampler
    sits after the attention if the level has one, so at index k = 2, else k = 1.
    """
    slots = unet_encoder_slots(cfg)
    up, up_attn, upsample = [], [], []
    levels = len(cfg.channels)
    for i, level in enumerate(reversed(range(levels))):
        attn = cfg.attention_levels[level]
        for j in range(cfg.num_res_blocks + 1):
            n = i * (cfg.num_res_blocks + 1) + j
            up.append(dict(n=n, i=i, j=j))
            if attn:
                up_attn.append(dict(n=n, i=i, j=j))
            if level and j == cfg.num_res_blocks:
                upsample.append(dict(n=n, i=i, k=2 if attn else 1))
    return {**slots, "up": up, "up_attn": up_attn, "upsample": upsample}


def vae_slots(cfg: AutoencoderConfig) -> dict[str, list[dict]]:
    levels = len(cfg.channels)
    return dict(
        part=[dict(part="encoder"), dict(part="decoder")],
        enc=[dict(level=lv, j=j) for lv in range(levels) for j in range(cfg.num_res_blocks)],
        enc_down=[dict(level=lv) for lv in range(levels - 1)],
        dec=[dict(level=lv, i=levels - 1 - lv, j=j) for lv in range(levels) for j in range(cfg.num_res_blocks + 1)],
        dec_up=[dict(level=lv, i=levels - 1 - lv) for lv in range(1, levels)],
    )


# ---------------------------------------------------------------------------------------
# Expansion into a per-key map, and the tensor reshapes
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyTarget:
    key: str
    reshape: str | None = None


def _rename_inner(rest: str, inner: Mapping[str, str]) -> str:
    parts = rest.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in inner:
            return ".".join([inner[head], *parts[cut:]])
    return rest


def key_map(rules: Iterable[Rule], slots: Mapping[str, list[dict]], our_keys: Iterable[str]) -> dict[str, KeyTarget]:
    """Expand `rules` over `slots` and map every key of ours to its name in the other layout.

    Each key takes the rule with the longest matching module prefix. Raises KeyError if a key
    has no rule or if two keys would get the same name (both mean the tables are wrong).
    """
    modules: dict[str, tuple[str, Mapping[str, str], str | None]] = {}
    for rule in rules:
        for slot in slots[rule.each] if rule.each else [{}]:
            modules[rule.ours.format(**slot)] = (rule.theirs.format(**slot), rule.inner, rule.reshape)
    out: dict[str, KeyTarget] = {}
    for key in our_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                theirs, inner, reshape = modules[prefix]
                out[key] = KeyTarget(f"{theirs}.{_rename_inner('.'.join(parts[cut:]), inner)}", reshape)
                break
        else:
            raise KeyError(f"no conversion rule covers {key!r}")
    targets = [t.key for t in out.values()]
    if len(set(targets)) != len(targets):
        dup = sorted({t for t in targets if targets.count(t) > 1})
        raise KeyError(f"conversion rules are not one-to-one: {dup[:5]}")
    return out


def to_theirs(t: torch.Tensor, reshape: str | None) -> torch.Tensor:
    if reshape == "conv1x1" and t.ndim == 4:
        return t.reshape(t.shape[0], t.shape[1])  # 1x1 conv weight (C, C, 1, 1) -> Linear (C, C)
    return t


def to_ours(t: torch.Tensor, reshape: str | None) -> torch.Tensor:
    if reshape == "conv1x1" and t.ndim in (2, 3):
        return t.reshape(t.shape[0], t.shape[1], 1, 1)  # Linear (C, C) or conv1d (C, C, 1) -> 1x1 conv
    return t


def normalize_legacy_vae_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map old diffusers VAE attention names (query/key/value/proj_attn) to the current ones."""
    out = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 5 and parts[1:4] == ["mid_block", "attentions", "0"] and parts[4] in VAE_ATTENTION_LEGACY:
            out[key] = ".".join([*parts[:4], VAE_ATTENTION_LEGACY[parts[4]], *parts[5:]])
        else:
            out[key] = key
    return out


# ---------------------------------------------------------------------------------------
# Configs: diffusers config.json (UNet2DConditionModel, AutoencoderKL) and transformers
# CLIPTextConfig <-> ours
# ---------------------------------------------------------------------------------------

DIFFUSERS_VERSION = "0.30.0"  # written into exported config.json files; any recent diffusers reads them

# Fields of UNet2DConditionModel that SD-1.x leaves at these values. We implement only these,
# so a config that sets any other value is rejected by name rather than loaded wrongly.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,  # [cos, sin] embedding
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# Read and mapped, or harmless to ignore (sizes of the default generation, numerics-only flags,
# a field only used together with a rejected feature).
_UNET_HANDLED = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "upcast_attention", "addition_embed_type_num_heads",
}

_VAE_FIXED = {
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_VAE_HANDLED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
    "force_upcast",
}


def _per_level(value, levels: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries for {levels} levels")
        return tuple(value)
    return (value,) * levels


def _uniform(value, name: str, why: str):
    """An int, or a per-level list whose entries are all equal (we have one value per model)."""
    if isinstance(value, (list, tuple)):
        flat = [v for v in value]
        if any(isinstance(v, (list, tuple)) for v in flat) or len(set(flat)) != 1:
            raise ValueError(f"unsupported {name}={value!r}: {why}")
        return flat[0]
    return value


def _check_fixed(d: Mapping, fixed: Mapping, handled: set, what: str) -> None:
    bad = []
    for k, v in d.items():
        if k.startswith("_") or k in handled:
            continue
        if k not in fixed:
            bad.append(f"{k}={v!r} (unknown field)")
            continue
        want = fixed[k]
        ok = v == want or (isinstance(v, (list, tuple)) and all(x == want for x in v))
        if not ok:
            bad.append(f"{k}={v!r} (we implement only {want!r})")
    if bad:
        raise ValueError(f"{what} uses features this implementation does not have: " + "; ".join(bad))


def unet_config_from_diffusers(d: Mapping) -> UNetConfig:
    cls = d.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ValueError(f"expected a UNet2DConditionModel config, got _class_name={cls!r}")
    _check_fixed(d, _UNET_FIXED, _UNET_HANDLED, "UNet2DConditionModel config")
    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = tuple(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = tuple(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != levels or any(t not in kinds for t in down):
        raise ValueError(f"unsupported down_block_types {list(down)} for {levels} levels")
    attention_levels = tuple(kinds[t] for t in down)
    want_up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    if up != want_up:
        raise ValueError(f"up_block_types {list(up)} do not mirror down_block_types (expected {list(want_up)})")
    # diffusers quirk: `attention_head_dim` holds the number of heads unless
    # `num_attention_heads` is given (huggingface/diffusers#2011).
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    groups = d.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError("norm_num_groups=None (no GroupNorm) is not supported")
    context = _uniform(d.get("cross_attention_dim", 1280), "cross_attention_dim", "one context width per model")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), channels=channels,
        num_res_blocks=_uniform(d.get("layers_per_block", 2), "layers_per_block", "one value per model"),
        attention_levels=attention_levels, num_heads=_per_level(heads, levels, "attention heads"),
        transformer_depth=_uniform(d.get("transformer_layers_per_block", 1), "transformer_layers_per_block",
                                   "per-level transformer depths (SDXL) are not implemented"),
        context_dim=context, norm_groups=groups, use_linear_projection=bool(d.get("use_linear_projection", False)))


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        **_UNET_FIXED,
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": down, "up_block_types": up, "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.norm_groups,
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": list(cfg.num_heads),  # = heads, see unet_config_from_diffusers
        "num_attention_heads": None, "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": False,
    }


def vae_config_from_diffusers(d: Mapping) -> AutoencoderConfig:
    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"expected an AutoencoderKL config, got _class_name={cls!r}")
    _check_fixed(d, _VAE_FIXED, _VAE_HANDLED, "AutoencoderKL config")
    channels = tuple(d.get("block_out_channels", (64,)))
    n = len(channels)
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
        raise ValueError(f"unsupported VAE block types {down} / {up} for {n} levels")
    return AutoencoderConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4), channels=channels,
        num_res_blocks=d.get("layers_per_block", 1), norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=float(d.get("scaling_factor", 0.18215)))


def vae_config_to_diffusers(cfg: AutoencoderConfig, sample_size: int = 512) -> dict:
    n = len(cfg.channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **_VAE_FIXED,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.channels), "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size, "scaling_factor": cfg.scaling_factor, "force_upcast": True,
    }


def clip_config_from_transformers(d: Mapping) -> CLIPTextConfig:
    """transformers CLIPTextConfig json -> ours. Generic PretrainedConfig fields are ignored."""
    if "text_config" in d:  # a full CLIPConfig: use its text tower
        d = d["text_config"]
    model_type = d.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise ValueError(f"expected a CLIP text config, got model_type={model_type!r}")
    archs = d.get("architectures") or ["CLIPTextModel"]
    if any(a != "CLIPTextModel" for a in archs):
        raise ValueError(f"unsupported text encoder architecture {archs} (only CLIPTextModel)")
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported hidden_act={act!r} (quick_gelu or gelu)")
    return CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408), max_length=d.get("max_position_embeddings", 77),
        width=d.get("hidden_size", 512), layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8), mlp_width=d.get("intermediate_size", 2048),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)), act=act)


def clip_config_to_transformers(cfg: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_width, "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": cfg.act,
        "projection_dim": cfg.width, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02,
        # SD-1.x tokenizer ids: <|startoftext|> 49406, <|endoftext|> 49407 (also the pad token)
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }


# ---------------------------------------------------------------------------------------
# Folder layout
# ---------------------------------------------------------------------------------------

# Weight file names per component folder, in order of preference; "{v}" is "" or ".fp16" etc.
WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "transformers": ("model{v}.safetensors", "pytorch_model{v}.bin"),
}
PIPELINE_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
}
# SD-1.x's scheduler (PNDM in the original pipeline), written so an exported pipeline folder is complete.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}
