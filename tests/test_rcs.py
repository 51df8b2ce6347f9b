import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from mrlf import jobs as J
from segmentation import labels as L
from segmentation import rcs


def _write(path, arr):
    Image.fromarray(np.ascontiguousarray(arr, np.uint8)).save(path)
    return path


class ScriptedRng(np.random.Generator):
    """A Generator whose ``integers`` returns scripted values and records its (low, high)."""

    def __init__(self, values):
        super().__init__(np.random.PCG64(0))
        self.values = list(values)
        self.calls = []

    def integers(self, low, high=None, *args, **kwargs):
        self.calls.append((low, high))
        return self.values.pop(0)


# ---------------------------------------------------------------- statistics and cache
@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "labels"
    d.mkdir()
    a = np.full((6, 8), 255, np.uint8)
    a[:2] = 0          # 16 road
    a[2, :3] = 13      # 3 car
    b = np.zeros((6, 8), np.uint8)  # 48 road
    b[5, 7] = 18       # 1 bicycle -> 47 road
    _write(d / "a_labelTrainIds.png", a)
    _write(d / "b_labelTrainIds.png", b)
    _write(d / "b.png", b)  # not matched by the default pattern
    return d


def test_class_stats_counts(folder):
    st = rcs.class_stats(folder)
    assert st.files == ["a_labelTrainIds.png", "b_labelTrainIds.png"]
    assert st.counts.shape == (2, 19)
    assert st.counts[0, 0] == 16 and st.counts[0, 13] == 3 and st.counts[0].sum() == 19
    assert st.counts[1, 0] == 47 and st.counts[1, 18] == 1
    assert st.void.tolist() == [29, 0]
    assert st.shapes.tolist() == [[6, 8], [6, 8]]
    assert st.totals()[0] == 63 and st.totals()[13] == 3
    assert st.path(1) == folder / "b_labelTrainIds.png"
    assert (folder / rcs.CACHE_NAME).is_file()
    assert rcs.class_stats(folder, pattern="*.png").files == ["a_labelTrainIds.png", "b.png",
                                                              "b_labelTrainIds.png"]


def test_class_stats_cache_hit_and_invalidation(folder, monkeypatch):
    st0 = rcs.class_stats(folder)
    counted = []
    real = rcs._count_file

    def spy(path):
        counted.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(rcs, "_count_file", spy)
    st1 = rcs.class_stats(folder)
    assert counted == []  # everything from the cache
    np.testing.assert_array_equal(st1.counts, st0.counts)

    # content change (size changes) -> only that file is recounted
    c = np.full((6, 8), 10, np.uint8)
    c[0, 0] = 5
    _write(folder / "a_labelTrainIds.png", c)
    st2 = rcs.class_stats(folder)
    assert counted == ["a_labelTrainIds.png"]
    assert st2.counts[0, 10] == 47 and st2.counts[0, 5] == 1 and st2.counts[0, 0] == 0

    # same size, new mtime -> recounted
    counted.clear()
    p = folder / "b_labelTrainIds.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rcs.class_stats(folder)
    assert counted == ["b_labelTrainIds.png"]

    # added and removed files
    counted.clear()
    _write(folder / "c_labelTrainIds.png", np.full((6, 8), 2, np.uint8))
    (folder / "a_labelTrainIds.png").unlink()
    st3 = rcs.class_stats(folder)
    assert counted == ["c_labelTrainIds.png"]
    assert st3.files == ["b_labelTrainIds.png", "c_labelTrainIds.png"]
    assert st3.totals()[2] == 48 and st3.totals()[10] == 0
    cached = json.loads((folder / rcs.CACHE_NAME).read_text())
    assert [e["file"] for e in cached["files"]] == st3.files


def test_class_stats_cache_options(folder, tmp_path):
    rcs.class_stats(folder, cache=False)
    assert not (folder / rcs.CACHE_NAME).exists()
    elsewhere = tmp_path / "stats.json"
    rcs.class_stats(folder, cache=elsewhere)
    assert elsewhere.is_file() and not (folder / rcs.CACHE_NAME).exists()


def test_class_stats_bad_label(folder):
    _write(folder / "z_labelTrainIds.png", np.full((2, 2), 33, np.uint8))
    with pytest.raises(L.LabelError, match=r"z_labelTrainIds.png.*33"):
        rcs.class_stats(folder)


# ---------------------------------------------------------------- probabilities
def _softmax(zs):
    es = [math.exp(z) for z in zs]
    return [e / sum(es) for e in es]


def test_probs_hand_computed():
    totals = np.zeros(19, np.int64)
    totals[[0, 1, 2]] = [600, 300, 100]
    classes, p = rcs.rcs_class_probs(totals, temperature=0.5)
    assert classes.tolist() == [2, 1, 0]  # ascending pixel count, zero classes dropped
    expect = _softmax([(1 - 0.1) / 0.5, (1 - 0.3) / 0.5, (1 - 0.6) / 0.5])
    np.testing.assert_allclose(p, expect, rtol=1e-12)
    # T = 0.01 (default): the rarest class dominates
    classes, p = rcs.rcs_class_probs({0: 600, 1: 300, 2: 100})
    np.testing.assert_allclose(p, _softmax([90.0, 70.0, 40.0]), rtol=1e-12)
    assert p[0] > 0.999


def test_probs_order_ties_and_errors():
    classes, p = rcs.rcs_class_probs({7: 5, 3: 5, 11: 1, 4: 0})
    assert classes.tolist() == [11, 3, 7]
    assert p[1] == p[2]
    with pytest.raises(ValueError):
        rcs.rcs_class_probs({0: 1}, temperature=0)
    with pytest.raises(rcs.RCSError):
        rcs.rcs_class_probs(np.zeros(19))


# ---------------------------------------------------------------- eligibility, sampler, jobs
@pytest.fixture
def elig_folder(tmp_path):
    d = tmp_path / "elig"
    d.mkdir()
    for name, n1 in [("a", 3000), ("b", 3001), ("c", 2)]:
        a = np.zeros(60 * 60, np.uint8)
        a[:n1] = 1
        a[-50:] = 17
        _write(d / f"{name}_labelTrainIds.png", a.reshape(60, 60))
    return d


def test_eligible_threshold_is_strict(elig_folder):
    st = rcs.class_stats(elig_folder, cache=False)
    assert st.eligible_files(1) == ["b_labelTrainIds.png"]  # 3000 is not > 3000
    assert st.eligible_files(1, min_pixels=2999) == ["a_labelTrainIds.png", "b_labelTrainIds.png"]
    assert st.eligible_files(17) == []
    assert st.eligible_files(17, min_pixels=49) == ["a_labelTrainIds.png", "b_labelTrainIds.png",
                                                    "c_labelTrainIds.png"]
    assert st.eligible_files(1, min_pixels=2999, crop_size=61) == []
    assert st.samples_with_class(3000) == {0: [("c_labelTrainIds.png", 3548)],
                                           1: [("b_labelTrainIds.png", 3001)]}


def test_sampler_restricts_and_follows_documented_draws(elig_folder):
    st = rcs.class_stats(elig_folder, cache=False)
    s = rcs.RareClassSampler(st, min_pixels=3000)
    # class 17 (rarest) and 0 in a/b have no eligible file: only 0 (file c) and 1 (file b) remain
    assert sorted(s.classes.tolist()) == [0, 1]
    classes, p = st.class_probs()
    keep = np.isin(classes, [0, 1])
    np.testing.assert_allclose(s.probs, p[keep] / p[keep].sum())
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        c, i = s.sample(rng)
        ec = int(ref.choice(s.classes, p=s.probs))
        ei = int(s.files[ec][ref.integers(len(s.files[ec]))])
        assert (c, i) == (ec, ei)
        assert st.counts[i, c] > 3000
    with pytest.raises(rcs.RCSError):
        rcs.RareClassSampler(st, min_pixels=10**6)
    with pytest.raises(TypeError):
        s.sample(np.random.RandomState(0))


def test_build_jobs_deterministic_and_eligible(elig_folder):
    jobs = J.build_jobs(elig_folder, 40, seed=3, min_pixels=49)
    assert jobs == J.build_jobs(elig_folder, 40, seed=3, min_pixels=49)
    assert jobs != J.build_jobs(elig_folder, 40, seed=4, min_pixels=49)
    st = rcs.class_stats(elig_folder)
    seen = set()
    for j in jobs:
        assert set(j) == {"class", "class_name", "file"}
        assert j["class_name"] == L.CLASS_NAMES[j["class"]]
        assert L.load_label(j["file"]).ravel().tolist().count(j["class"]) > 49
        seen.add(j["class"])
    assert seen <= {0, 1, 17}
    # with min_pixels 3000 only class 0 (file c) and class 1 (file b) can appear
    for j in J.build_jobs(st, 30, seed=0):
        assert (j["class"], os.path.basename(j["file"])) in {(0, "c_labelTrainIds.png"), (1, "b_labelTrainIds.png")}


# ---------------------------------------------------------------- gen files
def test_gen_file_roundtrip(elig_folder, tmp_path):
    jobs = J.build_jobs(elig_folder, 5, seed=1, min_pixels=49)
    gf = tmp_path / "0.json"
    J.write_gen_file(jobs, gf, relative_to=tmp_path)
    raw = json.loads(gf.read_text())
    assert set(raw[0]) == {"class", "class_name", "file_name"}
    assert isinstance(raw[0]["class"], str) and not os.path.isabs(raw[0]["file_name"])
    back = J.read_gen_file(gf)  # relative to the gen file's folder
    assert [(j["class"], os.path.realpath(j["file"])) for j in back] == \
           [(j["class"], os.path.realpath(j["file"])) for j in jobs]
    # int classes and "file" keys are accepted too; root resolves relative names
    other = tmp_path / "o.json"
    other.write_text(json.dumps([{"class": 1, "class_name": "sidewalk", "file": "b_labelTrainIds.png"}]))
    assert J.read_gen_file(other, root=elig_folder)[0]["file"] == str(elig_folder / "b_labelTrainIds.png")


@pytest.mark.parametrize("entry, match", [
    ({"class": "5", "class_name": "pole", "file_name": "a_labelTrainIds.png"}, r"entry 0: .*a_labelTrainIds.png.*class 5"),
    ({"class": "19", "file_name": "a_labelTrainIds.png"}, "train id"),
    ({"class": "bus", "file_name": "a_labelTrainIds.png"}, "train id"),
    ({"class": "1", "class_name": "bus", "file_name": "a_labelTrainIds.png"}, "does not match"),
    ({"class": "1", "file_name": "missing.png"}, "not found"),
    ({"class": "1"}, "file_name"),
    ({"class": "1", "file_name": 5}, "file_name must be a path"),
    ({"class": "1", "file_name": None}, "file_name must be a path"),
    ({"class": "1", "file_name": "bad_labelTrainIds.png"}, r"bad_labelTrainIds.png.*99"),
])
def test_gen_file_validation_errors(elig_folder, tmp_path, entry, match):
    _write(elig_folder / "bad_labelTrainIds.png", np.full((2, 2), 99, np.uint8))
    gf = tmp_path / "g.json"
    gf.write_text(json.dumps([entry]))
    with pytest.raises(J.GenFileError, match=match):
        J.read_gen_file(gf, root=elig_folder)


def test_gen_file_not_a_list(tmp_path):
    gf = tmp_path / "g.json"
    gf.write_text("{}")
    with pytest.raises(J.GenFileError, match="list"):
        J.read_gen_file(gf)


def test_cli(elig_folder, tmp_path, capsys):
    out = tmp_path / "jobs.json"
    assert J.main([str(elig_folder), "-n", "4", "--seed", "2", "-o", str(out)]) == 0
    assert len(J.read_gen_file(out)) == 4
    assert rcs.main(["stats", str(elig_folder)]) == 0
    assert "sidewalk" in capsys.readouterr().out


# ---------------------------------------------------------------- crop placement
def _two_pixel_label():
    lab = np.full((10, 12), 255, np.uint8)  # H=10, W=12
    lab[1, 2] = 5   # index 0 in row-major order
    lab[8, 11] = 5  # index 1
    return lab


def test_crop_clamps_at_borders():
    lab = _two_pixel_label()
    r = rcs.place_crop(lab, 5, ScriptedRng([0]), crop_size=4)
    assert r == rcs.Crop((0, 0, 4, 4), 1, 1, True)  # x1 = max(0, 2-2)=0, y1 = max(0, 1-2)=0
    r = rcs.place_crop(lab, 5, ScriptedRng([1]), crop_size=4)
    assert r.box == (8, 6, 12, 10)  # x1 = min(11-2, 12-4) = 8, y1 = min(8-2, 10-4) = 6
    np.testing.assert_array_equal(r.apply(lab), lab[6:10, 8:12])
    assert rcs.crop_origin(6, 5, 10, 12, 4) == (4, 3)  # centred, no clamp
    assert rcs.crop_origin(6, 5, 10, 12, (2, 6)) == (3, 4)  # (height, width)
    # label exactly the crop size
    assert rcs.place_crop(lab, 5, ScriptedRng([1]), crop_size=(10, 12)).box == (0, 0, 12, 10)


def test_faithful_vs_default_index_range():
    lab = _two_pixel_label()
    s = ScriptedRng([0])
    rcs.place_crop(lab, 5, s, crop_size=4, faithful=True)
    assert s.calls == [(0, 1)]  # rng.integers(0, n - 1): exclusive, the last pixel is never drawn
    s = ScriptedRng([1])
    rcs.place_crop(lab, 5, s, crop_size=4)
    assert s.calls == [(0, 2)]  # rng.integers(0, n)
    # with a real Generator, faithful mode always lands on pixel 0; default reaches pixel 1
    rng = np.random.default_rng(0)
    assert {rcs.place_crop(lab, 5, rng, 4, faithful=True).box for _ in range(30)} == {(0, 0, 4, 4)}
    assert {rcs.place_crop(lab, 5, rng, 4).box for _ in range(30)} == {(0, 0, 4, 4), (8, 6, 12, 10)}
    # and it consumes exactly what the documented call consumes
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    lab3 = np.zeros((10, 12), np.uint8)
    lab3[[0, 4, 9], [0, 6, 11]] = 3
    boxes = {0: (0, 0, 4, 4), 1: (4, 2, 8, 6), 2: (8, 6, 12, 10)}
    for faithful in (True, False):
        for _ in range(10):
            i = int(ref.integers(0, 2 if faithful else 3))
            assert rcs.place_crop(lab3, 3, rng, 4, faithful=faithful).box == boxes[i]


def test_pixel_count_errors():
    lab = np.zeros((8, 8), np.uint8)
    lab[3, 3] = 7
    with pytest.raises(rcs.RCSError, match="1 pixel.*at least 2"):
        rcs.place_crop(lab, 7, np.random.default_rng(0), 4, faithful=True)
    assert rcs.place_crop(lab, 7, np.random.default_rng(0), 4).box == (1, 1, 5, 5)  # default: n=1 fine
    for faithful in (True, False):
        with pytest.raises(rcs.RCSError, match="class 9"):
            rcs.place_crop(lab, 9, np.random.default_rng(0), 4, faithful=faithful, source="f.png")
    with pytest.raises(rcs.RCSError, match="smaller than the crop"):
        rcs.place_crop(lab, 0, np.random.default_rng(0), crop_size=9)
    with pytest.raises(TypeError):
        rcs.place_crop(lab, 0, 0, 4)


def _block_label():
    lab = np.zeros((20, 20), np.uint8)
    lab[0, 0] = 3              # index 0: isolated pixel
    lab[15:17, 14:17] = 3      # indices 1..6: a 2x3 block
    return lab


def test_retries_and_ratio_rule():
    lab = _block_label()
    # crop 10 -> 100 px; ratio 0.05 -> needs > 5 class pixels
    s = ScriptedRng([0, 0, 3])
    r = rcs.place_crop(lab, 3, s, crop_size=10, min_ratio=0.05)
    # tries 1-2 centre on (0,0): box (0,0,10,10) holds 1 px; try 3 centres on (y=15, x=16)
    assert r == rcs.Crop((10, 10, 20, 20), 3, 6, True)
    assert len(s.calls) == 3
    # all tries fail (6 px is not > 0.06 * 100): the *last* crop is kept (not the best one),
    # after exactly max_tries draws
    s = ScriptedRng([3, 3, 3, 0])
    r = rcs.place_crop(lab, 3, s, crop_size=10, min_ratio=0.06, max_tries=4)
    assert r == rcs.Crop((0, 0, 10, 10), 4, 1, False) and len(s.calls) == 4 and not s.values
    r = rcs.place_crop(lab, 3, ScriptedRng([3] * 10), crop_size=10, min_ratio=0.06)
    assert r == rcs.Crop((10, 10, 20, 20), 10, 6, False)


def test_default_one_percent_of_512():
    lab = np.zeros((520, 530), np.uint8)
    lab[:38, :69] = 4          # 2622 px > 0.01 * 512**2 = 2621.44
    r = rcs.place_crop(lab, 4, np.random.default_rng(0))
    assert r == rcs.Crop((0, 0, 512, 512), 1, 2622, True)
    lab[0, 0] = 0              # 2621 px: every try fails, 10 tries
    r = rcs.place_crop(lab, 4, np.random.default_rng(0))
    assert (r.box, r.tries, r.class_pixels, r.accepted) == ((0, 0, 512, 512), 10, 2621, False)
