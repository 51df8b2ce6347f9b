"""Checkpoints of any component kind: detect the format, split into components, convert names,
load strictly, save in every layout, describe; the ``inspect`` / ``convert`` CLI.

A `Kind` describes one component type: the SD U-Net, VAE and text encoder (`ldm.checkpoint`),
the ControlNet (`controlnet.checkpoint`). It carries its model and config classes, the preset
for files without a config, its single-file prefix, the key names that identify it in a file
without prefixes, its diffusers rule table and slots (`ldm.diffusers_keys`) and its config
converters. Every function here takes the kinds it should know, so a package adds a kind by
passing it in; nothing here knows a particular network.

Layouts of one component's tensors: "native" (our names, the CompVis / lllyasviel names without
prefix) or "diffusers". Formats of a file or folder:
  - "compvis": one file whose keys carry the kinds' prefixes (``model.diffusion_model.``,
    ``first_stage_model.``, ``control_model.``, ...), next to the LatentDiffusion schedule
    buffers (tolerated by name) and the CompVis EMA weights (``model_ema.``, loaded on request);
  - "diffusers": a pipeline folder (``model_index.json`` and one subfolder per component; a
    folder whose index was lost is recognised by its subfolders' ``config.json``), a component
    folder (``config.json`` + weights, ``fp16`` variants, sharded ``.index.json``), or one file
    with diffusers names;
  - "native": our safetensors files, the config JSON in the metadata (``ldm.component``,
    ``ldm.config``); several components carry ``<name>.`` key prefixes.

Loading builds the model on the meta device from the checkpoint's own config (the kind's preset
only for files that carry none), checks every key and shape (`ldm.weights.load_into`: one
CheckpointError listing missing / unexpected / mis-shaped keys), then assigns the (mmap'd)
tensors, cast one by one.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ldm import cli
from ldm import diffusers_keys as dk
from ldm import weights
from ldm.atomic import atomic_dir
from ldm.hub import resolve_path
from ldm.weights import CheckpointError, few

FORMAT_VERSION = "1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# CompVis LatentDiffusion buffers (ldm/models/diffusion/ddpm.py register_schedule) and EMA counters:
# present in the original files, meaningless to the networks.
COMPVIS_SCHEDULE = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
COMPVIS_TOLERATED = COMPVIS_SCHEDULE + ("logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
EMA_PREFIX = "model_ema."
# Key starts that make a file "compvis" besides the kinds' prefixes: its EMA copy, and text
# encoders we do not implement (SD-2's OpenCLIP under cond_stage_model.model.), which then show
# up as unexpected keys of a CompVis file.
COMPVIS_ROOTS = (EMA_PREFIX, "cond_stage_model.")


@dataclass(frozen=True, eq=False)
class Kind:
    """One component type, with everything the generic code needs to know about it."""

    name: str  # the `ldm.component` metadata value and the pipeline subfolder name
    title: str  # for messages ("U-Net")
    model: Callable[..., nn.Module]  # built as model(config)
    config: type  # a config dataclass with to_dict / to_json / from_dict
    preset: object  # the config of files that carry none
    preset_name: str  # how messages name the preset
    prefix: str  # of its keys in a single file (CompVis, lllyasviel)
    signatures: tuple[str, ...]  # first names of its keys, in either layout, in a file without prefixes
    classes: tuple[str, ...]  # config.json `_class_name` / `architectures` / `model_type` values it reads
    library: str  # "diffusers" or "transformers": the weight file names of its folders
    # config.json (and the folder's tensors) -> (config, where it came from); and back
    config_from_diffusers: Callable[[Mapping, Mapping[str, torch.Tensor]], tuple[object, str]]
    config_to_diffusers: Callable[[object], dict]
    rules: tuple[dk.Rule, ...] = ()  # our names <-> diffusers names; none: the names are the same
    slots: Callable[[object], Mapping[str, list[dict]]] | None = None  # what fills the rules' placeholders
    diffusers_markers: tuple[str, ...] = ()  # key starts that only the diffusers layout has
    markers: tuple[str, ...] = ()  # when set, a file without prefixes holds this kind only if a key starts so
    config_attr: str = "cfg"  # the model attribute holding its config
    file_format: str = "compvis"  # the name of its prefixed single-file format
    normalize: Callable[[dict, str, dict], dict] | None = None  # (tensors, layout, tolerated) -> current names
    from_weights: Callable[[object, Mapping[str, torch.Tensor]], tuple[object, str]] | None = None  # preset -> (completed, note)
    ema_key: Callable[[str], str] | None = None  # our key -> its CompVis EMA key; None: no EMA weights
    file_extras: Callable[[], dict[str, torch.Tensor]] | None = None  # written next to it in a prefixed file
    hint: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None  # names the family of a misfit
    summary: Callable[[object], str] | None = None  # one line about a config, for describe and errors
    format_of: Callable[[Checkpoint], str] | None = None  # the checkpoint's format as this kind names it
    absent: Callable[[Checkpoint], str] | None = None  # the error for a checkpoint without this kind

    def build(self, config=None, device: str | torch.device = "meta") -> nn.Module:
        """A model for `config` (or the preset); on the meta device (the default) it is empty,
        with initialisation skipped, ready for `load_into`."""
        return weights.build_empty(self.model, config or self.preset, device=device)

    def config_of(self, model: nn.Module):
        return getattr(model, self.config_attr)


def json_config(convert: Callable[[Mapping], object]) -> Callable[[Mapping, Mapping], tuple[object, str]]:
    """A kind's `config_from_diffusers` for a converter that needs config.json alone."""
    return lambda d, tensors: (convert(d), "config.json")


def kind_named(kinds: Sequence[Kind], name: str) -> Kind:
    for kind in kinds:
        if kind.name == name:
            return kind
    raise KeyError(f"unknown component {name!r}; expected one of {[k.name for k in kinds]}")


# ---------------------------------------------------------------------------------------
# Reading: what a file or folder holds, per component
# ---------------------------------------------------------------------------------------

@dataclass
class Part:
    """One component's tensors as found: prefix stripped, not yet renamed."""

    kind: Kind
    layout: str  # "native" or "diffusers"
    tensors: dict[str, torch.Tensor]
    config: object | None  # from the checkpoint; None: `default` applies
    default: object | None  # the kind's preset, completed from the weights where the kind can
    source: Path  # the file holding the tensors
    config_from: str  # where the config comes from, for messages
    format: str = ""  # the checkpoint's format, as the kind names it

    @property
    def name(self) -> str:
        return self.kind.name


@dataclass
class Checkpoint:
    path: Path
    format: str  # "compvis" | "diffusers" | "native"
    kinds: Sequence[Kind]  # what it was read with
    parts: dict[str, Part] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # CompVis model_ema.* tensors
    tolerated: dict[str, torch.Tensor] = field(default_factory=dict)  # schedule buffers, counters, ...
    unexpected: dict[str, torch.Tensor] = field(default_factory=dict)  # keys of no known component
    ignored: list[str] = field(default_factory=list)  # pipeline entries not read (tokenizer, ...)


def read_checkpoint(path, kinds: Sequence[Kind], components: Iterable[str] | None = None,
                    variant: str | None = None, presets: Mapping[str, object] | None = None) -> Checkpoint:
    """Detect the format and split a file or folder into parts of `kinds` (nothing is loaded yet).

    `components` restricts which subfolders of a pipeline folder are read; `variant` ("fp16")
    picks ``*.fp16.safetensors`` weights in diffusers folders; `presets` ({name: config})
    replace kinds' presets for files that carry no config.
    """
    path = resolve_path(path)
    presets = dict(presets or {})
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        ck = Checkpoint(path, "diffusers", kinds)
        part = _read_component_folder(path, kinds, variant, presets, ck.tolerated)
        ck.parts[part.name] = part
    elif path.is_dir() and (entries := _pipeline_entries(path)) is not None:
        ck = _read_pipeline_folder(path, entries, kinds, components, variant, presets)
    else:
        file = _only_weights_file(path) if path.is_dir() else path
        tensors, meta = weights.read_state_dict(file)
        ck = _split_file(file, tensors, meta, kinds, presets)
    for part in ck.parts.values():
        part.format = part.kind.format_of(ck) if part.kind.format_of else ck.format
    return ck


def _pipeline_entries(folder: Path) -> dict[str, bool] | None:
    """{entry: has a component} of a pipeline folder, from model_index.json; for a folder that
    lost its index, its subfolders holding a config.json. None: not a pipeline folder."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            d = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{index}: unreadable ({e})") from e
        return {name: entry[0] is not None for name, entry in d.items()
                if not name.startswith("_") and isinstance(entry, list)}
    subfolders = {d.name: True for d in sorted(folder.iterdir()) if (d / "config.json").is_file()}
    return subfolders or None


def _only_weights_file(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix in weights.WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise CheckpointError(f"{folder}: a folder with no model_index.json, config.json or component subfolders "
                              f"and {len(files)} weight files {[p.name for p in files]}; pass one file")
    return files[0]


def _read_pipeline_folder(folder: Path, entries: Mapping[str, bool], kinds: Sequence[Kind], components,
                          variant: str | None, presets: Mapping[str, object]) -> Checkpoint:
    known = {k.name for k in kinds}
    wanted = set(components) if components is not None else known
    ck = Checkpoint(folder, "diffusers", kinds)
    for name, present in entries.items():
        if name not in known or name not in wanted:
            ck.ignored.append(name)
        elif present:
            if not (folder / name / "config.json").is_file():
                raise CheckpointError(f"{folder}: model_index.json lists {name} but {folder / name}/config.json is missing")
            ck.parts[name] = _read_component_folder(folder / name, kinds, variant, presets, ck.tolerated, expect=name)
    return ck


def _kind_of_config(d: Mapping, kinds: Sequence[Kind], folder: Path) -> Kind:
    names = {d.get("_class_name"), d.get("model_type"), *(d.get("architectures") or [])}
    for kind in kinds:
        if names.intersection(kind.classes):
            return kind
    what = d.get("_class_name") or d.get("architectures") or "model without _class_name"
    raise CheckpointError(f"{folder}: config.json describes a {what}, which is not a "
                          f"{' / '.join(k.classes[0] for k in kinds)}")


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


def _read_component_folder(folder: Path, kinds: Sequence[Kind], variant: str | None, presets: Mapping[str, object],
                           tolerated: dict, expect: str | None = None) -> Part:
    config_path = folder / "config.json"
    try:
        d = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: unreadable ({e})") from e
    kind = _kind_of_config(d, kinds, folder)
    if expect and kind.name != expect:
        raise CheckpointError(f"{folder}: the pipeline's {expect} folder, but config.json describes a {kind.name}")
    source = _weights_file(folder, kind.library, variant)
    tensors, _ = weights.read_state_dict(source)
    try:
        config, config_from = kind.config_from_diffusers(d, tensors)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    return _make_part(kind, "diffusers", tensors, config, config_from, source, tolerated, presets)


def _split_file(path: Path, tensors: dict, meta: dict, kinds: Sequence[Kind], presets: Mapping[str, object]
                ) -> Checkpoint:
    ck = Checkpoint(path, "native", kinds, metadata=meta)
    configs = _metadata_configs(path, meta, kinds)
    if any(key.startswith((*(k.prefix for k in kinds), *COMPVIS_ROOTS)) for key in tensors):
        ck.format = "compvis"
        groups = _split_prefixed(ck, tensors, kinds)
    elif meta.get("ldm.component") == "pipeline":  # our native pipeline file: component-name prefixes
        groups = _split_named(ck, tensors, kinds)
    else:  # no prefixes: one component (or several) told apart by their first names
        groups = _split_signatures(ck, tensors, kinds)
    for kind in kinds:
        if groups.get(kind.name):
            sub = groups[kind.name]
            layout = "diffusers" if any(k.startswith(kind.diffusers_markers) for k in sub) else "native"
            if layout == "diffusers" and ck.format == "native":
                ck.format = "diffusers"
            config = configs.get(kind.name)
            ck.parts[kind.name] = _make_part(kind, layout, sub, config, "checkpoint", path, ck.tolerated, presets)
    if meta.get("ldm.format") == "native" and ck.format != "native":
        raise CheckpointError(f"{path}: metadata says native format but the keys are {ck.format} names")
    return ck


def _split_prefixed(ck: Checkpoint, tensors: dict, kinds: Sequence[Kind]) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for key, v in tensors.items():
        kind = next((k for k in kinds if key.startswith(k.prefix)), None)
        if kind is not None:
            groups.setdefault(kind.name, {})[key[len(kind.prefix):]] = v
        elif key in COMPVIS_TOLERATED:
            ck.tolerated[key] = v
        elif key.startswith(EMA_PREFIX):
            ck.ema[key] = v
        else:
            ck.unexpected[key] = v
    return groups


def _split_named(ck: Checkpoint, tensors: dict, kinds: Sequence[Kind]) -> dict[str, dict]:
    known = {k.name for k in kinds}
    groups: dict[str, dict] = {}
    for key, v in tensors.items():
        name, _, rest = key.partition(".")
        if name in known:
            groups.setdefault(name, {})[rest] = v
        else:
            ck.unexpected[key] = v
    return groups


def _split_signatures(ck: Checkpoint, tensors: dict, kinds: Sequence[Kind]) -> dict[str, dict]:
    # The longest matching signature wins (an old CLIP file's "encoder.layers." is not a VAE's
    # "encoder."). A kind with markers takes part only when they are present, and then wins
    # ties: a ControlNet file also has U-Net encoder names, which are then the ControlNet's.
    present = [k for k in kinds if not k.markers or any(key.startswith(k.markers) for key in tensors)]
    present.sort(key=lambda k: not k.markers)
    groups: dict[str, dict] = {}
    for key, v in tensors.items():
        matches = [(len(s), k) for k in present for s in k.signatures if key.startswith(s)]
        kind = max(matches, key=lambda m: m[0], default=(0, None))[1]
        if kind is not None:
            groups.setdefault(kind.name, {})[key] = v
        else:
            ck.unexpected[key] = v
    return groups


def _metadata_configs(path: Path, meta: Mapping[str, str], kinds: Sequence[Kind]) -> dict[str, object]:
    """{name: config} from our safetensors metadata (one component, or a pipeline's several)."""
    if "ldm.config" not in meta:
        return {}
    try:
        raw = json.loads(meta["ldm.config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable config in the metadata ({e})") from e
    component = meta.get("ldm.component", "")
    raw = raw if component == "pipeline" else {component: raw}
    out = {}
    for kind in kinds:
        if kind.name in raw:
            try:
                out[kind.name] = kind.config.from_dict(raw[kind.name])
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: bad {kind.name} config in the metadata ({e})") from e
    return out


def _make_part(kind: Kind, layout: str, tensors: dict, config, config_from: str, source: Path, tolerated: dict,
               presets: Mapping[str, object]) -> Part:
    """Current names for old ones (tolerated buffers go to `tolerated`); for a part without a
    config, the preset it will use, completed from the weights where the kind can."""
    if kind.normalize is not None:
        tensors = kind.normalize(tensors, layout, tolerated)
    default = None
    if config is None:
        default = presets.get(kind.name) or kind.preset
        config_from = kind.preset_name if kind.name not in presets else "the given config"
        if kind.from_weights is not None:
            default, note = kind.from_weights(default, tensors)
            config_from += note
    return Part(kind, layout, tensors, config, default, source, config_from)


# ---------------------------------------------------------------------------------------
# Conversion between layouts (state dicts in, state dicts out; tensors are not copied)
# ---------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def model_shapes(kind: Kind, config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in kind.build(config).state_dict().items()}


@lru_cache(maxsize=32)
def diffusers_map(kind: Kind, config) -> dict[str, dk.KeyTarget] | None:
    """ours -> diffusers for one kind and config; None means the names are the same."""
    if not kind.rules:
        return None
    return dk.key_map(kind.rules, kind.slots(config), model_shapes(kind, config))


def to_diffusers(kind: Kind, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a native state dict to the diffusers layout; unknown keys raise."""
    km = diffusers_map(kind, config)
    if km is None:
        return dict(state_dict)
    unknown = [k for k in state_dict if k not in km]
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not part of a {kind.title} with this config: {few(unknown)}")
    return {km[k].key: dk.to_theirs(v, km[k].reshape) for k, v in state_dict.items()}


def from_diffusers(kind: Kind, config, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout state dict to ours. Keys without a rule keep their name, so the
    strict load that follows reports them as unexpected."""
    km = diffusers_map(kind, config)
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


def part_config(ck: Checkpoint, name: str, override=None):
    """The config `name` loads with: `override`, else the checkpoint's, else the completed preset."""
    if name not in ck.parts:
        kind = next((k for k in ck.kinds if k.name == name), None)
        if kind is not None and kind.absent is not None:
            raise CheckpointError(kind.absent(ck))
        raise CheckpointError(f"{ck.path}: holds no {name} (it holds {', '.join(ck.parts) or 'no known component'})")
    part = ck.parts[name]
    return override or part.config or part.default


def native_state_dict(ck: Checkpoint, name: str, config=None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The component's tensors under our names (its CompVis EMA weights if `ema`)."""
    config = part_config(ck, name, config)
    part = ck.parts[name]
    if ema:
        if part.kind.ema_key is None:
            has = " / ".join(k.name for k in ck.kinds if k.ema_key is not None) or "no component"
            raise CheckpointError(f"{ck.path}: EMA weights exist for the {has} only, not the {name}")
        if not ck.ema:
            raise CheckpointError(f"{ck.path}: has no EMA weights ({EMA_PREFIX}* keys); load with ema=False")
        out, used = {}, set()
        for k in model_shapes(part.kind, config):
            ek = part.kind.ema_key(k)
            if ek in ck.ema:
                out[k] = ck.ema[ek]
                used.add(ek)
        out.update({k: v for k, v in ck.ema.items() if k not in used})  # reported as unexpected
        return out
    if part.layout == "diffusers":
        return from_diffusers(part.kind, config, part.tensors)
    return dict(part.tensors)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def load_part(ck: Checkpoint, name: str, *, dtype: torch.dtype | None = torch.float32,
              device: str | torch.device = "cpu", ema: bool = False, config=None,
              allow_unexpected: Iterable[str] = ()) -> nn.Module:
    """Build `name` on the meta device and strictly load its tensors (`config` overrides the
    checkpoint's). Keys of no known component fail the load unless `allow_unexpected` covers them."""
    given = config
    config = part_config(ck, name, config)
    part = ck.parts[name]
    sd = native_state_dict(ck, name, config, ema=ema)
    sd.update(ck.unexpected)
    source = f"{ck.path} [{name}]" if part.source == ck.path and len(ck.parts) > 1 else part.source
    try:
        return weights.load_into(part.kind.build(config), sd, source=source, allow_unexpected=allow_unexpected,
                                 dtype=dtype, device=device, hint=part.kind.hint)
    except CheckpointError as e:
        about = part.kind.title + (f", {part.kind.summary(config)}" if part.kind.summary else "")
        how = "the caller" if given is not None else part.config_from
        raise CheckpointError(f"{e}\n  ({about}; config from {how}; {part.format} checkpoint, "
                              f"{part.layout} names)") from None


def load_components(path, kinds: Sequence[Kind], *, components: Iterable[str] | None = None,
                    dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu", ema: bool = False,
                    configs: Mapping[str, object] | None = None, variant: str | None = None,
                    allow_unexpected: Iterable[str] = (), presets: Mapping[str, object] | None = None
                    ) -> dict[str, nn.Module]:
    """Every component the file or folder holds (or those named), as {name: model} in `kinds`
    order. `ema` takes the kinds' EMA weights where they have some; `dtype=None` keeps each
    tensor's dtype from the file."""
    components = list(components) if components is not None else None
    ck = read_checkpoint(path, kinds, components=components, variant=variant, presets=presets)
    for name in components or ():
        part_config(ck, name)  # raises for an absent one, saying what the checkpoint does hold
    names = [k.name for k in kinds if k.name in ck.parts and (components is None or k.name in components)]
    if not names:
        raise CheckpointError(f"{ck.path}: holds no {', '.join(k.name for k in kinds)}"
                              + (f" (unrecognised keys: {few(ck.unexpected)})" if ck.unexpected else ""))
    configs = configs or {}
    return {n: load_part(ck, n, dtype=dtype, device=device, ema=ema and ck.parts[n].kind.ema_key is not None,
                         config=configs.get(n), allow_unexpected=allow_unexpected) for n in names}


# ---------------------------------------------------------------------------------------
# Saving: {name: model} in `kinds`
# ---------------------------------------------------------------------------------------

def metadata(models: Mapping[str, nn.Module], kinds: Sequence[Kind], fmt: str) -> dict[str, str]:
    """Our safetensors metadata: the format, its version, the component and its config JSON."""
    configs = {n: kind_named(kinds, n).config_of(m) for n, m in models.items()}
    out = {"ldm.format": fmt, "ldm.format_version": FORMAT_VERSION}
    if len(configs) == 1:
        (name, cfg), = configs.items()
        return {**out, "ldm.component": name, "ldm.config": cfg.to_json()}
    return {**out, "ldm.component": "pipeline",
            "ldm.config": json.dumps({n: cfg.to_dict() for n, cfg in configs.items()}, sort_keys=True)}


def save_native(path, models: Mapping[str, nn.Module], kinds: Sequence[Kind], dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """One component or several as safetensors in our key space, with their configs in the
    metadata, so the file loads whatever its sizes. Several components get `<name>.` key prefixes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    if len(models) == 1:
        (m,) = models.values()
        sd = m.state_dict()
    else:
        sd = {f"{n}.{k}": v for n, m in models.items() for k, v in m.state_dict().items()}
    return weights.save_tensors(path, sd, metadata(models, kinds, "native"), dtype=dtype, overwrite=overwrite)


def prefixed_state_dict(models: Mapping[str, nn.Module], kinds: Sequence[Kind]) -> dict[str, torch.Tensor]:
    """{name: model} -> one single-file state dict: each kind's prefix, and its extras."""
    sd = {}
    for name, m in models.items():
        kind = kind_named(kinds, name)
        sd.update({kind.prefix + k: v for k, v in m.state_dict().items()})
        if kind.file_extras is not None:
            sd.update(kind.file_extras())
    return sd


def save_prefixed(path, models: Mapping[str, nn.Module], kinds: Sequence[Kind], dtype: torch.dtype | None = None,
                  overwrite: bool = False) -> Path:
    """A single file (``.safetensors`` or a torch ``.ckpt/.pth``) in the kinds' prefixed format
    that other SD-1.x tools open. Our configs ride along in the metadata (ignored by other
    tools), so non-SD-1.5 sizes reload."""
    path = Path(path)
    if path.suffix not in weights.WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown extension; use .safetensors, .ckpt or .pth")
    fmt = kind_named(kinds, next(iter(models))).file_format
    return weights.save_tensors(path, prefixed_state_dict(models, kinds), metadata(models, kinds, fmt),
                                dtype=dtype, overwrite=overwrite)


def write_component_folder(folder: Path, kind: Kind, model: nn.Module, dtype: torch.dtype | None = None,
                           variant: str | None = None) -> None:
    """A diffusers / transformers component folder (config.json + weights) that their
    ``from_pretrained`` loads; written in place (see `save_component`)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = kind.config_of(model)
    config = kind.config_to_diffusers(cfg)
    if kind.library == "transformers":
        config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sd = to_diffusers(kind, cfg, model.state_dict())
    name = dk.WEIGHT_NAMES[kind.library][0].format(v=f".{variant}" if variant else "")
    weights.write_tensors(folder / name, weights.host_tensors(sd, dtype), {"format": "pt"})


def save_component(path, kind: Kind, model: nn.Module, dtype: torch.dtype | None = None, variant: str | None = None,
                   overwrite: bool = False) -> Path:
    """One component in the diffusers layout, written atomically: a component folder, or for a
    path ending in ``.safetensors`` one file with diffusers names and our config in the metadata."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = to_diffusers(kind, kind.config_of(model), model.state_dict())
        return weights.save_tensors(path, sd, metadata({kind.name: model}, (kind,), "diffusers"), dtype=dtype,
                                    overwrite=overwrite)
    weights.refuse_overwrite(path, overwrite)
    with atomic_dir(path) as tmp:
        write_component_folder(tmp, kind, model, dtype, variant)
    return path


def save_as(path, models: Mapping[str, nn.Module], to: str, kinds: Sequence[Kind], dtype: torch.dtype | None = None,
            variant: str | None = None, overwrite: bool = False) -> Path:
    """Write `models` in format `to`: "native", "diffusers" (one component) or the kinds'
    prefixed single-file format ("compvis", "lllyasviel")."""
    prefixed = {kind_named(kinds, n).file_format for n in models}
    if to == "native":
        return save_native(path, models, kinds, dtype=dtype, overwrite=overwrite)
    if to in prefixed:
        return save_prefixed(path, models, kinds, dtype=dtype, overwrite=overwrite)
    if to == "diffusers" and len(models) == 1:
        (name, m), = models.items()
        return save_component(path, kind_named(kinds, name), m, dtype=dtype, variant=variant, overwrite=overwrite)
    raise CheckpointError(f"cannot write {', '.join(models)} as {to!r}; expected native, diffusers "
                          f"(one component) or {' / '.join(sorted(prefixed))}")


# ---------------------------------------------------------------------------------------
# Inspection and the CLI
# ---------------------------------------------------------------------------------------

def describe(path, kinds: Sequence[Kind], *, only: str | None = None, variant: str | None = None,
             presets: Mapping[str, object] | None = None) -> dict:
    """What a checkpoint holds, without loading tensor data: format, per-component config and
    where it came from, dtypes, parameter counts and fit, EMA, unexpected keys, and what is
    not loaded (`ignored`: other components, tolerated buffers, pipeline entries of no kind).

    `only` describes that component alone (an error if it is absent); `flatten` then gives
    one flat dict."""
    ck = read_checkpoint(path, kinds, components=[only] if only else None, variant=variant, presets=presets)
    if only:
        part_config(ck, only)
    described = [n for n in ck.parts if only in (None, n)]
    out = {"path": str(ck.path), "format": ck.parts[only].format if only else ck.format, "components": {},
           "ema": {"present": bool(ck.ema), "tensors": len(ck.ema)}, "tolerated": sorted(ck.tolerated),
           "unexpected": sorted(ck.unexpected), "ignored": {}}
    for name in described:
        part = ck.parts[name]
        cfg = part_config(ck, name)
        sd = native_state_dict(ck, name, cfg)
        shapes = model_shapes(part.kind, cfg)
        info = {
            "format": part.format, "layout": part.layout, "source": str(part.source),
            "config_from": part.config_from, "config": cfg.to_dict(), "tensors": len(part.tensors),
            "parameters": sum(t.numel() for t in part.tensors.values()),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in part.tensors.values()}),
            "missing": sorted(k for k in shapes if k not in sd),
            "unexpected": sorted([k for k in sd if k not in shapes] + list(ck.unexpected)),
            "mis_shaped": sorted(k for k, s in shapes.items() if k in sd and tuple(sd[k].shape) != s),
        }
        if part.kind.summary is not None:
            info["summary"] = part.kind.summary(cfg)
        info["fits"] = not (info["missing"] or info["unexpected"] or info["mis_shaped"])
        out["components"][name] = info
    for name, part in ck.parts.items():
        if name not in described:
            out["ignored"][part.kind.prefix if ck.format == "compvis" else f"{name}."] = len(part.tensors)
    out["ignored"].update({k: 1 for k in ck.tolerated})
    out["ignored"].update({k: 0 for k in ck.ignored})
    every = {**ck.unexpected, **{k: v for p in ck.parts.values() for k, v in p.tensors.items()}}
    hint = next((h for k in kinds if k.hint is not None and (h := k.hint(every))), None)
    if hint:
        out["hint"] = hint
    return out


def flatten(d: dict, name: str) -> dict:
    """A description of one component as one flat dict (its entries override the file's)."""
    return {**{k: v for k, v in d.items() if k != "components"}, **d["components"][name]}


def format_description(d: dict) -> str:
    lines = [f"path:    {d['path']}", f"format:  {d['format']}"]
    for name, c in d["components"].items():
        bad = c["missing"] + c["unexpected"] + c["mis_shaped"]
        fit = "fits" if c["fits"] else (f"DOES NOT FIT: {len(c['missing'])} missing, {len(c['unexpected'])} unexpected, "
                                        f"{len(c['mis_shaped'])} mis-shaped ({few(bad, 4)})")
        lines.append(f"{name}: {c['parameters']:,} parameters in {c['tensors']} tensors, "
                     f"{'/'.join(c['dtypes'])}, {c['layout']} names, {fit}")
        if "summary" in c:
            lines.append(f"    {c['summary']}")
        lines.append(f"    config ({c['config_from']}): {json.dumps(c['config'])}")
        if len(d["components"]) == 1 and c["source"] != d["path"]:
            lines.append(f"    weights: {c['source']}")
    lines.append(f"EMA:     {'present (%d tensors)' % d['ema']['tensors'] if d['ema']['present'] else 'none'}")
    lines.append(f"unexpected: {len(d['unexpected'])}" + (f" ({few(d['unexpected'])})" if d['unexpected'] else ""))
    if d["ignored"]:
        lines.append("not loaded: " + few([f"{k}* ({n})" if k.endswith(".") else k for k, n in d["ignored"].items()], 6))
    if "hint" in d:
        lines.append(f"hint:    {d['hint']}")
    return "\n".join(lines)


def build_parser(*, prog: str, description: str, examples: str, kinds: Sequence[Kind],
                 only: str | None = None) -> argparse.ArgumentParser:
    """The ``inspect`` / ``convert`` command line over `kinds` (see `main`)."""
    served = [kind_named(kinds, only)] if only else list(kinds)
    targets = ("native", "diffusers", *dict.fromkeys(k.file_format for k in served))
    parser = cli.parser(prog, f"{description}\n\n{examples}", common=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = cli.add_subcommand(sub, "inspect", "print format, components, configs, dtypes, parameter counts, fit, extras")
    p.add_argument("path", help="file, component folder, pipeline folder or ORG/NAME[/sub] in the local HF cache")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p = cli.add_subcommand(sub, "convert", f"convert to {', '.join(targets)}")
    p.add_argument("src", help="the checkpoint to convert (anything inspect reads)")
    p.add_argument("dst", help="a .safetensors file, a .ckpt/.pth file (prefixed formats) or a folder (diffusers)")
    p.add_argument("--to", required=True, choices=targets, help="the layout to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast floating tensors (default: keep)")
    if any(k.ema_key is not None for k in served):
        p.add_argument("--ema", action="store_true", help="take the U-Net from the CompVis EMA weights")
    p.add_argument("--variant", default=None, help="diffusers weight variant to read and write, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--allow-unexpected", action="append", default=[], metavar="PATTERN",
                   help="tolerate extra keys matching this fnmatch pattern (repeatable)")
    return parser


def main(argv: list[str] | None, *, prog: str, description: str, examples: str, kinds: Sequence[Kind],
         convert: Callable[..., Path], only: str | None = None) -> int:
    """``inspect PATH`` and ``convert SRC DST --to FORMAT`` over `kinds`; `only`: a CLI for one
    component, whose ``--json`` is `flatten`'s. `convert(src, dst, to, dtype=, variant=,
    overwrite=, allow_unexpected=[, ema=])` is the package's. A `CheckpointError` is one line on
    stderr and status 1 (``ldm.cli.fail``)."""
    args = build_parser(prog=prog, description=description, examples=examples, kinds=kinds, only=only).parse_args(argv)
    try:
        if args.cmd == "inspect":
            d = describe(args.path, kinds, only=only, variant=args.variant)
            print(json.dumps(flatten(d, only) if only else d, indent=2) if args.json else format_description(d))
        else:
            out = convert(args.src, args.dst, args.to, dtype=DTYPES.get(args.dtype), variant=args.variant,
                          overwrite=args.overwrite, allow_unexpected=args.allow_unexpected,
                          **({"ema": args.ema} if hasattr(args, "ema") else {}))
            print(f"wrote {out}")
    except CheckpointError as e:
        return cli.fail(e, args.debug)
    return 0
