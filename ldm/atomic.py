"""Atomic writes: a temporary sibling is written, then renamed over the destination.

Readers see the old file or the new one, never a half-written one; a write that raises leaves
the destination as it was and removes its temporary. Every writer of the project goes through
here (weights, images, labels, JSON reports, training checkpoints):

    with atomic_file(path) as tmp:       # any writer that takes a path
        image.save(tmp, format="PNG")
    write_text(path, json.dumps(report))
    with atomic_dir(folder) as tmp:      # a whole folder, e.g. a diffusers export
        ...

Modes honour the umask, as a plain ``open(path, "w")`` / ``mkdir`` would: files 0o666 and
folders 0o777 less the umask. They are set once the writer is done, since some writers make
0o600 files of their own (``tempfile.mkstemp``, safetensors' ``save_file``), which the other
users of a shared dataset or model could not read.

Temporary names follow one pattern, ``.<name>.<pid>-<8 hex digits>.tmp`` (`TEMP_NAME`), so
what a killed run left behind is recognisable: `clean_stale` removes those older than the
current process, for jobs that resume into the folder they were writing.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")
_IMPORTED = time.time()


def _temporary(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary file beside `path` to write; leaving the block renames it onto
    `path`, an exception removes it. The parent folder is created if needed."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dst)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as open() gives
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; leaving the block puts it at
    `path`. An existing `path` is moved aside first and deleted once the new one is in place
    (a kill between the two renames leaves the old one under a temporary name)."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dst)
    os.mkdir(tmp, 0o777)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o777 less the umask, as mkdir() gives
    try:
        yield tmp
        _plain_modes(tmp, mode)
        if not dst.exists():
            os.replace(tmp, dst)
            return
        old = _temporary(dst)
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain_modes(folder: Path, dir_mode: int) -> None:
    """What mkdir / open() would have given everything below `folder` (links are left alone)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode if name in dirs else dir_mode & 0o666)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def process_start_time() -> float:
    """When this process started (Linux ``/proc``), else when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of proc(5), starttime: clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of `TEMP_NAME` directly in `folder` that were last
    written before this process started: leftovers of a killed run, never a write in progress
    of this process or of one started with it. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    start = process_start_time()
    removed = []
    for entry in os.scandir(folder):
        if not TEMP_NAME.match(entry.name):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= start:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another rank removed it first
            continue
        removed.append(Path(entry.path))
    return removed
