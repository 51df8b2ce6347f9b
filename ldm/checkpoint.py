"""Checkpoint I/O for the SD-1.5 networks: read, detect, convert, strictly load, save.

Sources
  - CompVis single files (``.ckpt/.safetensors``): ``model.diffusion_model.`` (U-Net),
    ``first_stage_model.`` (VAE), ``cond_stage_model.transformer.`` (CLIP text encoder, with
    or without ``text_model.``); EMA U-Net weights ``model_ema.<key without dots>`` on request;
    schedule buffers and ``position_ids`` tolerated by name.
  - diffusers folders: a pipeline (``model_index.json`` + ``unet/ vae/ text_encoder/``, or those
    subfolders alone) or one component folder (``config.json`` + weights, ``fp16`` variants,
    sharded ``.index.json``). The renaming rules live in ``ldm.diffusers_keys``.
  - native files: our key space (the CompVis names without prefix) with the config JSON in the
    safetensors metadata; a pipeline puts ``unet.``/``vae.``/``text_encoder.`` before the keys.

The format detection, conversion, strict loading, saving and CLI are `ldm.formats`', shared
with the ControlNet; this module describes the three component kinds (`UNET`, `VAE`,
`TEXT_ENCODER`: model, config, preset, prefix, rule table, config converters), binds that
machinery to them and adds the SD pipeline folder export.

CLI: ``python -m ldm.checkpoint inspect PATH`` and ``python -m ldm.checkpoint convert SRC DST
--to native|diffusers|compvis [--dtype fp16|bf16|fp32] [--ema]``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ldm import cli, formats, weights
from ldm import diffusers_keys as dk
from ldm.atomic import atomic_dir
from ldm.clip import CLIPTextModel
from ldm.config import SD15_CLIP, SD15_UNET, SD15_VAE, AutoencoderConfig, CLIPTextConfig, UNetConfig
from ldm.formats import COMPVIS_SCHEDULE, DTYPES, EMA_PREFIX, FORMAT_VERSION, Checkpoint, Kind, json_config  # noqa: F401
from ldm.hub import resolve_path
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from ldm.weights import CheckpointError, read_state_dict  # noqa: F401

POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer older transformers versions saved
# Old CompVis/transformers files store the CLIP text tower without the `text_model.` level.
_CLIP_LEGACY_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def family_hint(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the model family a mismatching file most likely belongs to."""
    family = _family(state_dict)
    return family and f"{family}; this code implements SD-1.x networks"


def _family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    keys = list(state_dict)
    if any("conditioner.embedders" in k or "label_emb" in k for k in keys):
        return "this looks like an SDXL checkpoint"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "this looks like an SD-2.x checkpoint (OpenCLIP text encoder)"
    for k, v in state_dict.items():
        if k.endswith("attn2.to_k.weight") and v.ndim == 2 and v.shape[1] in (1024, 2048):
            ctx = v.shape[1]
            return f"this looks like an {'SD-2.x' if ctx == 1024 else 'SDXL'} U-Net (context width {ctx})"
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()):
        return "this U-Net has linear proj_in/proj_out (SD-2.x style)"
    return None


def compvis_ema_key(unet_key: str) -> str:
    """CompVis LitEma stores `diffusion_model.<key>` with the dots removed under `model_ema.`."""
    return EMA_PREFIX + f"diffusion_model.{unet_key}".replace(".", "")


def compvis_schedule_buffers() -> dict[str, torch.Tensor]:
    """The LatentDiffusion schedule buffers of an SD-1.x file (CompVis ddpm.py register_schedule:
    "linear" betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) squared, v_posterior = 0,
    computed in float64 and stored as float32)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    out = dict(
        betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev, sqrt_alphas_cumprod=acp.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - acp).sqrt(), log_one_minus_alphas_cumprod=(1.0 - acp).log(),
        sqrt_recip_alphas_cumprod=(1.0 / acp).sqrt(), sqrt_recipm1_alphas_cumprod=(1.0 / acp - 1).sqrt(),
        posterior_variance=post_var, posterior_log_variance_clipped=post_var.clamp_min(1e-20).log(),
        posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp))
    assert tuple(out) == COMPVIS_SCHEDULE
    return {k: v.float() for k, v in out.items()}


def _current_clip_names(tensors: dict, layout: str, tolerated: dict) -> dict:
    """Old files omit the `text_model.` level; position_ids is a constant buffer we do not keep."""
    tensors = {(k if k.startswith("text_model.") or not k.startswith(_CLIP_LEGACY_ROOTS) else "text_model." + k): v
               for k, v in tensors.items()}
    if POSITION_IDS in tensors:
        tolerated[POSITION_IDS] = tensors.pop(POSITION_IDS)
    return tensors


def _current_vae_names(tensors: dict, layout: str, tolerated: dict) -> dict:
    if layout != "diffusers":
        return tensors
    renames = dk.normalize_legacy_vae_keys(tensors)
    return {renames[k]: v for k, v in tensors.items()}


UNET_ENCODER_NAMES = ("input_blocks.", "middle_block.", "time_embed.", "conv_in.", "time_embedding.", "down_blocks.",
                       "mid_block.")  # our names, then diffusers'; the ControlNet shares them

UNET = Kind(
    "unet", "U-Net", UNetModel, UNetConfig, SD15_UNET, "SD-1.5 preset", "model.diffusion_model.",
    signatures=UNET_ENCODER_NAMES + ("output_blocks.", "out.", "conv_out.", "conv_norm_out.", "up_blocks."),
    classes=("UNet2DConditionModel",), library="diffusers",
    config_from_diffusers=json_config(dk.unet_config_from_diffusers), config_to_diffusers=dk.unet_config_to_diffusers,
    rules=dk.UNET_RULES, slots=dk.unet_slots,
    diffusers_markers=("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_in."),
    ema_key=compvis_ema_key, file_extras=compvis_schedule_buffers, hint=family_hint)
VAE = Kind(
    "vae", "VAE", AutoencoderKL, AutoencoderConfig, SD15_VAE, "SD-1.5 preset", "first_stage_model.",
    signatures=("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
    classes=("AutoencoderKL",), library="diffusers",
    config_from_diffusers=json_config(dk.vae_config_from_diffusers), config_to_diffusers=dk.vae_config_to_diffusers,
    rules=dk.VAE_RULES, slots=dk.vae_slots,
    diffusers_markers=("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.", "decoder.mid_block."),
    normalize=_current_vae_names, hint=family_hint)
TEXT_ENCODER = Kind(
    "text_encoder", "text encoder", CLIPTextModel, CLIPTextConfig, SD15_CLIP, "SD-1.5 preset",
    "cond_stage_model.transformer.",
    signatures=("text_model.", "embeddings.", "final_layer_norm.", "encoder.layers."),
    classes=("CLIPTextModel", "clip_text_model"), library="transformers",
    config_from_diffusers=json_config(dk.clip_config_from_transformers),
    config_to_diffusers=dk.clip_config_to_transformers,  # transformers' CLIPTextModel names are ours
    normalize=_current_clip_names, hint=family_hint)
KINDS = (UNET, VAE, TEXT_ENCODER)
COMPONENTS = tuple(k.name for k in KINDS)

check_state_dict = partial(weights.check_state_dict, hint=family_hint)
load_into = partial(weights.load_into, hint=family_hint)


def build_model(name: str, config=None, device: str | torch.device = "meta") -> nn.Module:
    """A component model for `config` (or the preset); on the meta device (the default) it is
    empty, with initialisation skipped, ready for `load_into`."""
    return formats.kind_named(KINDS, name).build(config, device)


def component_name(model: nn.Module) -> str:
    for kind in KINDS:
        if type(model) is kind.model:
            return kind.name
    raise TypeError(f"not a component model: {type(model).__name__}")


def native_to_diffusers(name: str, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a native state dict to the diffusers layout; unknown keys raise."""
    return formats.to_diffusers(formats.kind_named(KINDS, name), config, state_dict)


def diffusers_to_native(name: str, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout state dict to ours; keys without a rule keep their name."""
    return formats.from_diffusers(formats.kind_named(KINDS, name), config, state_dict)


# ---------------------------------------------------------------------------------------
# Reading and loading
# ---------------------------------------------------------------------------------------

def read_checkpoint(path, components: Iterable[str] | None = None, variant: str | None = None) -> Checkpoint:
    """Detect the format and split a file or folder into components (nothing is loaded yet).

    `components` restricts which subfolders of a diffusers pipeline are read; `variant`
    ("fp16") picks ``*.fp16.safetensors`` weights in diffusers folders.
    """
    return formats.read_checkpoint(path, KINDS, components=components, variant=variant)


def native_state_dict(ck: Checkpoint, name: str, config=None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The component's tensors under our names (EMA U-Net weights if `ema`)."""
    return formats.native_state_dict(ck, name, config, ema=ema)


def load_unet(path, dtype: torch.dtype | None = torch.float32, device="cpu", ema: bool = False,
              config: UNetConfig | None = None, variant: str | None = None,
              allow_unexpected: Iterable[str] = ()) -> UNetModel:
    """The U-Net of a file, component folder or pipeline folder (`ema`: CompVis EMA weights)."""
    return load_components(path, dtype, device, ema, ["unet"], {"unet": config}, variant, allow_unexpected)["unet"]


def load_vae(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: AutoencoderConfig | None = None,
             variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> AutoencoderKL:
    return load_components(path, dtype, device, False, ["vae"], {"vae": config}, variant, allow_unexpected)["vae"]


def load_text_encoder(path, dtype: torch.dtype | None = torch.float32, device="cpu",
                      config: CLIPTextConfig | None = None, variant: str | None = None,
                      allow_unexpected: Iterable[str] = ()) -> CLIPTextModel:
    return load_components(path, dtype, device, False, ["text_encoder"], {"text_encoder": config}, variant,
                           allow_unexpected)["text_encoder"]


def load_components(path, dtype: torch.dtype | None = torch.float32, device="cpu", ema: bool = False,
                    components: Iterable[str] | None = None, configs: Mapping[str, object] | None = None,
                    variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every component the file/folder holds (or those named), as {"unet", "vae", "text_encoder"} models.

    `dtype=None` keeps each tensor's dtype from the file.
    """
    return formats.load_components(path, KINDS, components=components, dtype=dtype, device=device, ema=ema,
                                   configs=configs, variant=variant, allow_unexpected=allow_unexpected)


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def _as_dict(models) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {component_name(models): models}
    out = dict(models)
    for name, m in out.items():
        if name not in COMPONENTS or component_name(m) != name:
            raise TypeError(f"{name!r}: expected one of {COMPONENTS} holding its model, got {type(m).__name__}")
    return out


def save_native(path, models, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """One component (a model) or several ({name: model}) as safetensors in our key space.

    The metadata holds the config JSON, the component name and the format version, so the
    file loads whatever its sizes. Several components get `<name>.` key prefixes.
    """
    return formats.save_native(path, _as_dict(models), KINDS, dtype=dtype, overwrite=overwrite)


def compvis_state_dict(models) -> dict[str, torch.Tensor]:
    """{name: model} -> one CompVis single-file state dict (prefixed keys, schedule buffers with a U-Net)."""
    return formats.prefixed_state_dict(_as_dict(models), KINDS)


def save_compvis(path, models, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A CompVis single file (``.safetensors`` or ``.ckpt``) that other SD-1.x tools open.

    Our configs ride along in the metadata (ignored by other tools), so non-SD-1.5 sizes reload.
    """
    return formats.save_prefixed(path, _as_dict(models), KINDS, dtype=dtype, overwrite=overwrite)


def save_diffusers(folder, models, dtype: torch.dtype | None = None, variant: str | None = None,
                   overwrite: bool = False, copy_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """Export to the diffusers layout, written atomically (to a temporary folder, then renamed).

    A single model gives a component folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
    or transformers' ``model.safetensors``); a {name: model} dict gives a pipeline folder with
    ``model_index.json``, one subfolder per component and the SD-1.x scheduler config.
    `copy_dirs` (e.g. a source pipeline's ``tokenizer/``) are copied in and listed in the index.
    """
    if isinstance(models, nn.Module):
        kind = formats.kind_named(KINDS, component_name(models))
        return formats.save_component(folder, kind, models, dtype=dtype, variant=variant, overwrite=overwrite)
    models = _as_dict(models)
    folder = weights.refuse_overwrite(folder, overwrite)
    with atomic_dir(folder) as tmp:
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": dk.DIFFUSERS_VERSION}
        for name, m in models.items():
            formats.write_component_folder(tmp / name, formats.kind_named(KINDS, name), m, dtype, variant)
            index[name] = list(dk.PIPELINE_CLASSES[name])
        if "unet" in models:
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dk.SD15_SCHEDULER, indent=2) + "\n")
            index["scheduler"] = ["diffusers", dk.SD15_SCHEDULER["_class_name"]]
        for d in map(Path, copy_dirs):
            shutil.copytree(d, tmp / d.name)
            if d.name == "tokenizer":
                index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        if "text_encoder" in models and "tokenizer" not in index:
            from ldm.tokenizer import Tokenizer  # SD-1.x's CLIP vocabulary: the folder opens in diffusers as is

            Tokenizer(max_length=models["text_encoder"].cfg.max_length).save_hf_files(str(tmp / "tokenizer"))
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------
# Inspection, conversion and the CLI
# ---------------------------------------------------------------------------------------

def describe(path, variant: str | None = None) -> dict:
    """What a checkpoint holds, without loading tensor data: format, per-component config,
    dtypes, parameter counts and fit, EMA, tolerated, unexpected and not loaded extras."""
    return formats.describe(path, KINDS, variant=variant)


def convert(src, dst, to: str, dtype: torch.dtype | None = None, ema: bool = False, variant: str | None = None,
            overwrite: bool = False, allow_unexpected: Iterable[str] = ()) -> Path:
    """Convert any supported checkpoint to `to` = "native" | "diffusers" | "compvis".

    The source is strictly loaded first (so a broken or foreign file fails here, not later),
    with mmap'd tensors assigned, not copied.
    """
    src = resolve_path(src)
    models = load_components(src, dtype=None, ema=ema, variant=variant, allow_unexpected=allow_unexpected)
    if to == "diffusers" and len(models) > 1:
        tok = src / "tokenizer"
        copy = [tok] if src.is_dir() and (src / "model_index.json").is_file() and tok.is_dir() else []
        return save_diffusers(dst, models, dtype=dtype, variant=variant, overwrite=overwrite, copy_dirs=copy)
    return formats.save_as(dst, models, to, KINDS, dtype=dtype, variant=variant, overwrite=overwrite)


_CLI = dict(prog="python -m ldm.checkpoint", description=__doc__.split("\n")[0], kinds=KINDS, examples="""examples:
    python -m ldm.checkpoint inspect v1-5-pruned-emaonly.safetensors
    python -m ldm.checkpoint convert v1-5-pruned-emaonly.safetensors sd15_diffusers --to diffusers --dtype fp16
    python -m ldm.checkpoint convert sd15_diffusers sd15.safetensors --to native
    python -m ldm.checkpoint convert sd15_diffusers sd15.ckpt --to compvis --ema""")


def get_parser():
    return formats.build_parser(**_CLI)


def main(argv: list[str] | None = None) -> int:
    return formats.main(argv, **_CLI, convert=convert)


def command() -> int:
    """The ``ldm-checkpoint`` console script: `main` with every known error as one line."""
    return cli.run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
