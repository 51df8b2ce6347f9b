"""The fault trial as tests: a kill at every write of a generation run, a full disk, a kill while a
training checkpoint is written. Each run resumes to exactly the files an uninterrupted run writes,
and what is left behind is readable by others (modes under the umask) and free of temporaries."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm import atomic, cli
from mrlf import generate
from segmentation.labels import save_label
from segmentation.synthetic import street_scene

FAST = ["--size", "64", "--steps", "2", "--window", "8", "--stride", "4", "--threshold", "300", "--no-progress"]


class Killed(BaseException):
    """The process dies here (as SIGKILL would: no handler, no cleanup of its own)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    for i in range(2):
        save_label(street_scene(96, 128, i), d / f"{i:05d}_labelTrainIds.png")
    return d


def _argv(labels, out):
    # the tiny random model, every run on one thread (the `one_thread` fixture, and in `reference`): the
    # byte-for-byte checks need the same summation order, which on some CPUs changes with the thread count
    return ["--random-tiny", "--labels", str(labels), "-n", "2", "--out", str(out), *FAST]


def _tree(out: Path) -> dict[str, bytes]:
    """Every file of the folder with its bytes; the manifest as its set of records without timings."""
    import json

    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = Path(root) / name
            rel = str(path.relative_to(out))
            if name == "manifest.jsonl":
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                files[rel] = sorted(json.dumps({k: v for k, v in r.items() if k != "timing_s"}, sort_keys=True)
                                    for r in rows)
            else:
                files[rel] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()  # a module fixture is set up before the tests' `one_thread`
    torch.set_num_threads(1)
    try:
        assert generate.main(_argv(labels, out)) == 0
    finally:
        torch.set_num_threads(n)
    return _tree(out)


def _leave_a_temporary_and_die(real, k: int, calls: list):
    """os.replace that, at its k-th call, leaves the temporary behind as a killed process would
    (older than any later process) and dies before the rename."""

    def replace(src, dst, *a, **kw):
        calls.append(dst)
        if len(calls) == k:
            left = Path(src).with_name(f".{Path(dst).name}.99999-0badf00d.tmp")
            os.link(src, left)
            os.utime(left, (1, 1))
            raise Killed
        return real(src, dst, *a, **kw)

    return replace


def test_a_kill_at_every_write_resumes_to_the_same_files(labels, reference, tmp_path, monkeypatch):
    writes = len([k for k in reference if k != "manifest.jsonl"])  # run.json and three files per sample
    assert writes == 1 + 2 * 3
    for k in range(1, writes + 1):
        out = tmp_path / f"kill{k}"
        calls = []
        with monkeypatch.context() as m:
            m.setattr(os, "replace", _leave_a_temporary_and_die(os.replace, k, calls))
            with pytest.raises(Killed):
                generate.main(_argv(labels, out))
        assert generate.main(_argv(labels, out)) == 0  # the same command again
        assert _tree(out) == reference, f"killed at write {k} ({calls[-1]})"


class _KilledBeforeTheManifestLine:
    """os, as mrlf.generate sees it, whose second manifest append never happens."""

    def __init__(self):
        self.appends = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.appends += 1
        if self.appends == 2:
            raise Killed
        return os.write(fd, data)


def test_a_kill_between_a_samples_files_and_its_manifest_line(labels, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(generate, "os", _KilledBeforeTheManifestLine())
        with pytest.raises(Killed):
            generate.main(_argv(labels, tmp_path))
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 1  # sample 1's files, no line
    assert generate.main(_argv(labels, tmp_path)) == 0
    assert _tree(tmp_path) == reference


def test_a_full_disk_fails_with_one_line_and_the_run_resumes(labels, reference, tmp_path, monkeypatch, capsys):
    real, saves = Image.Image.save, []

    def save(self, fp, *a, **kw):
        saves.append(fp)
        if len(saves) == 4:  # sample 1's image
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", save)
        assert cli.run_cli(generate.main, _argv(labels, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: [Errno 28] No space left on device" and err.count("error") == 1, err
    assert "Traceback" not in err
    assert not [p for p in tmp_path.rglob(".*") if atomic.TEMP_NAME.match(p.name)]  # no temporaries
    assert generate.main(_argv(labels, tmp_path)) == 0
    assert _tree(tmp_path) == reference


def test_outputs_are_readable_by_others(labels, tmp_path):
    before = os.umask(0o022)
    try:
        assert generate.main(_argv(labels, tmp_path)) == 0
    finally:
        os.umask(before)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o755}, modes


def test_a_kill_while_a_training_checkpoint_is_written(tmp_path, monkeypatch):
    from train import common, finetune_unet

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(street_scene(64, 64, i).repeat(3).reshape(64, 64, 3) * 10).save(images / f"{i}.png")

    def run(out, *extra):
        finetune_unet.main(finetune_unet.get_parser().parse_args(
            ["--tiny", "--data", str(images), "--output-dir", str(out), "--resolution", "64", "--num-workers", "0",
             "--sample-every", "0", "--ckpt-every", "1", "--lr", "1e-3", "--max-steps", "3", "--no-export", *extra]))

    before = os.umask(0o022)
    try:
        run(tmp_path / "full")
        calls = []
        with monkeypatch.context() as m:
            m.setattr(os, "replace", _leave_a_temporary_and_die(os.replace, 2, calls))  # step 2's checkpoint
            with pytest.raises(Killed):
                run(tmp_path / "cut")
        assert calls[-1].name == "step_0000002.pt"
        ckpts = tmp_path / "cut" / "checkpoints"
        assert [p.name for p in common.list_checkpoints(ckpts)] == ["step_0000001.pt"]
        assert any(atomic.TEMP_NAME.match(p.name) for p in ckpts.iterdir())
        run(tmp_path / "cut", "--resume", "auto")
    finally:
        os.umask(before)
    assert not any(atomic.TEMP_NAME.match(p.name) for p in ckpts.iterdir())  # the leftover is gone
    a = common.load_checkpoint(common.checkpoint_path(tmp_path / "full" / "checkpoints", 3))
    b = common.load_checkpoint(common.checkpoint_path(ckpts, 3))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())  # exactly the uninterrupted run
    assert {stat.S_IMODE(p.stat().st_mode) for p in ckpts.iterdir()} == {0o644}
