"""ldm.atomic: modes under the umask, nothing left behind, the old file kept on failure, stale temporaries."""
from __future__ import annotations

import os
import stat
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm import atomic
from ldm.weights import read_state_dict, save_tensors


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_modes_are_those_of_a_plain_open_and_mkdir(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    (tmp_path / "plain_dir").mkdir()
    assert mode(plain) == 0o666 & ~mask and mode(tmp_path / "plain_dir") == 0o777 & ~mask

    written = atomic.write_text(tmp_path / "a.txt", "hello")
    assert written.read_text() == "hello" and mode(written) == mode(plain)
    with atomic.atomic_file(tmp_path / "sub" / "img.png") as tmp:
        Image.new("L", (4, 4)).save(tmp, format="PNG")
    assert mode(tmp_path / "sub" / "img.png") == mode(plain)
    assert mode(tmp_path / "sub") == mode(tmp_path / "plain_dir")  # created parents too
    weights = save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(2)})
    assert mode(weights) == mode(plain) and torch.equal(read_state_dict(weights)[0]["x"], torch.ones(2))
    with atomic.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.json").write_text("{}")
        (tmp / "unet").mkdir()
        save_file({"x": torch.ones(2)}, str(tmp / "unet" / "w.safetensors"))  # safetensors itself writes 0o600
    assert mode(tmp_path / "folder") == mode(tmp_path / "folder" / "unet") == mode(tmp_path / "plain_dir")
    assert mode(tmp_path / "folder" / "inside.json") == mode(tmp_path / "folder" / "unet" / "w.safetensors") \
        == mode(plain)


def test_replacing_an_existing_file_and_folder(tmp_path):
    atomic.write_bytes(tmp_path / "f.bin", b"old")
    atomic.write_bytes(tmp_path / "f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"new"
    for version in ("old", "new"):
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / version).write_text(version)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]


def test_an_exception_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    atomic.write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_file(tmp_path / "report.json") as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt):  # a kill signal as well
        with atomic.atomic_file(tmp_path / "new.json") as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "kept").write_text("old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "new").write_text("x")
            raise RuntimeError("half")
    assert (tmp_path / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "report.json"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["kept"]


def test_temporaries_are_hidden_and_recognisable(tmp_path):
    seen = []
    with atomic.atomic_file(tmp_path / "x.png") as tmp:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.exists()
    with atomic.atomic_dir(tmp_path / "y") as tmp:
        seen.append(tmp)
    for tmp in seen:
        assert tmp.name.startswith(".") and atomic.TEMP_NAME.match(tmp.name), tmp.name
        assert not tmp.exists()
    assert not atomic.TEMP_NAME.match(".hidden") and not atomic.TEMP_NAME.match("x.12-0123abcd.tmp")


def test_clean_stale_removes_only_leftovers_older_than_the_process(tmp_path):
    start = atomic.process_start_time()
    assert start <= time.time()
    old = start - 3600
    stale_file = tmp_path / ".img.png.4242-0123abcd.tmp"
    stale_file.write_bytes(b"partial")
    stale_dir = tmp_path / ".export.4242-89abcdef.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    for p in (stale_dir / "unet", stale_dir, stale_file):
        os.utime(p, (old, old))
    fresh = tmp_path / f".img2.png.{os.getpid()}-fedcba98.tmp"  # a write in progress
    fresh.write_bytes(b"being written")
    other = tmp_path / ".keep.tmp"  # not our pattern
    other.write_text("x")
    os.utime(other, (old, old))
    kept = tmp_path / "done.png"
    kept.write_bytes(b"png")
    os.utime(kept, (old, old))
    removed = atomic.clean_stale(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, kept.name])
    assert atomic.clean_stale(tmp_path / "missing") == []
