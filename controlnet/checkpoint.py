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
the weights. Loading builds the model on the meta device, checks every key and shape
(`ldm.checkpoint.load_into`: one CheckpointError naming the file and listing the missing,
unexpected and mis-shaped keys), and assigns the tensors, cast one by one.

The diffusers names reuse the U-Net encoder rule table of `ldm.diffusers_keys`
(``time_embedding``, ``conv_in``, ``down_blocks``, ``mid_block``) plus five rules of our own.

CLI: ``python -m controlnet.checkpoint inspect PATH`` and ``python -m controlnet.checkpoint
convert SRC DST --to native|diffusers|lllyasviel [--dtype fp16|bf16|fp32]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import torch

from controlnet.model import ControlNet, ControlNetConfig
from ldm import checkpoint as lck
from ldm import diffusers_keys as dk
from ldm.checkpoint import CheckpointError, load_into, read_state_dict, resolve_path
from ldm.config import SD15_UNET, UNetConfig

# Private helpers of ldm.checkpoint reused as they are (atomic writes, host copies, file writes).
from ldm.checkpoint import _atomic_dir, _atomic_file, _few, _host_tensors, _weights_file, _write_tensors

LLLYASVIEL_PREFIX = "control_model."
COMPONENT = "controlnet"  # the `ldm.component` value in our safetensors metadata
LAYOUTS = ("native", "diffusers", "lllyasviel")

# What a v1.0 lllyasviel file (a whole ControlLDM) holds besides the ControlNet: the SD-1.5
# pipeline it was trained on. Never loaded here; ldm.checkpoint reads those parts.
SD_PIPELINE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", lck.EMA_PREFIX)
SD_PIPELINE_NAMES = lck.COMPVIS_TOLERATED  # schedule buffers, logvar, EMA counters

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


@lru_cache(maxsize=16)
def _model_shapes(cfg: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ControlNet(cfg).state_dict().items()}


@lru_cache(maxsize=16)
def _diffusers_map(cfg: ControlNetConfig) -> dict[str, dk.KeyTarget]:
    return dk.key_map(dk.UNET_ENCODER_RULES + CONTROLNET_RULES, controlnet_slots(cfg), _model_shapes(cfg))


def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename a native ControlNet state dict to diffusers' ``ControlNetModel`` names (tensors not copied)."""
    km = _diffusers_map(cfg)
    unknown = [k for k in state_dict if k not in km]
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not part of a ControlNet with this config: {_few(unknown)}")
    return {km[k].key: dk.to_theirs(v, km[k].reshape) for k, v in state_dict.items()}


def controlnet_from_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """diffusers names -> ours. Keys without a rule keep their names, so a strict load reports them."""
    inverse = {t.key: (ours, t.reshape) for ours, t in _diffusers_map(cfg).items()}
    out = {}
    for k, v in state_dict.items():
        if k in inverse:
            ours, reshape = inverse[k]
            out[ours] = dk.to_ours(v, reshape)
        else:
            out[k] = v
    return out


def controlnet_to_lllyasviel(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {LLLYASVIEL_PREFIX + k: v for k, v in state_dict.items()}


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
# Reading: what a file or folder holds
# ---------------------------------------------------------------------------------------

@dataclass
class ControlNetCheckpoint:
    """One ControlNet as found: tensors with the prefix stripped but not yet renamed."""

    path: Path  # what was asked for
    source: Path  # the weights file
    format: str  # "lllyasviel-v1.0" | "lllyasviel" | "diffusers-folder" | "diffusers-file" | "native"
    layout: str  # names of `tensors`: "native" (ours = lllyasviel without prefix) or "diffusers"
    tensors: dict[str, torch.Tensor]
    config: ControlNetConfig
    config_from: str  # where `config` came from, for messages
    ignored: dict[str, torch.Tensor] = field(default_factory=dict)  # the SD pipeline of a v1.0 file
    unexpected: dict[str, torch.Tensor] = field(default_factory=dict)  # keys of nothing we know
    metadata: dict[str, str] = field(default_factory=dict)


def read_controlnet_checkpoint(path, variant: str | None = None, unet_config: UNetConfig | None = None
                               ) -> ControlNetCheckpoint:
    """Detect the format of a file or folder and split out the ControlNet (nothing loaded yet).

    `variant` ("fp16") picks diffusers ``*.fp16.*`` weights; `unet_config` replaces the SD-1.5
    preset for files that carry no config.
    """
    path = resolve_path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _read_pipeline_folder(path, variant)
        if (path / "config.json").is_file():
            return _read_diffusers_folder(path, variant, path)
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: a folder with neither config.json nor model_index.json and "
                                  f"{len(files)} weight files {[p.name for p in files]}; pass one file")
        return read_controlnet_checkpoint(files[0], variant, unet_config)
    tensors, meta = read_state_dict(path)
    return _split_file(path, tensors, meta, unet_config)


def _read_pipeline_folder(folder: Path, variant) -> ControlNetCheckpoint:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'model_index.json'}: unreadable ({e})") from e
    sub = folder / "controlnet"
    if "controlnet" not in index or not (sub / "config.json").is_file():
        raise CheckpointError(f"{folder}: a pipeline folder without a controlnet/ component "
                              f"(it lists {sorted(k for k in index if not k.startswith('_'))})")
    return _read_diffusers_folder(sub, variant, folder)


def _read_diffusers_folder(folder: Path, variant, asked: Path) -> ControlNetCheckpoint:
    config_path = folder / "config.json"
    try:
        d = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: unreadable ({e})") from e
    cls = d.get("_class_name")
    if cls != "ControlNetModel":
        raise CheckpointError(f"{folder}: config.json describes a {cls or 'model without _class_name'}, "
                              f"not a ControlNetModel" + ("; load it with ldm.checkpoint" if cls else ""))
    weights = _weights_file(folder, "diffusers", variant)
    tensors, meta = read_state_dict(weights)
    try:
        cfg = controlnet_config_from_diffusers(d, tensors)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    how = "config.json" + ("" if "conditioning_channels" in d else " + hint channels from the weights")
    return ControlNetCheckpoint(asked, weights, "diffusers-folder", "diffusers", tensors, cfg, how, metadata=meta)


def _metadata_config(path: Path, meta: Mapping[str, str]) -> ControlNetConfig | None:
    if "ldm.config" not in meta:
        return None
    comp = meta.get("ldm.component")
    if comp != COMPONENT:
        raise CheckpointError(f"{path}: a {comp or 'non-ControlNet'} checkpoint written by ldm.checkpoint, "
                              f"not a ControlNet; load it with ldm.checkpoint")
    try:
        return ControlNetConfig.from_dict(json.loads(meta["ldm.config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad ControlNet config in the metadata ({e})") from e


def _split_file(path: Path, tensors: dict, meta: dict, unet_config: UNetConfig | None) -> ControlNetCheckpoint:
    cfg = _metadata_config(path, meta)
    ignored, unexpected = {}, {}
    if any(k.startswith(LLLYASVIEL_PREFIX) for k in tensors):
        control = {}
        for k, v in tensors.items():
            if k.startswith(LLLYASVIEL_PREFIX):
                control[k[len(LLLYASVIEL_PREFIX):]] = v
            elif k.startswith(SD_PIPELINE_PREFIXES) or k in SD_PIPELINE_NAMES:
                ignored[k] = v
            else:
                unexpected[k] = v
        fmt, layout = ("lllyasviel-v1.0" if ignored else "lllyasviel"), "native"
        if any(k.startswith(_DIFFUSERS_MARKERS) for k in control):
            layout = "diffusers"  # a diffusers state dict saved under lllyasviel's prefix
    elif any(k.startswith(_DIFFUSERS_MARKERS) for k in tensors):
        control, fmt, layout = tensors, "diffusers-file", "diffusers"
    elif any(k.startswith(_NATIVE_MARKERS) for k in tensors):
        control, layout = tensors, "native"
        fmt = "native" if meta.get("ldm.format") == "native" else "lllyasviel"
    else:
        what = lck._family_hint(tensors)
        looks = ("an SD single file" if any(k.startswith(SD_PIPELINE_PREFIXES) for k in tensors)
                 else "a U-Net" if any(k.startswith(("input_blocks.", "down_blocks.", "output_blocks.", "up_blocks."))
                                       for k in tensors) else "something else")
        raise CheckpointError(
            f"{path}: holds no ControlNet: none of its {len(tensors)} keys ({_few(sorted(tensors), 4)}) is a "
            f"{LLLYASVIEL_PREFIX}*, input_hint_block.*/zero_convs.* or controlnet_cond_embedding.*/"
            f"controlnet_down_blocks.* key; it looks like {looks}" + (f" ({what})" if what else "")
            + ("; load SD checkpoints with ldm.checkpoint" if looks != "something else" else ""))
    if cfg is not None:
        how = "metadata"
    else:
        inferred = infer_hint_config(control)
        base = unet_config or SD15_UNET
        cfg = ControlNetConfig(unet=base)  # DGInStyle's hint encoder unless the weights say otherwise
        if inferred:
            cfg = cfg.replace(hint_channels=inferred[0], hint_block_channels=inferred[1])
        how = (("SD-1.5 U-Net preset" if unet_config is None else "given U-Net config")
               + (" + hint encoder from the weights" if inferred else " + default hint encoder (no hint weights found)"))
    return ControlNetCheckpoint(path, path, fmt, layout, control, cfg, how, ignored, unexpected, meta)


def native_state_dict(ck: ControlNetCheckpoint, cfg: ControlNetConfig | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's ControlNet tensors under our names."""
    cfg = cfg or ck.config
    if ck.layout == "diffusers":
        return controlnet_from_diffusers(ck.tensors, cfg)
    return dict(ck.tensors)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def build_controlnet(cfg: ControlNetConfig | None = None, device: str | torch.device = "meta") -> ControlNet:
    """An empty ControlNet (meta device by default) for `cfg` or DGInStyle's SD-1.5 one."""
    with torch.device(device):
        return ControlNet(cfg or ControlNetConfig())


def load_controlnet_state_dict(model: ControlNet, ck: ControlNetCheckpoint, *, dtype=None, device=None,
                               allow_unexpected: Iterable[str] = ()) -> ControlNet:
    sd = native_state_dict(ck, model.control_cfg)
    sd.update(ck.unexpected)  # keys of nothing we know fail the load unless allowed
    try:
        return load_into(model, sd, source=ck.source, allow_unexpected=allow_unexpected, dtype=dtype, device=device)
    except CheckpointError as e:
        c = model.control_cfg
        raise CheckpointError(f"{e}\n  (ControlNet with hint_channels={c.hint_channels}, hint_block_channels="
                              f"{list(c.hint_block_channels)}; config from {ck.config_from}; "
                              f"{ck.format} checkpoint, {ck.layout} names)") from None


def load_controlnet(path, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu", *,
                    config: ControlNetConfig | None = None, unet_config: UNetConfig | None = None,
                    variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> ControlNet:
    """A ControlNet from any supported file or folder (or ``ORG/NAME[/sub]`` in the local HF cache).

    `config` overrides the checkpoint's architecture; `unet_config` replaces the SD-1.5 preset
    for files that carry none (the hint encoder is still read off the weights). `dtype=None`
    keeps the file's dtypes. Any missing, unexpected or mis-shaped key raises one CheckpointError.
    """
    ck = read_controlnet_checkpoint(path, variant=variant, unet_config=unet_config)
    model = build_controlnet(config or ck.config)
    return load_controlnet_state_dict(model, ck, dtype=dtype, device=device, allow_unexpected=allow_unexpected)


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def _metadata(cfg: ControlNetConfig, layout: str) -> dict[str, str]:
    return {"ldm.format": layout, "ldm.format_version": lck.FORMAT_VERSION, "ldm.component": COMPONENT,
            "ldm.config": cfg.to_json()}


def _torch_or_safetensors(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".pth", ".ckpt", ".pt", ".bin"):
        return "torch"
    raise CheckpointError(f"{path}: unknown extension; use .safetensors, .pth or .ckpt")


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
    cfg, path = model.control_cfg, Path(path)
    sd = model.state_dict()
    if layout == "native":
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: native ControlNet checkpoints are .safetensors files")
        return _atomic_file(path, lambda tmp: _write_tensors(tmp, _host_tensors(sd, dtype), _metadata(cfg, layout),
                                                             "safetensors"), overwrite)
    if layout == "lllyasviel":
        fmt = _torch_or_safetensors(path)
        sd = controlnet_to_lllyasviel(sd)
        return _atomic_file(path, lambda tmp: _write_tensors(tmp, _host_tensors(sd, dtype), _metadata(cfg, layout),
                                                             fmt), overwrite)
    sd = controlnet_to_diffusers(sd, cfg)
    if path.suffix == ".safetensors":
        return _atomic_file(path, lambda tmp: _write_tensors(tmp, _host_tensors(sd, dtype), _metadata(cfg, layout),
                                                             "safetensors"), overwrite)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(controlnet_config_to_diffusers(cfg), indent=2, sort_keys=True) + "\n")
        weights = dk.WEIGHT_NAMES["diffusers"][0].format(v=f".{variant}" if variant else "")
        _write_tensors(tmp / weights, _host_tensors(sd, dtype), {"format": "pt"}, "safetensors")

    return _atomic_dir(path, write, overwrite)


# ---------------------------------------------------------------------------------------
# Inspection, conversion and the CLI
# ---------------------------------------------------------------------------------------

def _prefix_counts(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        head = next((p for p in SD_PIPELINE_PREFIXES if k.startswith(p)), k)
        out[head] = out.get(head, 0) + 1
    return out


def describe(path, variant: str | None = None, unet_config: UNetConfig | None = None) -> dict:
    """What a checkpoint holds, without loading it into a model: format, config and where it
    came from, dtypes, parameter count, whether it fits, and what is ignored or unexpected."""
    ck = read_controlnet_checkpoint(path, variant=variant, unet_config=unet_config)
    sd = native_state_dict(ck)
    shapes = _model_shapes(ck.config)
    info = {
        "path": str(ck.path), "source": str(ck.source), "format": ck.format, "layout": ck.layout,
        "config_from": ck.config_from, "config": ck.config.to_dict(), "tensors": len(ck.tensors),
        "parameters": sum(t.numel() for t in ck.tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in ck.tensors.values()}),
        "missing": sorted(k for k in shapes if k not in sd),
        "unexpected": sorted([k for k in sd if k not in shapes] + list(ck.unexpected)),
        "mis_shaped": sorted(k for k, s in shapes.items() if k in sd and tuple(sd[k].shape) != s),
        "ignored": _prefix_counts(ck.ignored),
    }
    info["fits"] = not (info["missing"] or info["unexpected"] or info["mis_shaped"])
    return info


def _format_description(d: dict) -> str:
    c = d["config"]
    fit = "fits" if d["fits"] else (f"DOES NOT FIT: {len(d['missing'])} missing, {len(d['unexpected'])} unexpected, "
                                    f"{len(d['mis_shaped'])} mis-shaped ({_few(d['missing'] + d['unexpected'] + d['mis_shaped'], 4)})")
    lines = [f"path:    {d['path']}" + (f" (weights {d['source']})" if d["source"] != d["path"] else ""),
             f"format:  {d['format']} ({d['layout']} names)",
             f"controlnet: {d['parameters']:,} parameters in {d['tensors']} tensors, {'/'.join(d['dtypes'])}, {fit}",
             f"    hint: {c['hint_channels']} channels, encoder widths {c['hint_block_channels']}",
             f"    config ({d['config_from']}): {json.dumps(c['unet'])}"]
    if d["ignored"]:
        lines.append("ignored (not the ControlNet): " + ", ".join(f"{k}* ({n})" if k.endswith(".") else k
                                                                for k, n in d["ignored"].items()))
    return "\n".join(lines)


def convert(src, dst, to: str, dtype: torch.dtype | None = None, variant: str | None = None, overwrite: bool = False,
            unet_config: UNetConfig | None = None) -> Path:
    """Strictly load `src` (tensors kept in their dtype) and write it as `to` (see `save_controlnet`)."""
    model = load_controlnet(src, dtype=None, variant=variant, unet_config=unet_config)
    return save_controlnet(dst, model, layout=to, dtype=dtype, variant=variant, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlnet.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print format, config, dtypes, parameter count, fit and ignored parts")
    p.add_argument("path", help="file, diffusers folder, pipeline folder or ORG/NAME[/sub] in the local HF cache")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p = sub.add_parser("convert", help="convert to native safetensors, a diffusers folder or a lllyasviel file")
    p.add_argument("src")
    p.add_argument("dst", help="a .safetensors file (native, lllyasviel, single diffusers file), a .pth/.ckpt "
                               "(lllyasviel) or a folder (diffusers)")
    p.add_argument("--to", required=True, choices=LAYOUTS)
    p.add_argument("--dtype", choices=tuple(lck.DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--variant", default=None, help="diffusers weight variant to read and write, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "inspect":
            d = describe(args.path, variant=args.variant)
            print(json.dumps(d, indent=2) if args.json else _format_description(d))
        else:
            out = convert(args.src, args.dst, args.to, dtype=lck.DTYPES.get(args.dtype), variant=args.variant,
                          overwrite=args.overwrite)
            print(f"wrote {out}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
