"""The miniature world's renderer and its datasets on disk (segmentation/world.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from segmentation.datasets import SegDataset, parse_spec, read_dataset_file
from segmentation.labels import CLASS_NAMES, TRAIN_ID_SUFFIX, load_label
from segmentation.synthetic import POLE, ROAD, SIDEWALK, SKY, TRAFFIC_LIGHT, TRAFFIC_SIGN, Layout, street_scene
from segmentation.world import (CLASSIFIED, PRIOR_STYLES, SOURCE, STYLES, TARGET_LAYOUT, UNSEEN_STYLES, WorldSpec,
                                get_style, render, write_world)


def _scene(seed=3, h=64, w=128, layout=Layout()):
    return street_scene(h, w, seed, layout=layout, full=True)


def test_render_is_deterministic_in_scene_style_and_seed():
    sc = _scene()
    for style in STYLES:
        a, b = render(sc, style, 7), render(sc, style, 7)
        assert a.dtype == np.uint8 and a.shape == (64, 128, 3)
        assert np.array_equal(a, b), style
    # the seed matters where the style draws (per-instance colours, grain, rain), the style always
    assert not np.array_equal(render(sc, "night", 1), render(sc, "night", 2))
    images = [render(sc, s, 7) for s in STYLES]
    for i in range(len(images)):
        for j in range(i):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).mean() > 3, (list(STYLES)[i], list(STYLES)[j])


def test_styles_roles_and_names():
    assert SOURCE.role == "source" and len(PRIOR_STYLES) >= 10 and len(UNSEEN_STYLES) >= 2
    assert all(s.role == "prior" for s in PRIOR_STYLES) and all(s.role == "unseen" for s in UNSEEN_STYLES)
    words = [s.word for s in PRIOR_STYLES]
    assert len(set(words)) == len(words)  # each caption names its style unambiguously
    assert set(CLASSIFIED) == {SOURCE, *PRIOR_STYLES}  # the classifier never sees the unseen styles
    with pytest.raises(ValueError, match="unknown style 'sepia'"):
        get_style("sepia")


def _class_colour(img, seg, c):
    return img[seg == c].astype(float).mean(axis=0)


def test_class_colours_collide_across_styles():
    """Colour alone cannot transfer: a snowy road is close to the source sidewalk and a night sky is
    closer to the source road than to the source sky."""
    sc = _scene(seed=11)
    src, snow, night = render(sc, SOURCE, 0), render(sc, "snow", 0), render(sc, "night", 0)
    d = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    road_snow, side_src, road_src = (_class_colour(snow, sc.seg, ROAD), _class_colour(src, sc.seg, SIDEWALK),
                                     _class_colour(src, sc.seg, ROAD))
    assert d(road_snow, side_src) < d(road_snow, road_src)
    sky_night = _class_colour(night, sc.seg, SKY)
    assert d(sky_night, road_src) < d(sky_night, _class_colour(src, sc.seg, SKY))


def test_small_objects_are_at_most_a_latent_pixel_wide():
    """Poles and traffic lights / signs at the base size (64 rows) are <= 4 px wide (one latent pixel of
    the world's 4x autoencoder) in most rows: the base pass cannot draw them, the 2x tiled pass can."""
    widths = []
    for seed in range(6):
        seg = street_scene(64, 128, seed)
        for c in (POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN):
            m = seg == c
            for row in m[m.any(axis=1)]:
                runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
                widths.extend(runs.tolist())
    assert widths and np.median(widths) <= 4 and np.mean(np.asarray(widths) <= 4) > 0.8


def test_evaluation_layout_shifts_the_content():
    """A higher camera looking further down: more road, less sky than the source layout."""
    share = lambda layout, c: np.mean([(street_scene(64, 128, s, layout=layout) == c).mean()  # noqa: E731
                                       for s in range(12)])
    assert share(TARGET_LAYOUT, SKY) < 0.8 * share(Layout(), SKY)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    spec = WorldSpec(base=32, source=4, prior=22, eval=2, oracle=15, styles=2, seed=1)
    return write_world(root, spec), spec


def test_world_layouts_are_read_by_the_real_data_tools(world):
    root, spec = world
    layout, path = parse_spec(f"gta:{root / 'source'}")
    src = SegDataset(path, layout, "train")
    assert len(src) == spec.source
    image, label = src.load(0)
    assert np.asarray(image).shape[:2] == label.shape == (32, 64)
    assert np.asarray(Image.open(src.pairs[1][0])).shape[:2] == (64, 128)  # every other scene at twice the size
    for style in (SOURCE, *PRIOR_STYLES, *UNSEEN_STYLES):
        layout, path = parse_spec(f"cityscapes:{root / 'eval' / style.name}")
        ev = SegDataset(path, layout, "val")
        assert len(ev) == spec.eval
    # the same evaluation scenes in every style
    a = sorted((root / "eval" / "fog" / "gtFine").rglob("*" + "_gtFine_labelTrainIds.png"))[0]
    b = sorted((root / "eval" / "night" / "gtFine").rglob("*" + "_gtFine_labelTrainIds.png"))[0]
    assert np.array_equal(load_label(a), load_label(b))
    rows = [json.loads(line) for line in (root / "prior" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == spec.prior and {r["style"] for r in rows} == {s.name for s in PRIOR_STYLES}
    words = {s.name: s.word for s in PRIOR_STYLES}
    for r in rows:
        assert words[r["style"]] in r["text"] and (root / "prior" / r["file_name"]).is_file()
    assert np.mean([any(name in r["text"] for name in CLASS_NAMES) for r in rows]) > 0.5  # most list the classes
    assert len(list((root / "oracle" / "labels").glob("*" + TRAIN_ID_SUFFIX))) == spec.oracle
    # the oracle set as a jsonl dataset file: every pair with the style it is painted in, in turn
    records = read_dataset_file(root / "oracle" / "dataset.jsonl")
    order = (SOURCE, *PRIOR_STYLES, *UNSEEN_STYLES)
    assert [r["style"] for r in records] == [order[i % len(order)].name for i in range(spec.oracle)]
    for r in records:
        label = load_label(r["label_path"])
        assert r["weather"] == STYLES[r["style"]].word and r["label_path"].endswith(r["conditioning_image"])
        assert r["text"].split() == " ".join(CLASS_NAMES[c] for c in np.unique(label) if c < 19).split()
    assert sorted(p.name for p in (root / "styles" / "train").iterdir()) == sorted(s.name for s in CLASSIFIED)


def test_world_is_resumable_and_refuses_another_spec(world):
    root, spec = world
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    listed = (root / "oracle" / "dataset.jsonl").read_text()
    write_world(root, spec)  # nothing to do: no file is rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
    assert (root / "oracle" / "dataset.jsonl").read_text() == listed
    with pytest.raises(ValueError, match="holds a world made with"):
        write_world(root, WorldSpec(base=32, source=5))
