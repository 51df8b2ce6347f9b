"""The dataset CLI: outputs, manifest, seeds, resume, sharding and bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mrlf import generate
from segmentation.labels import save_label
from segmentation.synthetic import street_scene

FAST = ["--size", "64", "--steps", "2", "--window", "8", "--stride", "4", "--threshold", "300", "--no-progress"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    for i in range(3):
        save_label(street_scene(96, 128, i), d / f"{i:05d}_labelTrainIds.png")
    return d


def _run(out, labels, *extra, n=3):
    return generate.main(["--labels", str(labels), "-n", str(n), "--out", str(out), *FAST, *extra])


def _files(out):
    return {os.path.relpath(os.path.join(r, f), out): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(out) for f in fs if f != "manifest.jsonl"}


def _manifest(out):
    return [json.loads(line) for line in open(out / "manifest.jsonl")]


@pytest.fixture(scope="module")
def full_run(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert _run(out, labels) == 0
    return out


def test_outputs_and_manifest(full_run, labels):
    rows = _manifest(full_run)
    assert [r["index"] for r in rows] == [0, 1, 2]
    keys = {"id", "index", "seed", "global_seed", "prompt", "weather", "class", "class_name", "source", "crop_box",
            "large_components", "image", "label", "settings", "timing_s"}
    assert all(keys <= set(r) for r in rows)
    assert len({r["seed"] for r in rows}) == 3
    for r in rows:
        img = Image.open(full_run / r["image"])
        lab = np.asarray(Image.open(full_run / r["label"]))
        x1, y1, x2, y2 = r["crop_box"]
        src = np.asarray(Image.open(r["source"]))
        assert img.size == (64, 64) and img.mode == "RGB" and (x2 - x1, y2 - y1) == (64, 64)
        assert np.array_equal(lab, src[y1:y2, x1:x2])  # saved label = the crop, void kept as 255
        assert r["class"] is not None and (lab == r["class"]).any()
        assert Image.open(full_run / "vis" / f"{r['id']}.png").size == (192, 64)
        assert r["prompt"].endswith("weather.") == (r["weather"] is not None)


def test_resume_after_interruption_gives_identical_files(full_run, labels, tmp_path):
    assert _run(tmp_path, labels, "--only", "1") == 0  # an "interrupted" run that finished only sample 1
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "torn')  # and a torn line from a kill mid-write
    (tmp_path / "images" / ".tmp-dead.png").write_bytes(b"half")  # a dead temp file is ignored
    assert _run(tmp_path, labels) == 0
    rows = _manifest_lines_ok(tmp_path)
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    got = {k: v for k, v in _files(tmp_path).items() if ".tmp-" not in k}
    assert got == _files(full_run)


def _manifest_lines_ok(out):
    rows = []
    for line in open(out / "manifest.jsonl"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_two_ranks_are_disjoint_and_complete(full_run, labels, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert _run(tmp_path, labels) == 0
    ids = [r["id"] for r in _manifest(tmp_path)]
    assert len(ids) == len(set(ids)) == 3
    assert _files(tmp_path) == _files(full_run)


def test_one_sample_regenerates_alone(full_run, labels, tmp_path):
    assert _run(tmp_path, labels, "--only", "2") == 0
    row = _manifest(tmp_path)[0]
    assert row["index"] == 2
    for sub in ("images", "labels"):
        name = os.path.basename(row["image" if sub == "images" else "label"])
        assert (tmp_path / sub / name).read_bytes() == (full_run / sub / name).read_bytes()


def test_gen_file_and_single_maps(labels, tmp_path):
    jobs = tmp_path / "7.json"
    jobs.write_text(json.dumps([{"class": "13", "class_name": "car", "file_name": str(labels / "00000_labelTrainIds.png")}]))
    assert generate.main(["--jobs", str(jobs), "--out", str(tmp_path / "a"), *FAST]) == 0
    assert _manifest(tmp_path / "a")[0]["class"] == 13
    assert generate.main(["--label-maps", str(labels / "00001_labelTrainIds.png"), "--out", str(tmp_path / "b"),
                          *FAST]) == 0
    assert _manifest(tmp_path / "b")[0]["crop_box"] == [32, 16, 96, 80]  # centre crop


def test_bad_inputs_fail_clearly(labels, tmp_path):
    bad = tmp_path / "bad_labelTrainIds.png"
    Image.fromarray(np.full((96, 128), 42, np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"bad_labelTrainIds.png.*42"):
        generate.main(["--label-maps", str(bad), "--out", str(tmp_path / "o1"), *FAST])
    lab = np.asarray(Image.open(labels / "00000_labelTrainIds.png"))
    absent = next(c for c in range(19) if not (lab == c).any())
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"class": str(absent), "file_name": str(labels / "00000_labelTrainIds.png")}]))
    with pytest.raises(ValueError, match="00000_labelTrainIds"):
        generate.main(["--jobs", str(jobs), "--out", str(tmp_path / "o2"), *FAST])
    with pytest.raises(ValueError, match="smaller than the crop"):
        generate.main(["--label-maps", str(labels / "00000_labelTrainIds.png"), "--out", str(tmp_path / "o3"),
                       "--size", "128", "--steps", "1", "--no-progress"])
    assert not (tmp_path / "o3").exists()  # nothing half-written, not even an empty output tree


def test_unwritable_output(labels, tmp_path):
    target = tmp_path / "file"
    target.write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="not writable"):
        _run(target / "out", labels)
    assert target.read_text() == "a file, not a folder"


def test_cli_argument_errors():
    with pytest.raises(SystemExit):
        generate.parse_args(["--random-tiny", "--controlnet", "x"])
    with pytest.raises(SystemExit):
        generate.parse_args(["--random-tiny", "--style", "0.5"])
    with pytest.raises(SystemExit):
        generate.parse_args(["--faithful", "--blend", "tent"])
    assert generate.parse_args(["--faithful", "--blend", "uniform"]).faithful
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        generate.main(["--cuda-graphs", "--device", "cpu"])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sampler_flag(full_run, labels, tmp_path, sampler):
    assert _run(tmp_path, labels, "--sampler", sampler, "--only", "0") == 0
    row = _manifest(tmp_path)[0]
    assert row["settings"]["sampling"]["sampler"] == sampler
    assert _manifest(full_run)[0]["settings"]["sampling"]["sampler"] == "ddim"
    image = np.asarray(Image.open(tmp_path / row["image"]))
    assert image.shape == (64, 64, 3) and not np.array_equal(image, np.asarray(Image.open(full_run / row["image"])))
    with pytest.raises(SystemExit):
        generate.parse_args(["--faithful", "--sampler", sampler])


def test_eta_flag_draws_noise_per_step_and_is_recorded(full_run, labels, tmp_path):
    """--eta 1 changes the image (fresh noise per DDIM step, from the sample's own generator: a rerun
    gives the same file); it is recorded, and refused with samplers that draw no noise and with --faithful."""
    for out in (tmp_path / "a", tmp_path / "b"):
        assert _run(out, labels, "--eta", "1", "--only", "0") == 0
    row = _manifest(tmp_path / "a")[0]
    assert row["settings"]["sampling"]["eta"] == 1.0 and _manifest(full_run)[0]["settings"]["sampling"]["eta"] == 0
    image = lambda root: np.asarray(Image.open(root / row["image"]))  # noqa: E731
    assert np.array_equal(image(tmp_path / "a"), image(tmp_path / "b"))
    assert not np.array_equal(image(tmp_path / "a"), image(full_run))
    for argv in (["--eta", "1", "--sampler", "euler"], ["--eta", "0.5", "--faithful"], ["--eta", "-1"]):
        with pytest.raises(SystemExit):
            generate.parse_args(argv)


def test_keep_source_changes_the_image_is_recorded_and_checked(full_run, labels, tmp_path):
    """--keep-source out (the bundle's U^S output layer under the swap) changes the image and is recorded;
    a prefix that names no U-Net tensor is an error that lists the parts, and the flag needs a U^S."""
    assert _run(tmp_path / "k", labels, "--keep-source", "out", "--only", "0") == 0
    row = _manifest(tmp_path / "k")[0]
    assert row["settings"]["keep_source"] == ["out"] and "keep_source" not in _manifest(full_run)[0]["settings"]
    image = lambda root: np.asarray(Image.open(root / row["image"]))  # noqa: E731
    assert not np.array_equal(image(tmp_path / "k"), image(full_run))
    with pytest.raises(ValueError, match="no U-Net tensor under outp; its parts: time_embed input_blocks.0"):
        _run(tmp_path / "bad", labels, "--keep-source", "outp", "--only", "0")
    with pytest.raises(SystemExit):
        generate.parse_args(["--random-tiny", "--keep-source", "out"])


@pytest.mark.parametrize("window", ["control", "guidance"])
def test_step_window_flags_are_recorded_checked_and_old_folders_resume(full_run, labels, tmp_path, window):
    """--control-end 0.5 (the ControlNet off for the second of the two steps) and --guidance-end 0.5 (that
    step unguided) change the image and are recorded; a bad window and --faithful refuse them; a folder
    whose run.json predates the window resumes."""
    start, end = f"--{window}-start", f"--{window}-end"
    assert _run(tmp_path / "end", labels, end, "0.5", "--only", "0") == 0
    row = _manifest(tmp_path / "end")[0]
    sampling = row["settings"]["sampling"]
    assert (sampling[f"{window}_start"], sampling[f"{window}_end"]) == (0.0, 0.5)
    image = lambda root: np.asarray(Image.open(root / row["image"]))  # noqa: E731
    assert not np.array_equal(image(tmp_path / "end"), image(full_run))
    for argv in ([start, "0.6", end, "0.4"], [end, "0"], [start, "1"], [end, "0.5", "--faithful"]):
        with pytest.raises(SystemExit):
            generate.parse_args(argv)

    import shutil

    out = tmp_path / "old"
    shutil.copytree(full_run, out)
    run = json.loads((out / "run.json").read_text())
    for key in (f"{window}_start", f"{window}_end"):
        del run["sampling"][key]
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=rf"sampling.{window}_end: 1.0 in the folder, 0.5 now"):
        _run(out, labels, end, "0.5", n=4)
    assert _run(out, labels, n=4) == 0 and len(_manifest(out)) == 4


def test_sample_seed_is_stable():
    assert generate.sample_seed(0, 5) == generate.sample_seed(0, 5) != generate.sample_seed(1, 5)


# ---------------------------------------------------------------------------------------
# Runs that must not mix, numbers that must mean something, inputs checked up front
# ---------------------------------------------------------------------------------------

def test_resume_with_other_settings_is_refused(full_run, labels, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    before = (out / "manifest.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"steps.*2.*3") as e:
        _run(out, labels, "--steps", "3", n=4)
    assert "--overwrite" in str(e.value)
    with pytest.raises(ValueError, match=r"seed.*0.*1"):
        _run(out, labels, "--seed", "1")
    with pytest.raises(ValueError, match="size|height"):
        generate.main(["--labels", str(labels), "-n", "3", "--out", str(out), *FAST[2:], "--size", "128"])
    assert (out / "manifest.jsonl").read_bytes() == before  # nothing was added
    assert _run(out, labels, n=4) == 0  # the same settings resume (here: one more sample)
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2, 3]

    # --overwrite with a size the model cannot take fails before deleting anything
    with pytest.raises(ValueError, match="multiple of"):
        generate.main(["--labels", str(labels), "-n", "3", "--out", str(out), *FAST[2:], "--size", "72", "--overwrite"])
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2, 3] and len(os.listdir(out / "images")) == 4
    assert _run(out, labels, "--steps", "3", "--overwrite", n=2) == 0  # an explicit fresh start
    rows = _manifest(out)
    assert [r["index"] for r in rows] == [0, 1] and {r["settings"]["sampling"]["steps"] for r in rows} == {3}
    assert sorted(os.listdir(out / "images")) == sorted(os.path.basename(r["image"]) for r in rows)


def test_sample_ids_differ_across_seeds(labels, tmp_path):
    ids = []
    for seed in ("0", "1"):
        assert generate.main(["--label-maps", str(labels / "00000_labelTrainIds.png"), "--seed", seed,
                              "--out", str(tmp_path / seed), *FAST]) == 0
        ids += [r["id"] for r in _manifest(tmp_path / seed)]
    assert len(set(ids)) == 2


@pytest.mark.parametrize("bad", [["--steps", "0"], ["-n", "-3"], ["--guidance", "nan"], ["--guidance", "inf"],
                                 ["--size", "0"], ["--seed", "-1"], ["--weather-prob", "1.5"], ["--view-batch", "0"],
                                 ["--stride", "0"], ["--only", "-1"], ["--control-scale", "nan"], ["--threads", "0"]])
def test_numbers_are_checked_when_parsed(bad, capsys):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(bad)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


def test_only_an_existing_sample_adds_no_manifest_line(labels, tmp_path):
    assert _run(tmp_path, labels, "--only", "1") == 0
    first = (tmp_path / "images").iterdir().__next__().read_bytes()
    assert _run(tmp_path, labels, "--only", "1", "1") == 0
    rows = _manifest(tmp_path)
    assert [r["index"] for r in rows] == [1]
    assert next((tmp_path / "images").iterdir()).read_bytes() == first


def test_every_input_is_checked_before_anything_is_written(labels, tmp_path):
    good = labels / "00000_labelTrainIds.png"
    bad = tmp_path / "bad_labelTrainIds.png"
    Image.fromarray(np.full((96, 128), 42, np.uint8)).save(bad)
    with pytest.raises(ValueError, match="bad_labelTrainIds"):
        generate.main(["--label-maps", str(good), str(bad), "--out", str(tmp_path / "o"), *FAST])
    small = tmp_path / "small_labelTrainIds.png"
    save_label(np.zeros((32, 32), np.uint8), small)
    with pytest.raises(ValueError, match="small_labelTrainIds.*smaller"):
        generate.main(["--label-maps", str(good), str(small), "--out", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o").exists()  # a failed run leaves no (empty) output tree


def test_a_folder_without_label_files_names_the_pattern(tmp_path):
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(ValueError, match=r"no file.*_labelTrainIds\.png"):
        generate.main(["--labels", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o").exists()


def test_non_square_crops_and_several_images_per_label(labels, tmp_path):
    src = labels / "00001_labelTrainIds.png"
    assert generate.main(["--label-maps", str(src), "--out", str(tmp_path), *FAST, "--height", "64", "--width", "128",
                          "--images-per-label", "3"]) == 0
    rows = _manifest(tmp_path)
    assert [r["index"] for r in rows] == [0, 1, 2] and len({r["seed"] for r in rows}) == 3
    assert len({r["id"] for r in rows}) == 3
    images = [np.asarray(Image.open(tmp_path / r["image"])) for r in rows]
    assert all(im.shape == (64, 128, 3) for im in images)
    assert not np.array_equal(images[0], images[1])
    assert all(r["crop_box"] == [0, 16, 128, 80] for r in rows)  # the centre crop of the 96x128 map
    assert np.asarray(Image.open(tmp_path / rows[0]["label"])).shape == (64, 128)


def test_progress_follows_the_steps_and_writes_lines_into_a_log(labels, tmp_path, capsys, monkeypatch):
    from ldm import cli

    calls = []
    update = cli.Progress.update
    monkeypatch.setattr(cli.Progress, "update", lambda self, n=1, *a, **k: (calls.append(n), update(self, n, *a, **k)))
    assert generate.main(["--labels", str(labels), "-n", "2", "--out", str(tmp_path), *FAST[:-1]]) == 0
    assert calls.count(1) == sum(calls) == 2 * 2 * 2  # two samples, two passes of two steps: one update per step
    err = capsys.readouterr().err
    assert "\r" not in err  # not a terminal: whole lines
    assert "8/8 steps" in err and "sample 2/2" in err


def test_rare_class_sampling_follows_the_bundle_and_the_flag():
    """The shipped bundle's labels are 8192 pixels: with DGInStyle's 3000-pixel minimum (GTA's labels
    have 2 M) only road would be eligible; the bundle's own minimum lets the rare classes be drawn."""
    args = generate.parse_args(["-n", "64", "--out", "unused"])
    assert args.rcs_min_pixels == 20 and args.rcs_temperature == 0.01
    relative = os.path.relpath(generate.SHIPPED)  # the package's labels get no statistics cache, named either way
    assert args.labels_shipped and generate.parse_args(["--bundle", relative, "--out", "unused"]).labels_shipped
    drawn = {j["class_name"] for j in generate.make_jobs(args)}
    assert {"pole", "person", "rider", "bicycle"} <= drawn
    args = generate.parse_args(["-n", "64", "--out", "unused", "--rcs-min-pixels", "3000"])
    assert {j["class_name"] for j in generate.make_jobs(args)} == {"road"}
    settings = generate.run_settings(args, *generate.settings_from_args(args), None)
    assert settings["inputs"]["rcs_min_pixels"] == 3000  # a resume with another minimum is refused


def test_a_bundle_sets_the_guidance_window_and_a_flag_wins(tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(generate.SHIPPED, bundle)
    desc = json.loads((bundle / "bundle.json").read_text())
    desc["generation"] |= {"guidance_end": 0.5}
    (bundle / "bundle.json").write_text(json.dumps(desc))
    sampling = lambda *a: generate.settings_from_args(  # noqa: E731
        generate.parse_args(["--bundle", str(bundle), "--out", "unused", *a]))[0]
    assert (sampling().guidance_start, sampling().guidance_end) == (0.0, 0.5)
    assert sampling("--guidance-end", "0.8").guidance_end == 0.8
    assert generate.settings_from_args(generate.parse_args(["--out", "unused"]))[0].guidance_end == 1.0
    with pytest.raises(SystemExit):  # the bundle's end below the flag's start
        generate.parse_args(["--bundle", str(bundle), "--out", "unused", "--guidance-start", "0.6"])


def test_preset_and_view_settings():
    fusion = lambda *a: generate.settings_from_args(generate.parse_args(["--out", "unused", *a]))[1]  # noqa: E731
    assert (fusion().stride, fusion().component_threshold) == (8, 512)  # the shipped bundle's own
    assert (fusion("--preset", "demo").stride, fusion("--preset", "demo").component_threshold) == (16, 30000)
    assert fusion("--preset", "demo", "--stride", "4").stride == 4  # a flag wins over the preset
    with pytest.raises(SystemExit):
        generate.parse_args(["--out", "unused", "--stride", "32"])  # larger than the bundle's window 16
    with pytest.raises(SystemExit):
        generate.parse_args(["--out", "unused", "--base", "sd.safetensors"])  # no ControlNet: labels ignored
    with pytest.raises(SystemExit):
        generate.parse_args(["--out", "unused", "--random-tiny", "--style-source", "us.safetensors"])
    tiny = generate.parse_args(["--out", "unused", "--random-tiny", "--size", "64"])
    assert tiny.window == 8 and tiny.stride == 8  # the default stride fits the small window


def test_corrupt_run_record_and_bundle_description_are_named(full_run, labels, tmp_path):
    import shutil

    from mrlf.bundle import BundleError, load_bundle

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    (out / "run.json").write_text("{not json")
    with pytest.raises(generate.RunMismatch, match=r"run.json: unreadable"):
        _run(out, labels)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"bundle.json: not a bundle description"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"generation": {"size": "64", "weather_words": []}}))
    with pytest.raises(BundleError, match=r"wrong type or range: size='64', weather_words=\[\]"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"generation": {"guidance_end": 1.5, "weather_prob": -1}}))
    with pytest.raises(BundleError, match=r"wrong type or range: guidance_end=1.5, weather_prob=-1"):
        load_bundle(tmp_path / "b")

