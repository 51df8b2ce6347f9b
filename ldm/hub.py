"""Finding checkpoints: local paths, and snapshots already in the local Hugging Face cache.

Offline only: nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from ldm.weights import CheckpointError


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
