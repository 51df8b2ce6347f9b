"""The reproduction command (train/reproduce.py) and its metrics: entropy, small-component recall,
mean ± std over seeds, the style classifier over image files, and the command end to end at --toy size."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.components import component_recall, small_component_hits
from segmentation.metrics import entropy, mean_std
from segmentation.models.classifier import (ClassifierConfig, ImageClassifier, load_centre_crop, predict_files,
                                            top1_accuracy)
from segmentation.world import CLASSIFIED
from train import reproduce

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- metrics
def test_entropy_by_hand():
    assert entropy([5, 5, 5, 5]) == pytest.approx(2.0)  # four equal classes: log2(4)
    assert entropy([7, 0, 0]) == 0.0  # one class has everything
    assert entropy([1, 3]) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))  # 0.8113
    assert entropy([0.5, 0.25, 0.25]) == pytest.approx(1.5)  # probabilities work as counts
    assert entropy([2, 1, 1]) == pytest.approx(1.5)
    assert math.isnan(entropy([0, 0]))
    with pytest.raises(ValueError):
        entropy([1, -1])


def test_mean_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt(((-1)^2 + 0 + 1^2) / 2)
    m, s = mean_std([0.5, 0.7])
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02))
    m, s = mean_std([0.42])
    assert m == 0.42 and math.isnan(s)  # one seed: no spread
    with pytest.raises(ValueError):
        mean_std([])


def test_small_component_hits_by_hand():
    label = np.zeros((8, 8), np.uint8)  # road everywhere (one big component)
    label[0:2, 0:2] = 5  # pole, 4 px: predicted right -> hit
    label[0:3, 5:8] = 6  # traffic light, 9 px: 5 of 9 right (more than half) -> hit
    label[5, 5] = 6  # traffic light, 1 px, diagonal to the next one: they are one 8-connected component
    label[6, 6] = 6  # ... of 2 px, predicted wrong -> miss
    label[6:8, 0:2] = 11  # person, 4 px: exactly half right -> miss (not "more than half")
    label[4, 3] = 255  # void is never a component
    pred = np.zeros((8, 8), np.int64)
    pred[0:2, 0:2] = 5
    pred[0:3, 5:8] = 6
    pred[2, 5:8] = 0
    pred[1, 7] = 0  # 9 - 4 = 5 right
    pred[6, 0:2] = 11
    hits, totals = small_component_hits(label, torch.from_numpy(pred), max_area=16)
    assert totals[5] == 1 and totals[6] == 2 and totals[11] == 1 and totals[0] == 0  # road: 64 - 19 - 1 px, not small
    assert hits[5] == 1 and hits[6] == 1 and hits[11] == 0
    assert totals.sum() == 4 and hits.sum() == 2
    assert component_recall(hits, totals) == 0.5
    assert component_recall(hits, totals, classes=[5]) == 1.0
    assert math.isnan(component_recall(hits, totals, classes=[12]))
    # "smaller than": a 9 px component is not small under max_area 9
    h9, t9 = small_component_hits(label, pred, max_area=9)
    assert t9[6] == 1 and t9.sum() == 3
    with pytest.raises(ValueError):
        small_component_hits(label, pred[:4])


# ---------------------------------------------------------------------------------------------- the style classifier
def test_centre_crop_is_the_validation_view(tmp_path):
    """The classifier's measuring view is train_classifier's validation view (train.data's centre crop)."""
    from train.data import ImageDataset

    rng = np.random.default_rng(0)
    files = []
    for k, (h, w) in enumerate([(40, 70), (64, 64), (20, 50)]):  # wider, exact, smaller than the crop
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    data = ImageDataset(files, 32, (1.0,), "center")
    for j, f in enumerate(files):
        assert torch.equal(load_centre_crop(f, 32), data[(0, j)]["pixel_values"])


def test_predict_files_and_top1_accuracy(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(ClassifierConfig(("a", "b", "c"), "mit_tiny")).eval()
    files = []
    for k in range(5):
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(files[-1])
    probs = predict_files(model, files, 32, batch=2)
    x = torch.stack([load_centre_crop(f, 32) for f in files])
    with torch.no_grad():
        assert torch.allclose(probs, model(x).softmax(-1), atol=1e-6)
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(-1), torch.ones(5))
    pred = torch.tensor([0, 1, 1, 2, 0])
    acc = top1_accuracy(pred, [0, 1, 2, 2, 1], ("a", "b", "c"))
    assert acc["accuracy"] == pytest.approx(3 / 5)
    assert acc["per_class"] == {"a": 1.0, "b": 0.5, "c": 0.5}
    assert top1_accuracy(torch.tensor([0]), [0], ("a", "b"))["per_class"]["b"] is None


# ---------------------------------------------------------------------------------------------- figures
def test_charts_are_pngs(tmp_path):
    reproduce.bar_chart(tmp_path / "bar.png", ["a", "b", "c"], [0.3, math.nan, 0.5], [0.02, math.nan, math.nan],
                        "title", "mIoU")
    reproduce.line_chart(tmp_path / "line.png", [0, 0.5, 1], {"x": [0.1, 0.5, 0.9], "y": [None, 0.2, 0.3]}, "t", "k")
    for name in ("bar.png", "line.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            a = np.asarray(im.convert("RGB"))
        assert a.shape == (360, 640, 3) and len(np.unique(a.reshape(-1, 3), axis=0)) > 3  # something was drawn


def test_plan_and_arms():
    assert reproduce.Plan().scaled(2).images == 2 * reproduce.Plan().images
    names = [g.name for g in reproduce.generations(reproduce.Plan())]
    assert len(names) == len(set(names))
    assert {a.generated for a in reproduce.ARMS if a.generated} <= set(names)
    assert {reproduce.knob_name(0.0), reproduce.knob_name(1.0)} <= set(names)
    assert reproduce.VALIDATION not in reproduce.HELD_OUT


# ---------------------------------------------------------------------------------------------- end to end
def random_bundle(root: Path) -> Path:
    """A bundle of randomly initialised 'mini' networks with the world of its recipe beside it, laid out as
    python -m train.mini_world leaves them (ROOT/bundle, ROOT/world): every file loads as the real ones,
    in seconds instead of the smoke recipe's minutes (the images are noise; the command's plumbing is what
    is tested)."""
    from dataclasses import asdict

    from controlnet import ControlNet
    from controlnet.checkpoint import save_controlnet
    from ldm import checkpoint as ckpt_io
    from ldm.sd import StableDiffusion
    from segmentation.labels import NUM_CHANNELS
    from segmentation.models import build_segmentor, save_segmentor
    from segmentation.models.classifier import save_classifier
    from segmentation.world import PRIOR_STYLES, WorldSpec, write_world
    from train.train_controlnet import hint_blocks

    spec = WorldSpec(base=64, source=6, prior=0, eval=2, oracle=13, styles=2)
    write_world(root / "world", spec)
    b = root / "bundle"
    (b / "labels").mkdir(parents=True)
    sd = StableDiffusion.random("mini", seed=0)
    ckpt_io.save_native(b / "prior.safetensors", {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder})
    ckpt_io.save_native(b / "unet_s.safetensors", StableDiffusion.random("mini", seed=1).unet)
    cn = ControlNet.from_unet(sd.unet, hint_channels=NUM_CHANNELS,
                              hint_block_channels=hint_blocks(None, sd.latent_factor))
    save_controlnet(b / "controlnet.safetensors", cn)
    save_segmentor(build_segmentor("mini"), b / "oracle.safetensors")
    save_classifier(ImageClassifier(ClassifierConfig(tuple(s.name for s in CLASSIFIED))),
                    b / "style_classifier.safetensors")
    for f in sorted((root / "world" / "source" / "labels").glob("*.png"))[:2]:
        (b / "labels" / f.name).write_bytes(f.read_bytes())
    bundle = {"prior": "prior.safetensors", "source_unet": "unet_s.safetensors", "controlnet": "controlnet.safetensors",
              "oracle": "oracle.safetensors", "style_classifier": "style_classifier.safetensors", "labels": "labels",
              "generation": {"size": 64, "steps": 2, "window": 16, "stride": 8, "threshold": 512, "view_batch": 9,
                             "weather_prob": 1.0, "weather_words": [s.word for s in PRIOR_STYLES], "num_samples": 2},
              "recipe": {"spec": {"world": asdict(spec), "controlnet_steps": 2, "controlnet_batch": 2}}}
    (b / "bundle.json").write_text(json.dumps(bundle, indent=1))
    return b


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("mini_random"))


def check_report(out: Path, report: Path | None = None) -> None:
    """REPRODUCTION.md at OUT is well formed: its sections, a row of numbers for every arm (summary and per
    style), every knob value and small-object set, figures that load; the committed copy links its figures."""
    text = (out / "REPRODUCTION.md").read_text()
    for heading in ("## Claims", "## Downstream", "## Style diversity", "## Small objects", "## Samples"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    number = r"\d+\.\d( ± \d+\.\d)?"
    for arm in reproduce.ARMS:
        row = next(r for r in rows if r.startswith(f"| {arm.what} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 5 and all(re.fullmatch(number, c) for c in cells), row
        per_style = next(r for r in rows if r.startswith(f"| {arm.name} |"))
        assert len(re.findall(r"\| \d+\.\d ", per_style)) == len(reproduce.EVAL_STYLES), per_style
    plan = reproduce.Plan(**{k: tuple(v) if k == "knob" else v
                             for k, v in json.loads((out / "reproduce.json").read_text())["settings"]["plan"].items()})
    for k in plan.knob:
        assert re.search(rf"^\| {k:g} \| (\d+\.\d|n/a) \| \d+\.\d \| \d+\.\d\d \| (\d+\.\d|n/a) \|$", text, re.M), k
    small = [r for r in rows if r.startswith("| MRLF") or r.startswith("| single pass")]
    assert len(small) == 6 and all(len(re.findall(r"\| (\d+\.\d|n/a)", r)) == len(reproduce.SMALL_CLASSES) + 2
                                   for r in small), small
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4
    for link in links:
        with Image.open(out / link) as im:
            im.load()
            assert im.width > 100 and im.height > 50
    if report is not None:
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text()):
            assert (report.parent / link).is_file()


def test_report_from_results(tmp_path):
    """The report and figures from hand-made results of every arm and set (two seeds): fast, no models."""
    plan = reproduce.TOY
    rng = np.random.default_rng(0)
    scores = {a.name: {s.name: list(rng.uniform(0.1, 0.6, 2)) for s in reproduce.EVAL_STYLES} for a in reproduce.ARMS}
    classes = [s.name for s in CLASSIFIED]
    measures = {}
    for g in reproduce.generations(plan):
        folder = tmp_path / "gen" / g.name
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir()
        lines = []
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
            Image.fromarray(rng.integers(0, 19, (64, 64), dtype=np.uint8)).save(folder / "labels" / f"{i}.png")
            lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "label": f"labels/{i}.png"}))
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        counts = rng.integers(0, 5, len(classes))
        measures[g.name] = {"adherence": 0.3, "IoU": {c: 0.2 for c in reproduce.SMALL_CLASSES} | {"rider": None},
                            "small_components": {"recall": 0.25, "totals": {"pole": 4}},
                            "style": {"counts": dict(zip(classes, counts.tolist())), "entropy": entropy(counts),
                                      "source_share": 0.1, "prompted_accuracy": 0.5 if "knob" in g.name else None}}
    state = {"command": "python -m train.mini_world reproduce --out X --toy", "machine": "test", "seconds": {"a": 1.0},
             "controlnet_steps": 2, "controlnet_batch": 2, "settings": {"plan": dataclasses.asdict(plan)},
             "paths": {"bundle": "B", "world": "W", "world_seed": 0, "base": 64, "classifier": "c.safetensors"}}
    (tmp_path / "reproduce.json").write_text(json.dumps(state))
    reproduce.make_figures(tmp_path, tmp_path / "figures", scores, measures, plan)
    reproduce.write_report(tmp_path / "REPRODUCTION.md", state, scores, measures, plan, "figures")
    check_report(tmp_path)
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert text.count(" ± ") >= 5 * len(reproduce.ARMS)  # two seeds: every summary cell has its spread
    assert "**" in text.split("## Claims")[1].split("##")[0]  # every claim has a verdict


def test_verdicts():
    assert "**reproduces**" in reproduce.verdict("x", [0.50, 0.52, 0.51], [0.30, 0.31, 0.29], "c")
    assert "within seed noise" in reproduce.verdict("x", [0.50, 0.30, 0.40], [0.35, 0.45, 0.38], "c")
    assert "does NOT reproduce" in reproduce.verdict("x", [0.30, 0.31], [0.50, 0.52], "c")
    assert "one seed" in reproduce.verdict("x", [0.5], [0.4], "c")


@pytest.mark.slow
def test_reproduce_toy_end_to_end(test_bundle, tmp_path):
    """The command at --toy size on a random bundle: every step runs, the report is well formed, and a
    second run resumes (skips every step) to the same numbers. About 45 steps; a few minutes on an
    idle 2-core machine."""
    out = tmp_path / "repro"
    report = tmp_path / "docs" / "REPRODUCTION.md"
    cmd = [sys.executable, "-m", "train.mini_world", "reproduce", "--out", str(out), "--bundle", str(test_bundle),
           "--toy", "--seeds", "1", "--device", "cpu", "--quiet", "--report", str(report)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    check_report(out, report)
    state = json.loads((out / "reproduce.json").read_text())
    assert set(state["results"]["downstream"]) == {a.name for a in reproduce.ARMS}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    again = json.loads((out / "reproduce.json").read_text())
    assert again["results"] == state["results"] and again["seconds"] == state["seconds"]  # nothing re-ran
