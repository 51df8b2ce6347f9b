"""Checkpoint I/O for the SD-1.5 networks: read, detect, convert, strictly load, save.

Sources
  - CompVis single files (``.ckpt/.safetensors``): ``model.diffusion_model.`` (U-Net),
    ``first_stage_model.`` (VAE), ``cond_stage_model.transformer.`` (CLIP text encoder, with
    or without ``text_model.``); EMA U-Net weights ``model_ema.<key without dots>`` on request;
    schedule buffers and ``position_ids`` tolerated by name.
  - diffusers folders: a pipeline (``model_index.json`` + ``unet/ vae/ text_encoder/``) or one
    component folder (``config.json`` + weights, ``fp16`` variants, sharded ``.index.json``).
    The renaming rules live in ``ldm.diffusers_keys``.
  - native files: our key space (the CompVis names without prefix) with the config JSON in the
    safetensors metadata; a pipeline puts ``unet.``/``vae.``/``text_encoder.`` before the keys.

Loading builds the model on the meta device from the checkpoint's own config (presets only for
files that carry none), checks every key and shape (`load_into`), then assigns the (mmap'd)
tensors cast one by one, so host memory is not doubled.

CLI: ``python -m ldm.checkpoint inspect PATH`` and ``python -m ldm.checkpoint convert SRC DST
--to native|diffusers|compvis [--dtype fp16|bf16|fp32] [--ema]``.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm import diffusers_keys as dk
from ldm.clip import CLIPTextModel
from ldm.config import SD15_CLIP, SD15_UNET, SD15_VAE, AutoencoderConfig, CLIPTextConfig, UNetConfig
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class Kind:
    """What we know about one component type."""

    name: str
    model: type
    config: type
    preset: object  # used only for files that carry no config (CompVis single files)
    compvis_prefix: str
    library: str  # "diffusers" or "transformers": folder file names and config format


KINDS: dict[str, Kind] = {
    "unet": Kind("unet", UNetModel, UNetConfig, SD15_UNET, "model.diffusion_model.", "diffusers"),
    "vae": Kind("vae", AutoencoderKL, AutoencoderConfig, SD15_VAE, "first_stage_model.", "diffusers"),
    "text_encoder": Kind("text_encoder", CLIPTextModel, CLIPTextConfig, SD15_CLIP,
                         "cond_stage_model.transformer.", "transformers"),
}
COMPONENTS = tuple(KINDS)

# CompVis LatentDiffusion buffers (ldm/models/diffusion/ddpm.py register_schedule) and EMA counters:
# present in the original files, meaningless to the networks.
COMPVIS_SCHEDULE = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
COMPVIS_TOLERATED = COMPVIS_SCHEDULE + ("logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
EMA_PREFIX = "model_ema."
POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer older transformers versions saved

# Old CompVis/transformers files store the CLIP text tower without the `text_model.` level.
_CLIP_LEGACY_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_SIGNATURES = {  # first dotted names that identify a component in a file without prefixes
    "text_encoder": ("text_model.", "embeddings.", "final_layer_norm.", "encoder.layers."),
    "unet": ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.",
             "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks."),
    "vae": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
}
_DIFFUSERS_MARKERS = {"unet": ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_in."),
                      "vae": (".down_blocks.", ".up_blocks.", ".mid_block.")}


# ---------------------------------------------------------------------------------------
# Locating files: local paths and the local Hugging Face cache (offline only)
# ---------------------------------------------------------------------------------------

def _hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    return [Path("~/.cache/huggingface/hub").expanduser()]


def resolve_path(name_or_path: str | os.PathLike, revision: str = "main") -> Path:
    """An existing local path, or the snapshot of a Hugging Face repo already in the local cache.

    `name_or_path` may be ``ORG/NAME`` or ``ORG/NAME/sub/path`` (a file or folder inside the
    snapshot). The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` with its ``models--ORG--NAME/snapshots/<rev>/`` layout; the
    snapshot is the one ``refs/<revision>`` names (or `revision` itself if it is a snapshot
    hash, or the only snapshot). Nothing is ever downloaded.
    """
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    parts = str(name_or_path).strip("/").split("/")
    if len(parts) < 2 or str(name_or_path).startswith(("/", ".", "~")):
        raise CheckpointError(f"{name_or_path}: no such file or folder")
    repo, sub = f"models--{parts[0]}--{parts[1]}", parts[2:]
    searched = []
    for cache in _hf_cache_dirs():
        root = cache / repo
        searched.append(str(root))
        snaps = root / "snapshots"
        if not snaps.is_dir():
            continue
        ref = root / "refs" / revision
        if ref.is_file():
            snap = snaps / ref.read_text().strip()
        elif (snaps / revision).is_dir():
            snap = snaps / revision
        else:
            found = sorted(d for d in snaps.iterdir() if d.is_dir())
            if len(found) != 1:
                raise CheckpointError(f"{name_or_path}: {root} has no refs/{revision} and {len(found)} snapshots; "
                                      f"pass revision= one of {[d.name for d in found]}")
            snap = found[0]
        target = snap.joinpath(*sub)
        if target.exists():
            return target
        searched[-1] = str(target)
    raise CheckpointError(f"{name_or_path}: not a local path and not in the local Hugging Face cache "
                          f"(looked for {', '.join(searched)}); nothing is downloaded, so fetch it first "
                          f"(e.g. `huggingface-cli download {parts[0]}/{parts[1]}`) or pass a path")


# ---------------------------------------------------------------------------------------
# Reading raw tensors
# ---------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: empty or truncated file ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04" or head[0] == 0x80:  # torch.save zip archive, or legacy pickle
        return "torch"
    n, size = int.from_bytes(head[:8], "little"), path.stat().st_size
    if head[8:9] == b"{":
        if n + 8 > size:
            raise CheckpointError(f"{path}: truncated safetensors file (its header alone needs {n + 8} bytes, "
                                  f"the file has {size})")
        return "safetensors"
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint (unrecognised header bytes {head[:8]!r})")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one file, memory-mapped; any reading problem is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except CheckpointError:
        raise
    except Exception as e:  # truncated archives, bad pickles, safetensors header errors...
        why = ("it holds Python objects other than tensors, which weights_only loading refuses"
               if "Weights only load failed" in str(e) else "the file is truncated or corrupt")
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]}); {why}") from e
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in (obj.get("ldm_metadata") or {}).items() if isinstance(v, str)}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entries are not tensors: {_few(bad)}")
    return dict(obj), meta


def _read_sharded(index: Path):
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except Exception as e:
        raise CheckpointError(f"{index}: unreadable shard index ({e})") from e
    tensors, meta = {}, {}
    for shard in sorted(set(weight_map.values())):
        t, m = read_state_dict(index.parent / shard)
        tensors.update(t)
        meta.update(m)
    missing = set(weight_map) - set(tensors)
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors listed in the index are in no shard: {_few(missing)}")
    return tensors, meta


# ---------------------------------------------------------------------------------------
# Checkpoints: what a file or folder holds, per component
# ---------------------------------------------------------------------------------------

@dataclass
class Part:
    """One component's tensors as found, prefix stripped but not yet renamed."""

    name: str  # unet | vae | text_encoder
    layout: str  # "native" (CompVis names) or "diffusers"
    tensors: dict[str, torch.Tensor]
    config: object | None  # from the checkpoint; None: use the SD-1.5 preset
    source: Path


@dataclass
class Checkpoint:
    path: Path
    format: str  # "compvis" | "diffusers" | "native"
    parts: dict[str, Part]
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # CompVis model_ema.* U-Net tensors
    tolerated: dict[str, torch.Tensor] = field(default_factory=dict)  # schedule buffers, counters, position_ids
    unexpected: dict[str, torch.Tensor] = field(default_factory=dict)  # keys of no known component
    ignored: list[str] = field(default_factory=list)  # pipeline entries we do not load (tokenizer, ...)


def read_checkpoint(path: str | os.PathLike, components: Iterable[str] | None = None,
                    variant: str | None = None) -> Checkpoint:
    """Detect the format and split a file or folder into components (nothing is loaded yet).

    `components` restricts which subfolders of a diffusers pipeline are read; `variant`
    ("fp16") picks ``*.fp16.safetensors`` weights in diffusers folders.
    """
    path = resolve_path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _read_pipeline_folder(path, components, variant)
        if (path / "config.json").is_file():
            ck = Checkpoint(path, "diffusers", {})
            part = _read_component_folder(path, variant, ck.tolerated)
            ck.parts[part.name] = part
            return ck
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: a folder with neither model_index.json nor config.json and "
                                  f"{len(files)} weight files {[p.name for p in files]}; pass one file")
        path = files[0]
    tensors, meta = read_state_dict(path)
    return _split_single_file(path, tensors, meta)


def _parse_config(name: str, d: Mapping, source: Path):
    try:
        if isinstance(d, str):
            d = json.loads(d)
        return KINDS[name].config.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: bad {name} config in the metadata ({e})") from e


def _split_single_file(path: Path, tensors: dict, meta: dict) -> Checkpoint:
    configs = {}
    if "ldm.config" in meta:
        comp = meta.get("ldm.component", "")
        try:
            raw = json.loads(meta["ldm.config"])
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable config in the metadata ({e})") from e
        configs = raw if comp == "pipeline" else {comp: raw}
        configs = {k: _parse_config(k, v, path) for k, v in configs.items() if k in KINDS}
    fmt = meta.get("ldm.format")
    if any(k.startswith(p) for k in tensors for p in (*[kd.compvis_prefix for kd in KINDS.values()], EMA_PREFIX,
                                                      "cond_stage_model.", "model.diffusion_model.")):
        return _split_compvis(path, tensors, configs)
    if meta.get("ldm.component") == "pipeline":  # our native pipeline file: component-name prefixes
        ck = Checkpoint(path, "native", {})
        for name in COMPONENTS:
            sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if sub:
                ck.parts[name] = _make_part(ck.tolerated, name, "native", sub, configs.get(name), path)
        ck.unexpected = {k: v for k, v in tensors.items() if k.split(".", 1)[0] not in KINDS}
        return ck
    # A file without prefixes: one component (or several) told apart by their first names.
    groups: dict[str, dict] = {}
    rest = {}
    for k, v in tensors.items():
        name = next((n for n, sig in _SIGNATURES.items() if k.startswith(sig)), None)
        (groups.setdefault(name, {}) if name else rest)[k] = v
    ck = Checkpoint(path, "native", {}, unexpected=rest)
    for name, sub in groups.items():
        markers = _DIFFUSERS_MARKERS.get(name, ())
        layout = "diffusers" if any(m in k for k in sub for m in markers) else "native"
        if layout == "diffusers":
            ck.format = "diffusers"
        ck.parts[name] = _make_part(ck.tolerated, name, layout, sub, configs.get(name), path)
    if fmt == "native" and ck.format != "native":
        raise CheckpointError(f"{path}: metadata says native format but the keys are {ck.format} names")
    return ck


def _split_compvis(path: Path, tensors: dict, configs: dict) -> Checkpoint:
    ck = Checkpoint(path, "compvis", {})
    subs: dict[str, dict] = {name: {} for name in KINDS}
    for k, v in tensors.items():
        for name, kind in KINDS.items():
            if k.startswith(kind.compvis_prefix):
                subs[name][k[len(kind.compvis_prefix):]] = v
                break
        else:
            if k in COMPVIS_TOLERATED:
                ck.tolerated[k] = v
            elif k.startswith(EMA_PREFIX):
                ck.ema[k] = v
            else:
                ck.unexpected[k] = v
    for name, sub in subs.items():
        if sub:
            ck.parts[name] = _make_part(ck.tolerated, name, "native", sub, configs.get(name), path)
    return ck


def _make_part(tolerated: dict, name: str, layout: str, tensors: dict, config, source: Path) -> Part:
    """Normalise old names; tolerated buffers (position_ids) go to `tolerated`."""
    if name == "text_encoder":
        # Old files omit the `text_model.` level; position_ids is a constant buffer we do not keep.
        tensors = {(k if k.startswith("text_model.") or not k.startswith(_CLIP_LEGACY_ROOTS) else "text_model." + k): v
                   for k, v in tensors.items()}
        if POSITION_IDS in tensors:
            tolerated[POSITION_IDS] = tensors.pop(POSITION_IDS)
    if name == "vae" and layout == "diffusers":
        renames = dk.normalize_legacy_vae_keys(tensors)
        tensors = {renames[k]: v for k, v in tensors.items()}
    return Part(name, layout, tensors, config, source)


def _component_of_config(d: Mapping, source: Path) -> str:
    cls = d.get("_class_name")
    archs = d.get("architectures") or []
    if cls == "UNet2DConditionModel":
        return "unet"
    if cls == "AutoencoderKL":
        return "vae"
    if "CLIPTextModel" in archs or d.get("model_type") == "clip_text_model":
        return "text_encoder"
    if cls == "ControlNetModel":
        raise CheckpointError(f"{source}: a ControlNet folder; load it with controlnet.checkpoint")
    raise CheckpointError(f"{source}: unsupported component (_class_name={cls!r}, architectures={archs})")


def _weights_file(folder: Path, library: str, variant: str | None) -> Path:
    names = dk.WEIGHT_NAMES[library]
    order = [f".{variant}"] if variant else ["", ".fp16", ".bf16"]
    for v in order:
        for pattern in names:
            for candidate in (pattern.format(v=v), pattern.format(v=v) + ".index.json"):
                if (folder / candidate).is_file():
                    return folder / candidate
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no {library} weights{f' for variant {variant!r}' if variant else ''} "
                          f"(looked for {names[0].format(v=order[0])} etc.; found {present})")


def _read_component_folder(folder: Path, variant: str | None, tolerated: dict, expect: str | None = None) -> Part:
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable ({e})") from e
    name = _component_of_config(d, folder)
    if expect and name != expect:
        raise CheckpointError(f"{folder}: model_index.json says {expect} but config.json describes a {name}")
    try:
        config = {"unet": dk.unet_config_from_diffusers, "vae": dk.vae_config_from_diffusers,
                  "text_encoder": dk.clip_config_from_transformers}[name](d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    weights = _weights_file(folder, KINDS[name].library, variant)
    tensors, _ = read_state_dict(weights)
    return _make_part(tolerated, name, "diffusers", tensors, config, weights)


def _read_pipeline_folder(folder: Path, components, variant) -> Checkpoint:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'model_index.json'}: unreadable ({e})") from e
    wanted = set(components) if components is not None else set(KINDS)
    ck = Checkpoint(folder, "diffusers", {})
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if name in KINDS and name in wanted and entry[0] is not None:
            if not (folder / name / "config.json").is_file():
                raise CheckpointError(f"{folder}: model_index.json lists {name} but {folder / name}/config.json is missing")
            ck.parts[name] = _read_component_folder(folder / name, variant, ck.tolerated, expect=name)
        elif name not in KINDS:
            ck.ignored.append(name)
    return ck


# ---------------------------------------------------------------------------------------
# Conversion between layouts (state dicts in, state dicts out; tensors are not copied)
# ---------------------------------------------------------------------------------------

class _SkipInit(TorchFunctionMode):
    """Skip `torch.nn.init` calls while building on the meta device: the values are replaced
    by the checkpoint's anyway, and initialising meta tensors goes through torch._refs, whose
    first use imports torch._dynamo (1-6 s once per process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build_model(name: str, config=None, device: str | torch.device = "meta") -> nn.Module:
    """A component model for `config` (or the preset); on the meta device (the default) it is
    empty, with initialisation skipped, ready for `load_into`."""
    kind = KINDS[name]
    with torch.device(device), (_SkipInit() if torch.device(device).type == "meta" else contextlib.nullcontext()):
        return kind.model(config or kind.preset)


def component_name(model: nn.Module) -> str:
    for name, kind in KINDS.items():
        if type(model) is kind.model:
            return name
    raise TypeError(f"not a component model: {type(model).__name__}")


@lru_cache(maxsize=32)
def _model_shapes(name: str, config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(name, config).state_dict().items()}


@lru_cache(maxsize=32)
def _diffusers_map(name: str, config) -> dict[str, dk.KeyTarget] | None:
    """ours -> diffusers for one component and config; None means the names are the same."""
    keys = _model_shapes(name, config)
    if name == "unet":
        return dk.key_map(dk.UNET_RULES, dk.unet_slots(config), keys)
    if name == "vae":
        return dk.key_map(dk.VAE_RULES, dk.vae_slots(config), keys)
    return None


def native_to_diffusers(name: str, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a native state dict to the diffusers layout; unknown keys raise."""
    km = _diffusers_map(name, config)
    if km is None:
        return dict(state_dict)
    unknown = [k for k in state_dict if k not in km]
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not part of a {name} with this config: {_few(unknown)}")
    return {km[k].key: dk.to_theirs(v, km[k].reshape) for k, v in state_dict.items()}


def diffusers_to_native(name: str, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout state dict to ours. Keys without a rule keep their name, so the
    strict load that follows reports them as unexpected."""
    km = _diffusers_map(name, config)
    if km is None:
        return dict(state_dict)
    inverse = {t.key: (ours, t.reshape) for ours, t in km.items()}
    out = {}
    for k, v in state_dict.items():
        if k in inverse:
            ours, reshape = inverse[k]
            out[ours] = dk.to_ours(v, reshape)
        else:
            out[k] = v
    return out


def compvis_ema_key(unet_key: str) -> str:
    """CompVis LitEma stores `diffusion_model.<key>` with the dots removed under `model_ema.`."""
    return EMA_PREFIX + f"diffusion_model.{unet_key}".replace(".", "")


def part_config(ck: Checkpoint, name: str, override=None):
    if name not in ck.parts:
        held = ", ".join(ck.parts) or "no known component"
        raise CheckpointError(f"{ck.path}: holds no {name} (it holds {held})")
    return override or ck.parts[name].config or KINDS[name].preset


def native_state_dict(ck: Checkpoint, name: str, config=None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The component's tensors under our names (EMA U-Net weights if `ema`)."""
    config = part_config(ck, name, config)
    part = ck.parts[name]
    if ema:
        if name != "unet":
            raise CheckpointError(f"{ck.path}: EMA weights exist only for the unet, not the {name}")
        if not ck.ema:
            raise CheckpointError(f"{ck.path}: has no EMA weights ({EMA_PREFIX}* keys); load with ema=False")
        out, used = {}, set()
        for k in _model_shapes(name, config):
            ek = compvis_ema_key(k)
            if ek in ck.ema:
                out[k] = ck.ema[ek]
                used.add(ek)
        out.update({k: v for k, v in ck.ema.items() if k not in used})  # reported as unexpected
        return out
    if part.layout == "diffusers":
        return diffusers_to_native(name, config, part.tensors)
    return dict(part.tensors)


# ---------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------

def _few(items, n: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _family_hint(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the model family a mismatching file most likely belongs to."""
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


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source=None,
                     allow_unexpected: Iterable[str] = ()) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped keys, if any.

    `allow_unexpected`: fnmatch patterns of extra keys to tolerate (e.g. ``"model_ema.*"``).
    """
    expected = module.state_dict()
    allow = tuple(allow_unexpected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not _matches(k, allow)]
    misshaped = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return
    what = type(module).__name__
    cfg = getattr(module, "cfg", None)
    lines = [f"{source or '<state dict>'}: does not fit {what}" + (f"({cfg})" if cfg is not None else "") + ":"]
    for label, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            lines.append(f"  {len(items)} {label} key{'s' * (len(items) != 1)}: {_few(items)}")
    if misshaped:
        lines.append(f"  {len(misshaped)} mis-shaped key{'s' * (len(misshaped) != 1)}:")
        lines += [f"    {m}" for m in misshaped[:8]] + ([f"    ... ({len(misshaped) - 8} more)"] if len(misshaped) > 8 else [])
    hint = _family_hint(state_dict)
    if hint:
        lines.append(f"  hint: {hint}; this code implements SD-1.x networks")
    raise CheckpointError("\n".join(lines))


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source=None,
              allow_unexpected: Iterable[str] = (), dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> nn.Module:
    """Strictly load `state_dict` into `module` and return it.

    Every key of the module must be present with its shape, and every extra key must match a
    pattern of `allow_unexpected`, else one CheckpointError names `source` and lists them all.
    A module on the meta device gets the tensors themselves (`assign=True`), each cast to
    `dtype` (floating point only) and moved to `device` one by one; a materialised module is
    copied into.
    """
    check_state_dict(module, state_dict, source=source, allow_unexpected=allow_unexpected)
    expected = module.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    if on_meta:
        device = device or "cpu"

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return t.contiguous()

    module.load_state_dict({k: cast(state_dict[k]) for k in expected}, strict=True, assign=on_meta)
    left = [k for k, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors were not materialised: {_few(left)}")
    if not on_meta and (dtype is not None or device is not None):
        module.to(device=device, dtype=dtype)
    return module


# ---------------------------------------------------------------------------------------
# Loading API
# ---------------------------------------------------------------------------------------

def _load_part(ck: Checkpoint, name: str, *, dtype, device, ema: bool, config, allow_unexpected) -> nn.Module:
    config = part_config(ck, name, config)
    sd = native_state_dict(ck, name, config, ema=ema)
    sd.update(ck.unexpected)  # keys of no known component fail the load unless allowed
    model = build_model(name, config)
    source = ck.parts[name].source
    if ck.parts[name].source == ck.path and len(ck.parts) > 1:
        source = f"{ck.path} [{name}]"
    return load_into(model, sd, source=source, allow_unexpected=allow_unexpected, dtype=dtype, device=device)


def _load_one(name, path, dtype, device, ema, config, variant, allow_unexpected):
    ck = read_checkpoint(path, components=[name], variant=variant)
    return _load_part(ck, name, dtype=dtype, device=device, ema=ema, config=config, allow_unexpected=allow_unexpected)


def load_unet(path, dtype: torch.dtype | None = torch.float32, device="cpu", ema: bool = False,
              config: UNetConfig | None = None, variant: str | None = None,
              allow_unexpected: Iterable[str] = ()) -> UNetModel:
    """The U-Net of a file, component folder or pipeline folder (`ema`: CompVis EMA weights)."""
    return _load_one("unet", path, dtype, device, ema, config, variant, allow_unexpected)


def load_vae(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: AutoencoderConfig | None = None,
             variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> AutoencoderKL:
    return _load_one("vae", path, dtype, device, False, config, variant, allow_unexpected)


def load_text_encoder(path, dtype: torch.dtype | None = torch.float32, device="cpu",
                      config: CLIPTextConfig | None = None, variant: str | None = None,
                      allow_unexpected: Iterable[str] = ()) -> CLIPTextModel:
    return _load_one("text_encoder", path, dtype, device, False, config, variant, allow_unexpected)


def load_components(path, dtype: torch.dtype | None = torch.float32, device="cpu", ema: bool = False,
                    components: Iterable[str] | None = None, configs: Mapping[str, object] | None = None,
                    variant: str | None = None, allow_unexpected: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every component the file/folder holds (or those named), as {"unet", "vae", "text_encoder"} models.

    `dtype=None` keeps each tensor's dtype from the file.
    """
    ck = read_checkpoint(path, components=components, variant=variant)
    names = [n for n in COMPONENTS if n in ck.parts and (components is None or n in components)]
    if components is not None:
        absent = [n for n in components if n not in ck.parts]
        if absent:
            part_config(ck, absent[0])  # raises with what the checkpoint does hold
    if not names:
        raise CheckpointError(f"{ck.path}: holds no unet, vae or text encoder"
                              + (f" (unrecognised keys: {_few(ck.unexpected)})" if ck.unexpected else ""))
    configs = configs or {}
    return {n: _load_part(ck, n, dtype=dtype, device=device, ema=ema and n == "unet", config=configs.get(n),
                          allow_unexpected=allow_unexpected) for n in names}


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def _atomic_file(dst: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: exists (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _atomic_dir(dst: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: exists (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _host_tensors(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in sd.items():
        t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else None)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.contiguous().clone()  # a view: save only its own elements
        out[k] = t
    return out


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], fmt: str) -> None:
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:  # CompVis .ckpt layout; extra top-level entries are ignored by other tools
        torch.save({"state_dict": tensors, "ldm_metadata": metadata}, path)


def _as_dict(models) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {component_name(models): models}
    out = dict(models)
    for name, m in out.items():
        if name not in KINDS or component_name(m) != name:
            raise TypeError(f"{name!r}: expected one of {COMPONENTS} holding its model, got {type(m).__name__}")
    return out


def _metadata(models: dict[str, nn.Module], fmt: str) -> dict[str, str]:
    if len(models) == 1:
        (name, m), = models.items()
        return {"ldm.format": fmt, "ldm.format_version": FORMAT_VERSION, "ldm.component": name,
                "ldm.config": m.cfg.to_json()}
    return {"ldm.format": fmt, "ldm.format_version": FORMAT_VERSION, "ldm.component": "pipeline",
            "ldm.config": json.dumps({n: m.cfg.to_dict() for n, m in models.items()}, sort_keys=True)}


def _file_format(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "torch"
    raise CheckpointError(f"{path}: unknown extension; use .safetensors or .ckpt")


def save_native(path, models, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """One component (a model) or several ({name: model}) as safetensors in our key space.

    The metadata holds the config JSON, the component name and the format version, so the
    file loads whatever its sizes. Several components get `<name>.` key prefixes.
    """
    models = _as_dict(models)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    if len(models) == 1:
        (m,) = models.values()
        sd = m.state_dict()
    else:
        sd = {f"{n}.{k}": v for n, m in models.items() for k, v in m.state_dict().items()}
    meta = _metadata(models, "native")
    return _atomic_file(path, lambda tmp: _write_tensors(tmp, _host_tensors(sd, dtype), meta, "safetensors"),
                        overwrite)


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


def compvis_state_dict(models) -> dict[str, torch.Tensor]:
    """{name: model} -> one CompVis single-file state dict (prefixed keys, schedule buffers with a U-Net)."""
    models = _as_dict(models)
    sd = {KINDS[n].compvis_prefix + k: v for n, m in models.items() for k, v in m.state_dict().items()}
    if "unet" in models:
        sd.update(compvis_schedule_buffers())
    return sd


def save_compvis(path, models, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A CompVis single file (``.safetensors`` or ``.ckpt``) that other SD-1.x tools open.

    Our configs ride along in the metadata (ignored by other tools), so non-SD-1.5 sizes reload.
    """
    models = _as_dict(models)
    path = Path(path)
    fmt = _file_format(path)
    meta = _metadata(models, "compvis")
    sd = compvis_state_dict(models)
    return _atomic_file(path, lambda tmp: _write_tensors(tmp, _host_tensors(sd, dtype), meta, fmt), overwrite)


def _write_component_folder(folder: Path, name: str, model: nn.Module, dtype, variant: str | None) -> None:
    kind = KINDS[name]
    folder.mkdir(parents=True, exist_ok=True)
    to_json = {"unet": dk.unet_config_to_diffusers, "vae": dk.vae_config_to_diffusers,
               "text_encoder": dk.clip_config_to_transformers}[name]
    config = to_json(model.cfg)
    if name == "text_encoder":
        config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sd = native_to_diffusers(name, model.cfg, model.state_dict())
    weights = dk.WEIGHT_NAMES[kind.library][0].format(v=f".{variant}" if variant else "")
    _write_tensors(folder / weights, _host_tensors(sd, dtype), {"format": "pt"}, "safetensors")


def save_diffusers(folder, models, dtype: torch.dtype | None = None, variant: str | None = None,
                   overwrite: bool = False, copy_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """Export to the diffusers layout, written atomically (to a temporary folder, then renamed).

    A single model gives a component folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
    or transformers' ``model.safetensors``); a {name: model} dict gives a pipeline folder with
    ``model_index.json``, one subfolder per component and the SD-1.x scheduler config.
    `copy_dirs` (e.g. a source pipeline's ``tokenizer/``) are copied in and listed in the index.
    """
    single = isinstance(models, nn.Module)
    models = _as_dict(models)

    def write(tmp: Path) -> None:
        if single:
            (name, m), = models.items()
            _write_component_folder(tmp, name, m, dtype, variant)
            return
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": dk.DIFFUSERS_VERSION}
        for name, m in models.items():
            _write_component_folder(tmp / name, name, m, dtype, variant)
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

    return _atomic_dir(Path(folder), write, overwrite)


# ---------------------------------------------------------------------------------------
# Inspection, conversion and the CLI
# ---------------------------------------------------------------------------------------

def describe(path, variant: str | None = None) -> dict:
    """What a checkpoint holds, without loading tensor data: format, per-component config,
    dtypes, parameter counts and fit, EMA, tolerated and unexpected extras."""
    ck = read_checkpoint(path, variant=variant)
    out = {"path": str(ck.path), "format": ck.format, "components": {},
           "ema": {"present": bool(ck.ema), "tensors": len(ck.ema)},
           "tolerated": sorted(ck.tolerated), "unexpected": sorted(ck.unexpected), "ignored": ck.ignored}
    for name, part in ck.parts.items():
        cfg = part_config(ck, name)
        sd = native_state_dict(ck, name, cfg)
        shapes = _model_shapes(name, cfg)
        info = {
            "layout": part.layout, "source": str(part.source),
            "config_from": "checkpoint" if part.config is not None else "SD-1.5 preset",
            "config": cfg.to_dict(), "tensors": len(part.tensors),
            "parameters": sum(t.numel() for t in part.tensors.values()),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in part.tensors.values()}),
            "missing": sum(k not in sd for k in shapes),
            "unexpected": sum(k not in shapes for k in sd),
            "mis_shaped": sum(k in sd and tuple(sd[k].shape) != s for k, s in shapes.items()),
        }
        info["fits"] = not (info["missing"] or info["unexpected"] or info["mis_shaped"])
        out["components"][name] = info
    hint = _family_hint({**ck.unexpected, **{k: v for p in ck.parts.values() for k, v in p.tensors.items()}})
    if hint:
        out["hint"] = hint
    return out


def _format_description(d: dict) -> str:
    lines = [f"path:    {d['path']}", f"format:  {d['format']}"]
    for name, c in d["components"].items():
        fit = "fits" if c["fits"] else (f"DOES NOT FIT: {c['missing']} missing, {c['unexpected']} unexpected, "
                                        f"{c['mis_shaped']} mis-shaped")
        lines.append(f"{name}: {c['parameters']:,} parameters in {c['tensors']} tensors, "
                     f"{'/'.join(c['dtypes'])}, {c['layout']} names, {fit}")
        lines.append(f"    config ({c['config_from']}): {json.dumps(c['config'])}")
    lines.append(f"EMA:     {'present (%d tensors)' % d['ema']['tensors'] if d['ema']['present'] else 'none'}")
    lines.append(f"tolerated extras: {len(d['tolerated'])}" + (f" ({_few(d['tolerated'], 4)})" if d['tolerated'] else ""))
    lines.append(f"unexpected: {len(d['unexpected'])}" + (f" ({_few(d['unexpected'])})" if d['unexpected'] else ""))
    if d["ignored"]:
        lines.append(f"not loaded: {', '.join(d['ignored'])}")
    if "hint" in d:
        lines.append(f"hint:    {d['hint']}")
    return "\n".join(lines)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert(src, dst, to: str, dtype: torch.dtype | None = None, ema: bool = False, variant: str | None = None,
            overwrite: bool = False, allow_unexpected: Iterable[str] = ()) -> Path:
    """Convert any supported checkpoint to `to` = "native" | "diffusers" | "compvis".

    The source is strictly loaded first (so a broken or foreign file fails here, not later),
    with mmap'd tensors assigned, not copied.
    """
    src = resolve_path(src)
    models = load_components(src, dtype=None, ema=ema, variant=variant, allow_unexpected=allow_unexpected)
    one = next(iter(models.values())) if len(models) == 1 else models
    if to == "native":
        return save_native(dst, one, dtype=dtype, overwrite=overwrite)
    if to == "compvis":
        return save_compvis(dst, models, dtype=dtype, overwrite=overwrite)
    if to == "diffusers":
        tok = src / "tokenizer"
        copy = [tok] if src.is_dir() and (src / "model_index.json").is_file() and tok.is_dir() else []
        return save_diffusers(dst, one, dtype=dtype, variant=variant, overwrite=overwrite, copy_dirs=copy)
    raise CheckpointError(f"unknown target format {to!r}; expected native, diffusers or compvis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print format, components, configs, dtypes, parameter counts, EMA, extras")
    p.add_argument("path", help="file, component folder, pipeline folder or ORG/NAME in the local HF cache")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p = sub.add_parser("convert", help="convert to native safetensors, a diffusers folder or a CompVis file")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=("native", "diffusers", "compvis"))
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--ema", action="store_true", help="take the U-Net from the CompVis EMA weights")
    p.add_argument("--variant", default=None, help="diffusers weight variant to read and write, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--allow-unexpected", action="append", default=[], metavar="PATTERN",
                   help="tolerate extra keys matching this fnmatch pattern (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "inspect":
            d = describe(args.path, variant=args.variant)
            print(json.dumps(d, indent=2) if args.json else _format_description(d))
        else:
            out = convert(args.src, args.dst, args.to, dtype=DTYPES.get(args.dtype), ema=args.ema,
                          variant=args.variant, overwrite=args.overwrite, allow_unexpected=args.allow_unexpected)
            print(f"wrote {out}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
