import os

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation import labels as L


def _write(path, arr, mode="L", palette=None):
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, np.uint8).tobytes())
    if palette is not None:
        im.putpalette(palette)
    im.save(path)
    return path


def _mode(path):
    with Image.open(path) as im:
        return im.mode


# ---------------------------------------------------------------- classes, palette, LUTs
def test_classes_and_palette():
    assert len(L.CLASS_NAMES) == L.NUM_CLASSES == 19
    assert L.CLASS_NAMES[6] == "traffic light" and L.CLASS_NAMES[7] == "traffic sign"
    assert L.CLASS_NAMES[0] == "road" and L.CLASS_NAMES[18] == "bicycle"
    assert L.PALETTE.shape == (19, 3) and L.PALETTE.dtype == np.uint8
    assert L.PALETTE[0].tolist() == [128, 64, 128] and L.PALETTE[13].tolist() == [0, 0, 142]
    assert L.PALETTE[18].tolist() == [119, 11, 32]
    assert (L.IGNORE, L.VOID_CHANNEL, L.NUM_CHANNELS) == (255, 19, 20)


def test_class_name_lookup():
    assert L.class_name(6) == "traffic light"
    assert L.class_id("traffic light") == 6
    assert L.class_id("Traffic_Sign") == 7
    assert L.class_id("15") == 15 and L.class_id(np.int64(3)) == 3
    assert L.class_names([13, 0]) == ["car", "road"]
    with pytest.raises(KeyError):
        L.class_name(19)
    with pytest.raises(KeyError):
        L.class_id("lamp post")


@pytest.mark.parametrize("source", ["gta", "cityscapes"])
def test_lut_gta_cityscapes(source):
    lut = L.LUTS[source]
    assert lut.shape == (256,) and lut.dtype == np.uint8
    expect = {7: 0, 8: 1, 11: 2, 17: 5, 19: 6, 20: 7, 23: 10, 24: 11, 26: 13, 28: 15, 31: 16, 33: 18}
    for raw, t in expect.items():
        assert lut[raw] == t
    mapped = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    for raw in set(range(256)) - mapped:  # everything else -> 255 (incl. 0 unlabeled, 29 caravan, 34)
        assert lut[raw] == 255, raw


def test_lut_mapillary():
    lut = L.LUTS["mapillary"]
    expect = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7,
              30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15,
              58: 16, 57: 17, 52: 18}
    for raw, t in expect.items():
        assert lut[raw] == t, raw
    for raw in set(range(256)) - set(expect):
        assert lut[raw] == 255, raw


def test_to_train_ids():
    raw = np.array([[7, 26, 0], [33, 255, 19]], dtype=np.uint8)
    out = L.to_train_ids(raw, "gta")
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 13, 255], [18, 255, 6]]
    assert L.to_train_ids(raw.astype(np.int32), "cityscapes").tolist() == out.tolist()
    assert L.to_train_ids(np.array([55, 13]), "mapillary").tolist() == [13, 0]
    with pytest.raises(ValueError, match="source"):
        L.to_train_ids(raw, "bdd")
    with pytest.raises(L.LabelError, match="300"):
        L.to_train_ids(np.array([1, 300]), "gta")


# ---------------------------------------------------------------- loading and validation
def test_load_label_mode_l(tmp_path):
    arr = np.array([[0, 1, 255], [18, 7, 7]], np.uint8)
    p = _write(tmp_path / "a.png", arr, "L")
    out = L.load_label(p)
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, arr)


def test_load_label_mode_p_gives_indices_not_colours(tmp_path):
    arr = np.array([[0, 13, 255], [10, 2, 2]], np.uint8)
    p = _write(tmp_path / "p.png", arr, "P", palette=L.COLOR_LUT.ravel().tolist())
    assert _mode(p) == "P"
    np.testing.assert_array_equal(L.load_label(p), arr)


def test_load_label_bad_values_name_file_and_values(tmp_path):
    arr = np.array([[0, 19, 200], [40, 40, 255]], np.uint8)
    p = _write(tmp_path / "bad_labelTrainIds.png", arr, "L")
    with pytest.raises(L.LabelError) as e:
        L.load_label(p)
    msg = str(e.value)
    assert "bad_labelTrainIds.png" in msg
    assert "19" in msg and "40" in msg and "200" in msg
    assert "255" not in msg.split("found")[1]  # 255 is allowed, not reported


def test_load_label_rejects_rgb(tmp_path):
    p = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(p)
    with pytest.raises(L.LabelError, match="rgb.png"):
        L.load_label(p)


def test_validate_label():
    a = np.array([[0, 18], [255, 3]], np.int64)
    out = L.validate_label(a, source="x")
    assert out.dtype == np.uint8 and out.tolist() == a.tolist()
    with pytest.raises(L.LabelError, match=r"crop 7.*\[-1, 19\]"):
        L.validate_label(np.array([-1, 19, 2]), source="crop 7")
    with pytest.raises(L.LabelError, match="integer"):
        L.validate_label(np.zeros((2, 2), np.float32))
    L.validate_label(np.array([19], np.uint8), allow_void_19=True)


def test_save_label_roundtrip(tmp_path):
    arr = np.array([[0, 255], [18, 5]], np.uint8)
    L.save_label(arr, tmp_path / "l.png")
    L.save_label(arr, tmp_path / "p.png", palette=True)
    assert _mode(tmp_path / "l.png") == "L" and _mode(tmp_path / "p.png") == "P"
    np.testing.assert_array_equal(L.load_label(tmp_path / "l.png"), arr)
    np.testing.assert_array_equal(L.load_label(tmp_path / "p.png"), arr)
    with Image.open(tmp_path / "p.png") as im:
        assert np.array(im.convert("RGB"))[1, 0].tolist() == [119, 11, 32]
    assert sorted(os.listdir(tmp_path)) == ["l.png", "p.png"]  # no temporaries left


# ---------------------------------------------------------------- one-hot, colours
def _eye_reference(label):
    lab = np.where(label == 255, 19, label)
    return np.moveaxis(np.eye(20)[lab], -1, -3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_one_hot_matches_eye_and_does_not_mutate(dtype):
    rng = np.random.default_rng(1)
    label = rng.choice(np.r_[np.arange(19), 255], size=(7, 9)).astype(dtype)
    label[0, 0] = 255
    before = label.copy()
    oh = L.one_hot(label)
    assert oh.shape == (20, 7, 9) and oh.dtype == torch.float32
    np.testing.assert_array_equal(oh.numpy(), _eye_reference(before))
    np.testing.assert_array_equal(label, before)  # input untouched (the original wrote 19)
    assert oh[19, 0, 0] == 1 and oh[:19, 0, 0].sum() == 0


def test_one_hot_batched_tensor_and_pil():
    rng = np.random.default_rng(2)
    label = rng.choice(np.r_[np.arange(19), 255], size=(3, 5, 4)).astype(np.int64)
    t = torch.from_numpy(label.copy())
    oh = L.one_hot(t)
    assert oh.shape == (3, 20, 5, 4)
    np.testing.assert_array_equal(oh.numpy(), _eye_reference(label))
    assert torch.equal(t, torch.from_numpy(label))  # int64 tensor input not mutated
    pil = Image.fromarray(label[0].astype(np.uint8))
    np.testing.assert_array_equal(L.one_hot(pil).numpy(), _eye_reference(label[0]))
    assert L.one_hot(label[0], dtype=torch.float16).dtype == torch.float16


def test_one_hot_rejects_bad_values():
    with pytest.raises(L.LabelError, match="20"):
        L.one_hot(np.array([[0, 20]], np.uint8))
    with pytest.raises(L.LabelError):
        L.one_hot(np.zeros((2, 2), np.float32))
    # 19 (the original's mutated void) is accepted as void
    assert L.one_hot(np.array([[19]], np.uint8))[19, 0, 0] == 1


def test_colorize():
    label = np.array([[0, 255], [13, 19]], np.uint8)
    rgb = L.colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[1, 0].tolist() == [0, 0, 142]
    assert rgb[0, 1].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(L.colorize(label.astype(np.int64)), rgb)
    assert L.colorize(np.array([[-3, 1000]])).tolist() == [[[0, 0, 0], [0, 0, 0]]]


# ---------------------------------------------------------------- folder conversion
def test_train_id_path():
    assert L.train_id_path("a/00001.png").as_posix() == "a/00001_labelTrainIds.png"
    assert L.train_id_path("x_gtFine_labelIds.png").name == "x_gtFine_labelTrainIds.png"


def test_convert_folder_gta(tmp_path):
    raw1 = np.array([[7, 26], [0, 33]], np.uint8)
    raw2 = np.array([[24, 24], [11, 1]], np.uint8)
    _write(tmp_path / "00001.png", raw1, "P", palette=[0, 0, 0] * 256)
    _write(tmp_path / "00002.png", raw2, "L")
    rep = L.convert_folder(tmp_path, "gta")
    assert [p.name for p in rep["written"]] == ["00001_labelTrainIds.png", "00002_labelTrainIds.png"]
    assert rep["skipped"] == []
    out1 = tmp_path / "00001_labelTrainIds.png"
    assert _mode(out1) == "L"
    assert L.load_label(out1).tolist() == [[0, 13], [255, 18]]
    assert L.load_label(tmp_path / "00002_labelTrainIds.png").tolist() == [[11, 11], [2, 255]]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left

    # second run: outputs exist -> skipped, files untouched, outputs not treated as inputs
    mtime = out1.stat().st_mtime_ns
    rep = L.convert_folder(tmp_path, "gta")
    assert rep["written"] == [] and len(rep["skipped"]) == 2
    assert out1.stat().st_mtime_ns == mtime
    assert len(list(tmp_path.glob("*.png"))) == 4
    rep = L.convert_folder(tmp_path, "gta", overwrite=True)
    assert len(rep["written"]) == 2


def test_convert_atomic_on_failure(tmp_path, monkeypatch):
    _write(tmp_path / "00001.png", np.array([[7]], np.uint8), "L")

    def boom(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        L.convert_folder(tmp_path, "gta")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["00001.png"]  # neither the output nor a temporary


def test_convert_cityscapes_and_cli(tmp_path):
    sub = tmp_path / "train" / "aachen"
    sub.mkdir(parents=True)
    _write(sub / "a_gtFine_labelIds.png", np.array([[7, 26]], np.uint8), "L")
    _write(sub / "a_gtFine_color.png", np.array([[1, 2]], np.uint8), "L")  # not an input
    assert L.main(["convert", "--source", "cityscapes", "--recursive", str(tmp_path)]) == 0
    assert sorted(p.name for p in sub.iterdir()) == [
        "a_gtFine_color.png", "a_gtFine_labelIds.png", "a_gtFine_labelTrainIds.png"]
    assert L.load_label(sub / "a_gtFine_labelTrainIds.png").tolist() == [[0, 13]]
    assert L.main(["check", "--recursive", str(tmp_path)]) == 0
    _write(sub / "b_labelTrainIds.png", np.array([[77]], np.uint8), "L")
    assert L.main(["check", "--recursive", str(tmp_path)]) == 1


def test_a_colour_label_saved_as_a_palette_png_is_refused(tmp_path):
    """Palette indices are train ids only under the trainId palette (or when the caller says so)."""
    colours = L.PALETTE[[13, 0, 10]]  # car, road, sky
    rgb = colours[np.array([[0, 1], [2, 2]])]
    Image.fromarray(rgb).quantize(colors=3).save(tmp_path / "colour.png")  # slots 0..2 in the order PIL picks
    assert _mode(tmp_path / "colour.png") == "P"
    with pytest.raises(L.LabelError, match=r"colour\.png.*palette.*segmentation\.labels convert --source color"):
        L.load_label(tmp_path / "colour.png")
    assert L.load_label(tmp_path / "colour.png", palette_ids=True).max() <= 2  # told: the indices are ids

    ids = np.array([[0, 13, 255], [10, 2, 2]], np.uint8)
    grey = _write(tmp_path / "grey.png", ids, "P", palette=[v for i in range(256) for v in (i, i, i)])
    with pytest.raises(L.LabelError, match="palette"):
        L.load_label(grey)
    np.testing.assert_array_equal(L.load_label(grey, palette_ids=True), ids)

    # the suggested conversion: colours -> train ids, other colours -> 255
    Image.fromarray(np.concatenate([rgb, [[[81, 0, 81], [0, 0, 0]]]]).astype(np.uint8)).save(tmp_path / "rgb.png")
    assert L.main(["convert", "--source", "color", str(tmp_path)]) == 0
    assert L.load_label(tmp_path / "colour_labelTrainIds.png").tolist() == [[13, 0], [10, 10]]
    assert L.load_label(tmp_path / "rgb_labelTrainIds.png").tolist() == [[13, 0], [10, 10], [255, 255]]


def test_check_refuses_a_missing_folder_and_a_folder_without_labels(tmp_path, capsys):
    from ldm.cli import run_cli

    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        L.main(["check", str(tmp_path / "does_not_exist")])
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(L.LabelError, match=r"no file matches '\*_labelTrainIds\.png'"):
        L.main(["check", str(tmp_path)])
    assert run_cli(L.main, ["check", str(tmp_path / "does_not_exist")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "does_not_exist" in err
