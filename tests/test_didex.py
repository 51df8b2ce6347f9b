"""mrlf.didex: the prompt engine against hand computations (every template, the class-balancing
histogram over a sequence of label maps), prompts determined by the sample seeds, and the CLI's
three generators (outputs, manifest, resume, --only) on the tiny model."""

import numpy as np
import pytest
from PIL import Image

from mrlf import didex
from mrlf.didex import (CONDITIONS, LOCATIONS, TEMPLATES, ClassBalancer, PromptConfig, generation_size,
                        least_classes, make_prompt, plan, prepare_inputs)
from mrlf.generate import sample_seed
from segmentation.datasets import SegDataset, find_images
from segmentation.labels import save_label
from segmentation.synthetic import street_scene
from tests.test_generate import _files, _manifest


class Draws:
    """A stand-in for np.random.Generator that returns given values from ``integers``."""

    def __init__(self, *values):
        self.values, self.calls = list(values), []

    def integers(self, n):
        self.calls.append(n)
        return self.values.pop(0)


@pytest.mark.parametrize("template, draws, classes, least, text", [
    ("rand_location_uni_cls_rand_cond", (4, 2, 10), [0, 1, 10, 13], 15,
     "A high quality photo; India;City, bus, road, sidewalk, sky, car, Night/Darkness"),
    ("rand_location_uni_cls_rand_cond", (0, 0, 1), [0], 3, "A high quality photo; europe;, wall, road, Fog/Mist"),
    ("uni_cls_rand_cond", (1, 1, 20), [0, 16], 18, "A high quality photo; germany;Highway, bicycle, road, train, Summer"),
    ("rand_location_uni_cls", (3, 0), [2, 8], 16, "A high quality photo; USA;, train, building, vegetation"),
    ("rand_location", (2, 2), [0, 11], 7, "A high quality photo; China;City, road, person"),
    ("rand_cond", (0, 0, 2), [0, 1], 4, "A high quality photo; europe, Snowy, road, sidewalk"),
    ("rand_cond", (1, 1, 3), [0], 4, "A high quality photo; germany;Highway, Sunny, road"),
    ("uni_cls", (1, 2), [0, 16], 16, "A high quality photo; germany;City, tram/ train/ trolley, road, "
                                     "tram/ train/ trolley"),
])
def test_every_template_by_hand(template, draws, classes, least, text):
    rng = Draws(*draws)
    p = make_prompt(classes, least, rng, PromptConfig(template))
    assert p.text == text
    t = TEMPLATES[template]
    assert rng.calls == [t.locations, 3] + ([21] if t.condition else [])  # location, road type, condition
    assert (p.least_class is not None) == t.least and (p.condition is not None) == bool(t.condition)


def test_vocabularies():
    assert len(CONDITIONS) == 21 and len(LOCATIONS) == 5
    assert PromptConfig().places == LOCATIONS and PromptConfig("uni_cls").places == ("europe", "germany")
    custom = PromptConfig(locations=["Zurich"], road_types=["street"], conditions=["foggy"], base="a photo; ")
    assert make_prompt([0], 5, np.random.default_rng(0), custom).text == "a photo; Zurich;street, pole, road, foggy"
    with pytest.raises(ValueError, match="unknown DIDEX template"):
        PromptConfig("nope")


def test_balancing_histogram_by_hand():
    # classes 5..18 kept out (as the SYNTHIA script does with the classes it lacks): only 0..4 compete
    b = ClassBalancer(exclude=range(5, 19))
    seq = [[0, 1, 2], [0, 2], [0], [1], [0, 1, 2, 3, 4]]
    # hist [1,1,1,0,0] -> 3 | [2,1,2,1,0] -> 4 | [3,1,2,1,1] -> 1 (first minimum) | [3,3,2,1,1] -> 3 | [4,4,3,3,2] -> 4
    assert [b.update(p) for p in seq] == [3, 4, 1, 3, 4]
    assert b.hist[:5].tolist() == [4, 4, 3, 3, 3]
    everything_but_7 = [c for c in range(19) if c != 7]
    assert least_classes([everything_but_7, everything_but_7]) == [7, 7]  # 7 lags: 0 then 1 against 1 then 2
    assert least_classes([everything_but_7, list(range(19))]) == [7, 0]  # all at 2: the first minimum
    assert least_classes([[]]) == [0]


def _write_source(root, label_classes, size=(48, 64)):
    """A 'folder' dataset whose label i holds exactly the classes ``label_classes[i]`` (stripes)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, classes in enumerate(label_classes):
        lab = np.full(size, 255, dtype=np.uint8)
        for k, c in enumerate(classes):
            lab[:, k * 4:(k + 1) * 4] = c
        save_label(lab, root / "labels" / f"{i:03d}_labelTrainIds.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
    return root


def test_plan_runs_the_histogram_over_the_label_maps(tmp_path):
    seq = [[0, 1, 2], [0, 2], [0], [1], [0, 1, 2, 3, 4]]
    ds = SegDataset(_write_source(tmp_path / "src", seq), "folder")
    jobs = plan(ds, None, seed=0, shuffle=False, exclude=range(5, 19))
    assert [j["pair"] for j in jobs] == [0, 1, 2, 3, 4]
    assert [j["classes"] for j in jobs] == seq
    assert [j["least"] for j in jobs] == [3, 4, 1, 3, 4]
    cycled = plan(ds, 7, seed=0, shuffle=False, exclude=range(5, 19))
    assert [j["pair"] for j in cycled] == [0, 1, 2, 3, 4, 0, 1]
    assert [j["least"] for j in cycled] == least_classes([seq[i % 5] for i in range(7)], range(5, 19))
    shuffled = plan(ds, None, seed=3, shuffle=True)
    order = np.random.default_rng(3).permutation(5).tolist()
    assert [j["pair"] for j in shuffled] == order
    assert [j["least"] for j in shuffled] == least_classes([seq[i] for i in order])


def test_prompts_are_determined_by_the_sample_seeds():
    cfg = PromptConfig()
    prompts = [make_prompt([0, 2, 10], 12, np.random.default_rng(sample_seed(0, i)), cfg).text for i in range(20)]
    again = [make_prompt([0, 2, 10], 12, np.random.default_rng(sample_seed(0, i)), cfg).text for i in range(20)]
    other = [make_prompt([0, 2, 10], 12, np.random.default_rng(sample_seed(1, i)), cfg).text for i in range(20)]
    assert prompts == again and prompts != other
    assert len(set(prompts)) > 10  # 5 x 3 x 21 prompts to draw from


def test_generation_size_and_inputs():
    assert generation_size(1052, 1914, 0.5, 64) == (526, 957, 576, 960)  # GTA, halved, padded as the original
    assert generation_size(40, 40, 1.0, 64) == (40, 40, 128, 128)  # at least two multiples
    image = np.zeros((6, 10, 3), dtype=np.uint8)
    image[:, -1] = 200  # the last column: repeated into the edge padding
    label = np.arange(60, dtype=np.uint8).reshape(6, 10) % 19
    init, hint, hw = prepare_inputs(image, label, 1.0, 8)
    assert init.shape == (1, 3, 16, 16) and hw == (6, 10)
    assert np.array_equal(hint[:6, :10], label) and (hint[6:] == 255).all() and (hint[:, 10:] == 255).all()
    assert np.allclose(init[0, :, :, 10:].numpy(), 200 / 127.5 - 1, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The CLI on the tiny model
# --------------------------------------------------------------------------------------------
FAST = ["--steps", "2", "--scale", "1", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("didex_src")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = street_scene(48, 64, seed=i)
        save_label(lab, root / "labels" / f"{i:05d}_labelTrainIds.png")
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i:05d}.png")
    return root


def _run(out, source, *extra):
    return didex.main(["--source", f"gta:{source}", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def img2img_run(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptd")
    assert _run(out, source) == 0
    return out


def test_img2img_outputs_and_manifest(img2img_run, source):
    rows = _manifest(img2img_run)
    assert [r["index"] for r in rows] == [0, 1, 2]
    ds = SegDataset(source, "gta")
    jobs = plan(ds, None, 0, False)
    for r, job in zip(rows, jobs):
        assert r["seed"] == sample_seed(0, r["index"]) and r["generator"] == "img2img"
        assert r["settings"]["sampling"]["strength"] == 0.9 and r["settings"]["sampling"]["guidance_scale"] == 9.0
        expected = make_prompt(job["classes"], job["least"], np.random.default_rng(r["seed"]), PromptConfig())
        assert r["prompt"] == expected.text and r["prompt"].startswith("A high quality photo; ")
        assert r["condition"] in CONDITIONS and "label" not in r
        assert Image.open(img2img_run / r["image"]).size == (64, 48)  # back at the source size
        assert r["source_image"].endswith(f"{r['index']:05d}.png")
    assert not any((img2img_run / "labels").iterdir()) and not any((img2img_run / "vis").iterdir())
    # the training target of train_uda: the manifest's images
    assert [p.name for p in find_images(img2img_run)] == [f"{r['id']}.png" for r in rows]


def test_only_and_resume_reproduce_samples(img2img_run, source, tmp_path):
    assert _run(tmp_path, source, "--only", "1") == 0  # sample 1 alone: the same bytes and prompt
    assert _files(tmp_path)["images/000001_s0_00001.png"] == _files(img2img_run)["images/000001_s0_00001.png"]
    assert _manifest(tmp_path)[0]["prompt"] == _manifest(img2img_run)[1]["prompt"]
    assert _run(tmp_path, source) == 0  # the resumed run adds 0 and 2
    assert sorted(r["index"] for r in _manifest(tmp_path)) == [0, 1, 2]
    assert _files(tmp_path) == _files(img2img_run)
    assert _run(tmp_path, source, "--only", "0", "0") == 0  # a done sample, twice: regenerated once, no new line
    assert sorted(r["index"] for r in _manifest(tmp_path)) == [0, 1, 2]
    assert _files(tmp_path) == _files(img2img_run)


def test_controlnet_and_txt2img_generators(source, tmp_path):
    assert _run(tmp_path / "cn", source, "--generator", "controlnet", "-n", "2") == 0
    rows = _manifest(tmp_path / "cn")
    ds = SegDataset(tmp_path / "cn", "dginstyle")  # labelled: usable as DGInStyle data
    assert len(ds) == 2
    for r in rows:
        got = np.asarray(Image.open(tmp_path / "cn" / r["label"]))
        assert np.array_equal(got, np.asarray(Image.open(r["source_label"])))  # the source label, kept
        assert (tmp_path / "cn" / "vis" / f"{r['id']}.png").is_file()
    # the ControlNet for the first half of the steps only: another image of the same sample, recorded
    assert _run(tmp_path / "end", source, "--generator", "controlnet", "--only", "0", "--control-end", "0.5") == 0
    row = _manifest(tmp_path / "end")[0]
    assert row["id"] == rows[0]["id"] and row["settings"]["sampling"]["control_end"] == 0.5
    assert _files(tmp_path / "end")[row["image"]] != _files(tmp_path / "cn")[row["image"]]
    # guidance in the first half of the steps only: the same sample again, another image, recorded
    assert _run(tmp_path / "guided", source, "--generator", "controlnet", "--only", "0", "--guidance-end", "0.5") == 0
    row = _manifest(tmp_path / "guided")[0]
    assert row["id"] == rows[0]["id"] and row["settings"]["sampling"]["guidance_end"] == 0.5
    assert _files(tmp_path / "guided")[row["image"]] != _files(tmp_path / "cn")[row["image"]]
    assert _run(tmp_path / "t2i", source, "--generator", "txt2img", "-n", "1", "--template", "rand_cond") == 0
    row = _manifest(tmp_path / "t2i")[0]
    assert row["settings"]["sampling"]["strength"] == 1.0 and row["least_class"] is None
    assert Image.open(tmp_path / "t2i" / row["image"]).size == (64, 48)


def test_img2img_from_a_checkpoint_file(img2img_run, source, tmp_path):
    """--base FILE loads the model from a file: the tiny random model saved and loaded back gives the
    run without --base the same bytes."""
    from ldm import checkpoint as ckpt_io
    from ldm.sd import StableDiffusion

    sd = StableDiffusion.random("tiny", seed=0)  # the model a run without --base builds
    base = tmp_path / "tiny.safetensors"
    ckpt_io.save_native(base, {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder})
    assert _run(tmp_path / "out", source, "--base", str(base), "--steps", "2", "-n", "1") == 0
    row = _manifest(tmp_path / "out")[0]
    assert row["settings"]["base"] == str(base)
    assert _files(tmp_path / "out")[row["image"]] == _files(img2img_run)[row["image"]]


def test_model_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    base = ["--source", f"gta:{tmp_path}", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        didex.parse_args([*base, "--style-source", "us.safetensors", "--style", "0.5"])  # no --base to blend into
    with pytest.raises(SystemExit):
        didex.parse_args([*base, "--base", "sd.safetensors", "--keep-source", "out"])
    assert "--keep-source needs --style-source" in capsys.readouterr().err
    assert didex.parse_args([*base, "--base", "sd.safetensors", "--style-source", "us.safetensors",
                             "--keep-source", "out"]).keep_source == ["out"]
    with pytest.raises(SystemExit):
        didex.parse_args([*base, "--base", "sd.safetensors", "--controlnet", "cn.safetensors"])  # img2img: unused
    assert didex.parse_args([*base, "--base", "sd.safetensors", "--controlnet", "cn.safetensors",
                             "--generator", "controlnet"]).controlnet == "cn.safetensors"
    for control in (["--control-scale", "0.5"], ["--control-end", "0.7"], ["--control-start", "0.2"]):
        with pytest.raises(SystemExit):
            didex.parse_args([*base, *control])  # no ControlNet to scale or switch off
    with pytest.raises(SystemExit):
        didex.parse_args([*base, "--generator", "controlnet", "--control-start", "0.7", "--control-end", "0.7"])
    args = didex.parse_args([*base, "--generator", "controlnet", "--control-end", "0.7"])
    assert (args.control_start, args.control_end) == (0.0, 0.7)
    args = didex.parse_args([*base, "--guidance-start", "0.2"])  # any generator guides
    assert (args.guidance_start, args.guidance_end) == (0.2, 1.0)
    with pytest.raises(SystemExit):
        didex.parse_args([*base, "--guidance-start", "0.6", "--guidance-end", "0.5"])

