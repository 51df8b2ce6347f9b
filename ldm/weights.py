"""Weight files: read any supported file, check and load strictly with one report, save atomically.

The part every model family shares; the SD components and the ControlNet use it through
`ldm.formats`, the segmentation models directly.

  - `read_state_dict`: safetensors (memory-mapped), torch files (``weights_only``, mmap'd when
    the zip format allows; ``{"state_dict": ...}`` unwrapped), sharded ``*.index.json``;
    `read_torch` for files that hold more than tensors (training checkpoints);
  - `check_state_dict` / `load_into`: every key of the model present with its shape, extra keys
    only by an allow-list, else one `CheckpointError` that names the file and lists the missing,
    unexpected and mis-shaped keys; a module built on the meta device (`build_empty`) gets the
    file's tensors assigned, cast one by one, so host memory is not doubled;
  - `save_tensors`: host copies, then safetensors with string metadata or a torch file,
    written atomically (`ldm.atomic`);
  - `fingerprint`: a hash naming a set of weights, for files that refer to weights they do not hold.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm.atomic import atomic_file

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def few(items: Iterable, n: int = 8) -> str:
    """The first `n` items, comma-separated, with a count of the rest."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

def sniff(path: Path) -> str:
    """"safetensors" or "torch", from the first bytes; anything else is a CheckpointError."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: empty or truncated file ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04":  # torch.save zip archive
        return "torch"
    # safetensors before the legacy pickle's 0x80: a header length whose low byte is 0x80 starts so too
    n, size = int.from_bytes(head[:8], "little"), path.stat().st_size
    if head[8:9] == b"{":
        if n + 8 > size:
            raise CheckpointError(f"{path}: truncated safetensors file (its header alone needs {n + 8} bytes, "
                                  f"the file has {size})")
        return "safetensors"
    if head[0] == 0x80:  # legacy (pre-zip) torch pickle
        return "torch"
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint (unrecognised header bytes {head[:8]!r})")


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    why = ("it holds Python objects other than tensors, which weights_only loading refuses"
           if "Weights only load failed" in str(e) else "the file is truncated or corrupt")
    return CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]}); {why}")


def read_torch(path: str | os.PathLike):
    """The object in a torch file, loaded with ``weights_only`` (tensors and plain Python values
    only) onto the CPU, memory-mapped unless the file predates the zip format."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:  # truncated archives, bad pickles...
        raise _unreadable(path, e) from e


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one file, memory-mapped; any reading problem is a CheckpointError.

    A torch file may wrap its tensors as ``{"state_dict": ..., "ldm_metadata": {...}}`` (CompVis
    ``.ckpt`` files nest theirs so; other top-level entries are ignored); metadata is str -> str.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if sniff(path) == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as e:  # header errors, short data
            raise _unreadable(path, e) from e
    obj, meta = read_torch(path), {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in (obj.get("ldm_metadata") or {}).items() if isinstance(v, str)}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entries are not tensors: {few(bad)}")
    return dict(obj), meta


def _read_sharded(index: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        raise CheckpointError(f"{index}: {len(missing)} tensors listed in the index are in no shard: {few(missing)}")
    return tensors, meta


# ---------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------

def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source=None,
                     allow_unexpected: Iterable[str] = (),
                     hint: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped keys, if any.

    `allow_unexpected`: fnmatch patterns of extra keys to tolerate (e.g. ``"model_ema.*"``);
    `hint`: names what a mismatching state dict most likely is (a line of the report).
    """
    expected = module.state_dict()
    allow = tuple(allow_unexpected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not any(fnmatch.fnmatchcase(k, p) for p in allow)]
    misshaped = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return
    cfg = getattr(module, "cfg", None)
    lines = [f"{source or '<state dict>'}: does not fit {type(module).__name__}"
             + (f"({cfg})" if cfg is not None else "") + ":"]
    for label, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            lines.append(f"  {len(items)} {label} key{'s' * (len(items) != 1)}: {few(items)}")
    if misshaped:
        lines.append(f"  {len(misshaped)} mis-shaped key{'s' * (len(misshaped) != 1)}:")
        lines += [f"    {m}" for m in misshaped[:8]] + ([f"    ... ({len(misshaped) - 8} more)"] if len(misshaped) > 8 else [])
    said = hint(state_dict) if hint is not None else None
    if said:
        lines.append(f"  hint: {said}")
    raise CheckpointError("\n".join(lines))


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source=None,
              allow_unexpected: Iterable[str] = (), dtype: torch.dtype | None = None,
              device: str | torch.device | None = None,
              hint: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None) -> nn.Module:
    """Strictly load `state_dict` into `module` and return it.

    Every key of the module must be present with its shape, and every extra key must match a
    pattern of `allow_unexpected`, else one CheckpointError names `source` and lists them all.
    A module on the meta device gets the tensors themselves (`assign=True`), each cast to
    `dtype` (floating point only) and moved to `device` one by one; a materialised module is
    copied into.
    """
    check_state_dict(module, state_dict, source=source, allow_unexpected=allow_unexpected, hint=hint)
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
        raise CheckpointError(f"{source}: {len(left)} tensors were not materialised: {few(left)}")
    if not on_meta and (dtype is not None or device is not None):
        module.to(device=device, dtype=dtype)
    return module


class _SkipInit(TorchFunctionMode):
    """Skip `torch.nn.init` calls while building on the meta device: the values are replaced
    by the checkpoint's anyway, and initialising meta tensors goes through torch._refs, whose
    first use imports torch._dynamo (1-6 s once per process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build_empty(model: Callable[..., nn.Module], *args, device: str | torch.device = "meta") -> nn.Module:
    """`model(*args)` built on `device`; on the meta device (the default) it holds no memory and
    its initialisers are skipped, ready for `load_into`."""
    with torch.device(device), (_SkipInit() if torch.device(device).type == "meta" else contextlib.nullcontext()):
        return model(*args)


# ---------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------

def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"sha256:<hex>" over the names, dtypes, shapes and bytes of the tensors, in name order.

    It names the weights, not the file: the same tensors read from a CompVis file, a diffusers
    folder or our safetensors (under our names) give the same fingerprint; a cast (fp32 -> fp16)
    or any changed value gives another. Reading every byte costs about a second per GB.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def host_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU tensors, floating ones cast to `dtype`; views become compact copies."""
    out = {}
    for k, t in state_dict.items():
        t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else None)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.contiguous().clone()  # a view: save only its own elements
        out[k] = t
    return out


def refuse_overwrite(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path`, unless it exists and `overwrite` is false: then a CheckpointError."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: exists (pass overwrite=True / --overwrite)")
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  fmt: str = "safetensors") -> None:
    """Write `tensors` to `path` as they are (not atomically; see `save_tensors`). `fmt`
    "safetensors" keeps `metadata` in the header; "torch" nests the tensors under ``state_dict``
    next to ``ldm_metadata`` when there is metadata (the CompVis ``.ckpt`` layout), else saves
    the plain dict."""
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata=dict(metadata or {}))
    elif metadata:
        torch.save({"state_dict": tensors, "ldm_metadata": dict(metadata)}, path)
    else:
        torch.save(tensors, path)


def save_tensors(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write host copies of `state_dict` (floating tensors cast to `dtype`) atomically to `path`:
    safetensors for a ``.safetensors`` suffix, else a torch file (see `write_tensors`)."""
    path = refuse_overwrite(path, overwrite)
    tensors = host_tensors(state_dict, dtype)
    with atomic_file(path) as tmp:
        write_tensors(tmp, tensors, metadata, "safetensors" if path.suffix == ".safetensors" else "torch")
    return path
