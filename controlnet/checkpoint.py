"""ControlNet checkpoints: read, detect, convert, strictly load, save.

Sources (all loaded into `controlnet.model.ControlNet`, whose names are lllyasviel's
``control_model.*`` names without the prefix, the U-Net encoder's names as in the U-Net):
  - lllyasviel files (``.pth/.ckpt/.safetensors``):
      * v1.0 files hold the whole SD pipeline next to the control part: ``control_model.*``
        plus ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and
        the CompVis schedule buffers. Only ``control_model.*`` is loaded; the rest is listed
        as ignored, by name, never silently dropped with the unknown keys;
      * v1.1 files are control-only, with ``control_model.`` or without any prefix.
  - diffusers ``ControlNetModel`` folders (``config.json`` + ``diffusion_pytorch_model
    [.fp16].safetensors|.bin``), a pipeline folder's ``controlnet/``, or one diffusers-layout
    file. DGInStyle's released ``ControlNet_UNet-S`` has no ``conditioning_channels`` in its
    config.json (its class default was 20, stock diffusers' is 3): the hint channels, and the
    hint-encoder widths whenever the config does not give them, come from the weight shapes.
  - native files: our names, ``.safetensors`` with the config JSON in the metadata.

The architecture comes from the checkpoint when it carries one (config.json, our metadata);
otherwise it is the SD-1.5 U-Net preset (or `unet_config=`) with the hint encoder read off
the weights.

Reading, strict loading (one CheckpointError naming the file and listing the missing,
unexpected and mis-shaped keys), conversion, saving and the CLI are the generic ones of
`ldm.formats`: this module describes the ControlNet kind (`CONTROLNET`) to them. Its diffusers
names reuse the U-Net encoder rule table of `ldm.diffusers_keys` (``time_embedding``,
``conv_in``, ``down_blocks``, ``mid_block``) plus five rules of its own.

CLI: ``python -m controlnet.checkpoint inspect PATH`` and ``python -m controlnet.checkpoint
convert SRC DST --to native|diffusers|lllyasviel [--dtype fp16|bf16|fp32]``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

from controlnet.model import ControlNet, ControlNetConfig
from ldm import checkpoint as sd_checkpoint
from ldm import cli
from ldm import diffusers_keys as dk
from ldm import formats
from ldm.config import UNetConfig
from ldm.weights import CheckpointError, few

LLLYASVIEL_PREFIX = "control_model."
LAYOUTS = ("native", "diffusers", "lllyasviel")
# The ControlNet's own modules, in either layout; its other names are a U-Net encoder's.
_NATIVE_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
_DIFFUSERS_MARKERS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")

# ---------------------------------------------------------------------------------------
# diffusers names: the U-Net encoder rules plus the ControlNet's own modules
# ---------------------------------------------------------------------------------------

CONTROLNET_RULES: tuple[dk.Rule, ...] = (
    dk.Rule("input_hint_block.0", "controlnet_cond_embedding.conv_in"),
    dk.Rule("input_hint_block.{n}", "controlnet_cond_embedding.blocks.{i}", each="hint_block"),
    dk.Rule("input_hint_block.{n}", "controlnet_cond_embedding.conv_out", each="hint_out"),
    dk.Rule("zero_convs.{n}.0", "controlnet_down_blocks.{n}", each="zero_conv"),
    dk.Rule("middle_block_out.0", "controlnet_mid_block"),
)


def controlnet_slots(cfg: ControlNetConfig) -> dict[str, list[dict]]:
    """U-Net encoder slots plus the hint encoder and zero-conv indices.

    ``input_hint_block`` is a Sequential of convs and SiLUs: conv_in at 0, then per stage a
    same-size conv and a stride-2 conv (diffusers' blocks.0, 1, ...) at 2, 4, ..., and the
    zero conv_out last (14 for SD-1.5's four widths).
    """
    slots = dk.unet_encoder_slots(cfg.unet)
    n_blocks = 2 * (len(cfg.hint_block_channels) - 1)
    n_skips = 1 + len(slots["down"]) + len(slots["downsample"])  # conv_in, each ResBlock, each downsample
    return {**slots,
            "hint_block": [dict(n=2 + 2 * i, i=i) for i in range(n_blocks)],
            "hint_out": [dict(n=2 + 2 * n_blocks)],
            "zero_conv": [dict(n=n) for n in range(n_skips)]}


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

# The constructor arguments of diffusers' ControlNetModel (SD-1.x and SDXL fields); an exported
# config.json holds these and nothing else.
_DIFFUSERS_FIELDS = (
    "in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "mid_block_type", "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions", "addition_embed_type_num_heads",
)
# Fields of the ControlNet itself; all others describe its U-Net encoder and go through
# ldm.diffusers_keys.unet_config_from_diffusers.
_CONTROL_FIELDS = ("conditioning_channels", "conditioning_embedding_out_channels",
                   "controlnet_conditioning_channel_order", "global_pool_conditions")
DIFFUSERS_DEFAULT_HINT_BLOCKS = (16, 32, 96, 256)


def infer_hint_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]] | None:
    """(hint_channels, hint_block_channels) read off the hint-encoder weights, or None if absent.

    Works on our names (``input_hint_block.{0,2,...}``, with or without ``control_model.``)
    and on diffusers' (``controlnet_cond_embedding.conv_in/blocks.i/conv_out``). The convs
    are, in order: conv_in, then a same-size conv and a stride-2 conv per stage, then conv_out;
    the widths are conv_in's output and every stride-2 conv's output.
    """
    convs: dict[tuple[int, int], torch.Tensor] = {}
    for k, v in state_dict.items():
        k = k.removeprefix(LLLYASVIEL_PREFIX)
        if not k.endswith(".weight") or v.ndim != 4:
            continue
        parts = k[: -len(".weight")].split(".")
        if len(parts) == 2 and parts[0] == "input_hint_block" and parts[1].isdigit():
            convs[(0, int(parts[1]))] = v
        elif parts[0] == "controlnet_cond_embedding":
            rank = {"conv_in": (0, -1), "conv_out": (2, 0)}.get(parts[1])
            if rank is None and parts[1] == "blocks" and len(parts) == 3 and parts[2].isdigit():
                rank = (1, int(parts[2]))
            if rank is not None:
                convs[rank] = v
    ordered = [convs[k] for k in sorted(convs)]
    if len(ordered) < 2 or len(ordered) % 2:
        return None
    return int(ordered[0].shape[1]), tuple(int(ordered[i].shape[0]) for i in range(0, len(ordered) - 1, 2))


def controlnet_config_from_diffusers(d: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None
                                     ) -> ControlNetConfig:
    """A diffusers ControlNetModel config.json -> ControlNetConfig.

    The U-Net part is converted exactly as for a UNet2DConditionModel (same field checks,
    same ``attention_head_dim`` = number of heads quirk). A config without
    ``conditioning_channels`` (DGInStyle's) takes it from `state_dict`'s hint-encoder weights,
    as does one without ``conditioning_embedding_out_channels``; the former without a state
    dict is an error, since the class that wrote it decides (DGInStyle 20, diffusers 3).
    """
    d = dict(d)
    cls = d.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ValueError(f"expected a ControlNetModel config, got _class_name={cls!r}")
    order = d.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"controlnet_conditioning_channel_order={order!r}: only 'rgb' (no channel flip) is implemented")
    if d.get("global_pool_conditions", False):
        raise ValueError("global_pool_conditions=True (shuffle-style pooled residuals) is not implemented")
    inferred = infer_hint_config(state_dict) if state_dict is not None else None
    hint = d.get("conditioning_channels")
    if hint is None:
        if inferred is None:
            raise ValueError("the config has no conditioning_channels (DGInStyle's released config omits it: "
                             "its class default was 20, stock diffusers' is 3) and no hint-encoder weights "
                             "were given to read it from")
        hint = inferred[0]
    blocks = d.get("conditioning_embedding_out_channels")
    if blocks is None:
        blocks = inferred[1] if inferred is not None else DIFFUSERS_DEFAULT_HINT_BLOCKS
    unet_d = {k: v for k, v in d.items() if k not in _CONTROL_FIELDS and k != "_class_name"}
    down = unet_d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    unet_d["up_block_types"] = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                                for t in reversed(list(down))]  # ControlNets have no decoder; mirror it
    try:
        unet = dk.unet_config_from_diffusers(unet_d)
    except ValueError as e:
        raise ValueError(f"ControlNetModel config (its U-Net encoder part): {e}") from e
    return ControlNetConfig(unet=unet, hint_channels=int(hint), hint_block_channels=tuple(blocks))


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict:
    """ControlNetConfig -> a ControlNetModel config.json that stock diffusers builds as is.

    ``conditioning_channels`` is always written (stock diffusers defaults to 3). The U-Net's
    ``out_channels`` is not a ControlNet field, so it does not survive a diffusers round trip
    (read back as 4).
    """
    unet = dk.unet_config_to_diffusers(cfg.unet)
    out = {"_class_name": "ControlNetModel", "_diffusers_version": dk.DIFFUSERS_VERSION}
    out.update({k: unet[k] for k in _DIFFUSERS_FIELDS if k in unet})
    out.update(conditioning_channels=cfg.hint_channels, conditioning_embedding_out_channels=list(cfg.hint_block_channels),
               controlnet_conditioning_channel_order="rgb", global_pool_conditions=False,
               addition_embed_type_num_heads=64)  # diffusers' default; unused without addition_embed_type
    return out


# ---------------------------------------------------------------------------------------
# The kind: what is particular to ControlNet files
# ---------------------------------------------------------------------------------------

def _config_from_diffusers(d: Mapping, tensors: Mapping[str, torch.Tensor]) -> tuple[ControlNetConfig, str]:
    cfg = controlnet_config_from_diffusers(d, tensors)
    return cfg, "config.json" + ("" if "conditioning_channels" in d else " + hint channels from the weights")


def _hint_from_weights(preset: ControlNetConfig, tensors: Mapping[str, torch.Tensor]) -> tuple[ControlNetConfig, str]:
    """A file without a config: the U-Net preset with the hint encoder its weights have."""
    inferred = infer_hint_config(tensors)
    if inferred is None:
        return preset, " + default hint encoder (no hint weights found)"
    return preset.replace(hint_channels=inferred[0], hint_block_channels=inferred[1]), " + hint encoder from the weights"


def _format_of(ck: formats.Checkpoint) -> str:
    """lllyasviel's names: a v1.0 file holds the whole SD pipeline next to the ControlNet, a
    v1.1 file the ControlNet alone, with or without the prefix."""
    if ck.format == "compvis":
        return "lllyasviel-v1.0" if len(ck.parts) > 1 or ck.tolerated or ck.ema else "lllyasviel"
    if ck.format == "diffusers":
        return "diffusers-folder" if ck.path.is_dir() else "diffusers-file"
    return "native" if ck.metadata.get("ldm.format") == "native" else "lllyasviel"


def _absent(ck: formats.Checkpoint) -> str:
    """Why a checkpoint holds no ControlNet, and what it looks like instead."""
    written = ck.metadata.get("ldm.component")
    if written and written != CONTROLNET.name:
        return (f"{ck.path}: a {written} checkpoint written by ldm.checkpoint, not a ControlNet; "
                f"load it with ldm.checkpoint")
    if ck.path.is_dir() and (ck.path / "config.json").is_file():
        (part,) = ck.parts.values()
        return (f"{ck.path}: config.json describes a {part.kind.classes[0]}, not a ControlNetModel; "
                f"load it with ldm.checkpoint")
    if ck.path.is_dir():
        return f"{ck.path}: a pipeline folder without a controlnet/ component (it lists {sorted(ck.ignored)})"
    prefixed = ck.format == "compvis"
    held = [(p.kind.prefix if prefixed else "") + k for p in ck.parts.values() for k in p.tensors]
    keys = sorted([*held, *ck.tolerated, *ck.ema, *ck.unexpected])
    looks = "an SD single file" if prefixed else "a U-Net" if "unet" in ck.parts else "something else"
    hint = sd_checkpoint.family_hint({k: v for p in ck.parts.values() for k, v in p.tensors.items()})
    return (f"{ck.path}: holds no ControlNet: none of its {len(keys)} keys ({few(keys, 4)}) is a "
            f"{LLLYASVIEL_PREFIX}*, input_hint_block.*/zero_convs.* or controlnet_cond_embedding.*/"
            f"controlnet_down_blocks.* key; it looks like {looks}" + (f"; {hint}" if hint else "")
            + ("; load SD checkpoints with ldm.checkpoint" if looks != "something else" else ""))


CONTROLNET = formats.Kind(
    "controlnet", "ControlNet", ControlNet, ControlNetConfig, ControlNetConfig(), "SD-1.5 U-Net preset",
    LLLYASVIEL_PREFIX,
    signatures=sd_checkpoint.UNET_ENCODER_NAMES + _NATIVE_MARKERS + _DIFFUSERS_MARKERS,
    classes=("ControlNetModel",), library="diffusers",
    config_from_diffusers=_config_from_diffusers, config_to_diffusers=controlnet_config_to_diffusers,
    rules=dk.UNET_ENCODER_RULES + CONTROLNET_RULES, slots=controlnet_slots,
    diffusers_markers=_DIFFUSERS_MARKERS, markers=_NATIVE_MARKERS + _DIFFUSERS_MARKERS,
    config_attr="control_cfg", file_format="lllyasviel", from_weights=_hint_from_weights,
    hint=sd_checkpoint.family_hint,
    summary=lambda c: f"hint: {c.hint_channels} channels, encoder widths {list(c.hint_block_channels)}",
    format_of=_format_of, absent=_absent)
# The SD kinds are read too, not loaded: a v1.0 file holds the whole SD pipeline next to the ControlNet.
KINDS = (CONTROLNET, *sd_checkpoint.KINDS)


def _presets(unet_config: UNetConfig | None) -> dict[str, ControlNetConfig]:
    return {} if unet_config is None else {CONTROLNET.name: ControlNetConfig(unet=unet_config)}


# ---------------------------------------------------------------------------------------
# The API: conversions, reading, loading, saving, inspection, the CLI
# ---------------------------------------------------------------------------------------

def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename a native ControlNet state dict to diffusers' ``ControlNetModel`` names (tensors not copied)."""
    return formats.to_diffusers(CONTROLNET, cfg, state_dict)


def controlnet_from_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """diffusers names -> ours. Keys without a rule keep their names, so a strict load reports them."""
    return formats.from_diffusers(CONTROLNET, cfg, state_dict)


def controlnet_to_lllyasviel(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {LLLYASVIEL_PREFIX + k: v for k, v in state_dict.items()}


def build_controlnet(cfg: ControlNetConfig | None = None, device: str | torch.device = "meta") -> ControlNet:
    """An empty ControlNet (meta device by default) for `cfg` or DGInStyle's SD-1.5 one."""
    return CONTROLNET.build(cfg, device)


def read_controlnet_checkpoint(path, variant: str | None = None, unet_config: UNetConfig | None = None
                               ) -> formats.Part:
    """Detect the format of a file or folder and split out the ControlNet (nothing loaded yet):
    its tensors, format, source file, and config (the checkpoint's, else the preset completed
    from the weights) with where it came from.

    `variant` ("fp16") picks diffusers ``*.fp16.*`` weights; `unet_config` replaces the SD-1.5
    preset for files that carry no config.
    """
    ck = formats.read_checkpoint(path, KINDS, components=[CONTROLNET.name], variant=variant,
                                 presets=_presets(unet_config))
    config = formats.part_config(ck, CONTROLNET.name)  # raises, saying why, if there is no ControlNet
    return dataclasses.replace(ck.parts[CONTROLNET.name], config=config)


def load_controlnet(path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu", *,
                    config: ControlNetConfig | None = None, unet_config: UNetConfig | None = None,
                    variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> ControlNet:
    """A ControlNet from any supported file or folder (or ``ORG/NAME[/sub]`` in the local HF cache).

    `config` overrides the checkpoint's architecture; `unet_config` replaces the SD-1.5 preset
    for files that carry none (the hint encoder is still read off the weights). `dtype=None`
    keeps the file's dtypes. Any missing, unexpected or mis-shaped key raises one CheckpointError.
    """
    return formats.load_components(path, KINDS, components=[CONTROLNET.name], dtype=dtype, device=device,
                                   configs={CONTROLNET.name: config}, variant=variant,
                                   allow_unexpected=allow_unexpected, presets=_presets(unet_config))[CONTROLNET.name]


def save_controlnet(path, model: ControlNet, layout: str = "native", dtype: torch.dtype | None = None, *,
                    variant: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` atomically in one of three layouts.

    - "native": ``.safetensors`` with our names and the config in the metadata;
    - "lllyasviel": ``control_model.*`` keys, control-only (v1.1 style), as ``.safetensors`` or
      ``.pth/.ckpt`` (``{"state_dict": ...}``, which lllyasviel's and diffusers' loaders unwrap);
      our config rides along in the metadata so non-SD-1.5 sizes reload;
    - "diffusers": a ``ControlNetModel`` folder (config.json with ``conditioning_channels`` +
      ``diffusion_pytorch_model[.variant].safetensors``) that ``from_pretrained`` loads, or, for a
      path ending in ``.safetensors``, one diffusers-layout file with the config in the metadata.
    `dtype` casts floating tensors (default: keep).
    """
    if not isinstance(model, ControlNet):
        raise TypeError(f"expected a ControlNet, got {type(model).__name__}")
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return formats.save_as(path, {CONTROLNET.name: model}, layout, KINDS, dtype=dtype, variant=variant,
                           overwrite=overwrite)


def describe(path, variant: str | None = None, unet_config: UNetConfig | None = None) -> dict:
    """What a checkpoint holds, without loading it into a model: format, config and where it
    came from, dtypes, parameter count, whether it fits, and what is ignored or unexpected."""
    d = formats.describe(path, KINDS, only=CONTROLNET.name, variant=variant, presets=_presets(unet_config))
    return formats.flatten(d, CONTROLNET.name)


def convert(src, dst, to: str, dtype: torch.dtype | None = None, variant: str | None = None, overwrite: bool = False,
            unet_config: UNetConfig | None = None, allow_unexpected: Iterable[str] = ()) -> Path:
    """Strictly load `src` (tensors kept in their dtype) and write it as `to` (see `save_controlnet`)."""
    model = load_controlnet(src, dtype=None, variant=variant, unet_config=unet_config, allow_unexpected=allow_unexpected)
    return save_controlnet(dst, model, layout=to, dtype=dtype, variant=variant, overwrite=overwrite)


_CLI = dict(prog="python -m controlnet.checkpoint", description=__doc__.split("\n")[0], kinds=KINDS,
           only=CONTROLNET.name, examples="""examples:
    python -m controlnet.checkpoint inspect /path/to/ControlNet_UNet-S
    python -m controlnet.checkpoint convert /path/to/ControlNet_UNet-S dginstyle_cn.safetensors --to native
    python -m controlnet.checkpoint convert control_v11p_sd15_seg.pth cn_diffusers --to diffusers --dtype fp16""")


def get_parser():
    return formats.build_parser(**_CLI)


def main(argv: list[str] | None = None) -> int:
    return formats.main(argv, **_CLI, convert=convert)


def command() -> int:
    """The ``controlnet-checkpoint`` console script: `main` with every known error as one line."""
    return cli.run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
