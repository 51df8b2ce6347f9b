"""Benchmark: our 8-connected component labelling vs scipy.ndimage.label (per class).

    python bench/components.py [--repeats 20]

Prints, for synthetic street scenes (segmentation.synthetic), smoothed-noise "blob" maps
(ragged boundaries, ~100-200 runs per row) and uniformly random label maps (the worst
case) at 512 and 1024, the median wall time of
- ours: ``mrlf.components.label_components`` (all classes in one pass) and
  ``large_component_mask`` (labelling + the union mask);
- scipy: ``ndimage.label(seg == c, ones((3, 3)))`` for every class present (0..18) plus
  the areas (``bincount``): what the original's OpenCV loop computes.
It also checks that both give the same multiset of (class, area).
"""
from __future__ import annotations

import platform
import sys
import time

import numpy as np

from ldm import cli
from mrlf.components import label_components, large_component_mask
from segmentation.synthetic import street_scene


def scipy_components(seg: np.ndarray) -> list[tuple[int, int]]:
    from scipy import ndimage

    out, structure = [], np.ones((3, 3), dtype=bool)
    for c in np.unique(seg):
        if c >= 19:
            continue
        lab, _ = ndimage.label(seg == c, structure)
        out += [(int(c), int(a)) for a in np.bincount(lab.ravel())[1:]]
    return out


def blobs(size: int, seed: int) -> np.ndarray:
    """Smoothed noise cut into 19 classes: ragged boundaries, many more runs than our street scenes."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), sigma=4.0)
    return np.digitize(noise, np.quantile(noise, np.linspace(0, 1, 20)[1:-1])).astype(np.uint8)


def median_ms(fn, seg, repeats):
    fn(seg)  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(seg)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def main(argv=None) -> None:
    p = cli.parser("python bench/components.py", __doc__)
    p.add_argument("--repeats", type=cli.positive_int, default=20, help="timed calls (median)")
    p.add_argument("--maps", type=cli.positive_int, default=5, help="synthetic maps per size (times are averaged)")
    a = p.parse_args(argv)
    import scipy

    print(f"numpy {np.__version__}, scipy {scipy.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'map':<22}{'runs/row':>9}{'comps':>8}{'ours label':>12}{'ours mask':>11}{'scipy':>9}{'scipy/ours':>11}")
    for size in (512, 1024):
        cases = [(f"street {size}x{size}", [street_scene(size, size, s) for s in range(a.maps)]),
                 (f"street {size}x{2 * size}", [street_scene(size, 2 * size, s) for s in range(a.maps)]),
                 (f"blobs {size}x{size}", [blobs(size, s) for s in range(a.maps)]),
                 (f"random {size}x{size}", [np.random.default_rng(0).integers(0, 19, (size, size), dtype=np.uint8)])]
        for name, segs in cases:
            t_lab = t_mask = t_sp = 0.0
            n_comp = n_runs = 0
            for seg in segs:
                _, cls, area = label_components(seg)
                assert sorted(zip(cls.tolist(), area.tolist())) == sorted(scipy_components(seg)), name
                n_comp += cls.size
                n_runs += int((np.diff(seg, axis=1) != 0).sum() + seg.shape[0])
                t_lab += median_ms(label_components, seg, a.repeats)
                t_mask += median_ms(lambda s: large_component_mask(s, 20000), seg, a.repeats)
                t_sp += median_ms(scipy_components, seg, a.repeats)
            k = len(segs)
            print(f"{name:<22}{n_runs / k / segs[0].shape[0]:>9.1f}{n_comp / k:>8.0f}{t_lab / k:>10.2f}ms"
                  f"{t_mask / k:>9.2f}ms{t_sp / k:>7.2f}ms{t_sp / t_mask:>10.2f}x")


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
