"""Generation jobs: which label file, and which rare class to centre the crop on, each sample of
``mrlf.generate`` is made from.

- ``build_jobs``: ``n`` jobs drawn by rare-class sampling (``segmentation.rcs.RareClassSampler``)
  from a label folder's class statistics, as ``{"class": int, "class_name": str, "file": str}``.
- ``write_gen_file`` / ``read_gen_file``: the original's gen-file JSON, a list of
  ``{"class": "15", "class_name": "bus", "file_name": ...}``; reading validates every entry
  (class id and name agree, the label file exists and holds the class).

CLI: ``python -m mrlf.jobs LABEL_FOLDER -n 6000 -o gen_file.json`` writes a gen file that
``python -m mrlf.generate --jobs gen_file.json`` reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ldm import cli
from ldm.atomic import write_text
from segmentation.labels import CLASS_NAMES, NUM_CLASSES, LabelError, class_id, load_label
from segmentation.rcs import (DEFAULT_MIN_PIXELS, DEFAULT_PATTERN, DEFAULT_TEMPERATURE, ClassStats, RareClassSampler,
                              RCSError, add_stats_arguments, class_stats, stats_from_args)


class GenFileError(ValueError):
    """An invalid gen-file (job list) entry."""


def build_jobs(source: str | os.PathLike | ClassStats, n: int, seed: int | np.random.Generator = 0,
               temperature: float = DEFAULT_TEMPERATURE, min_pixels: int = DEFAULT_MIN_PIXELS,
               crop_size=None, pattern: str = DEFAULT_PATTERN) -> list[dict]:
    """``n`` RCS jobs from a label folder (or its ``ClassStats``): a list of
    ``{"class": int, "class_name": str, "file": str}`` drawn with ``np.random.default_rng(seed)``
    (or the Generator given). Only classes with eligible files are drawn (see RareClassSampler)."""
    stats = source if isinstance(source, ClassStats) else class_stats(source, pattern=pattern)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sampler = RareClassSampler(stats, temperature, min_pixels, crop_size)
    jobs = []
    for _ in range(n):
        c, i = sampler.sample(rng)
        jobs.append({"class": c, "class_name": CLASS_NAMES[c], "file": str(stats.path(i))})
    return jobs


def check_class_present(label: np.ndarray, c: int, source: str = "label", min_pixels: int = 1) -> int:
    """Pixel count of class c in ``label``; ``RCSError`` when below ``min_pixels``."""
    n = int(np.count_nonzero(np.asarray(label) == c))
    if n < min_pixels:
        raise RCSError(f"{source}: class {c} ({CLASS_NAMES[c]}) has {n} pixel(s), "
                       f"needs at least {min_pixels}")
    return n


def _parse_class(value) -> int | None:
    """A train id from an int or a digit string ("15"); None when it is not one."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, (int, np.integer)) and 0 <= value < NUM_CLASSES:
        return int(value)
    return None


def write_gen_file(jobs: Iterable[dict], path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> None:
    """Write jobs in the original format: ``[{"class": "15", "class_name": "bus", "file_name": ...}]``
    (the class as a string, as the original's gen files hold it). ``relative_to`` makes paths relative."""
    out = []
    for j in jobs:
        c = class_id(j["class"])
        f = Path(j.get("file", j.get("file_name")))
        if relative_to is not None:
            f = Path(os.path.relpath(f, relative_to))
        out.append({"class": str(c), "class_name": CLASS_NAMES[c], "file_name": f.as_posix()})
    write_text(path, json.dumps(out, indent=1) + "\n")


def read_gen_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  validate: bool = True, min_pixels: int = 1) -> list[dict]:
    """Read a gen file: a JSON list of {"class": "<id>" or <id>, "class_name"?, "file_name" (or
    "file")}. Returns jobs ``{"class": int, "class_name": str, "file": str}``.

    Relative file names resolve against ``root`` if given; else against the gen file's folder,
    then the current directory (the original's convention), whichever exists. With ``validate``,
    each file is loaded (values checked) and must hold at least ``min_pixels`` of its class.
    Errors are ``GenFileError`` naming the gen file, the entry index and the label file."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise GenFileError(f"{path}: cannot read gen file ({e})") from e
    if not isinstance(data, list):
        raise GenFileError(f"{path}: a gen file must be a JSON list of entries")
    jobs = []
    for k, e in enumerate(data):
        where = f"{path} entry {k}"
        if not isinstance(e, dict) or "class" not in e or not ("file_name" in e or "file" in e):
            raise GenFileError(f"{where}: needs 'class' and 'file_name', got {e!r}")
        c = _parse_class(e["class"])
        if c is None:
            raise GenFileError(f"{where}: class must be a train id 0..{NUM_CLASSES - 1}, got {e['class']!r}")
        if "class_name" in e:
            try:
                named = class_id(e["class_name"])
            except KeyError:
                named = None
            if named != c:
                raise GenFileError(f"{where}: class_name {e['class_name']!r} does not match class {c} "
                                   f"({CLASS_NAMES[c]})")
        name = e.get("file_name", e.get("file"))
        if not isinstance(name, str) or not name:
            raise GenFileError(f"{where}: file_name must be a path, got {name!r}")
        f = Path(name)
        if not f.is_absolute():
            cands = [Path(root) / f] if root is not None else [path.parent / f, Path.cwd() / f]
            f = next((p for p in cands if p.exists()), cands[0])
        if validate:
            if not f.is_file():
                raise GenFileError(f"{where}: label file not found: {f}")
            try:
                check_class_present(load_label(f), c, str(f), min_pixels)
            except (LabelError, RCSError) as err:
                raise GenFileError(f"{where}: {err}") from err
        jobs.append({"class": c, "class_name": CLASS_NAMES[c], "file": str(f)})
    return jobs


def get_parser() -> argparse.ArgumentParser:
    ap = cli.parser("python -m mrlf.jobs", """Write a gen file of N rare-class-sampled (class, file) jobs.

example:
    python -m mrlf.jobs data/gta/labels -n 6000 -o gen.json --crop-size 512
    python -m mrlf.generate --jobs gen.json ...""")
    add_stats_arguments(ap)
    ap.add_argument("-n", type=cli.positive_int, required=True, help="number of jobs")
    ap.add_argument("-o", "--output", required=True, help="gen file (JSON) to write")
    ap.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of the draws")
    ap.add_argument("--crop-size", type=cli.positive_int, default=None, help="skip files smaller than this")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    jobs = build_jobs(stats_from_args(args), args.n, args.seed, args.temperature, args.min_pixels, args.crop_size)
    write_gen_file(jobs, args.output)
    print(f"wrote {len(jobs)} jobs to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
