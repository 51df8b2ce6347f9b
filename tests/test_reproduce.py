"""The reproduction command (train/reproduce.py) and its metrics: entropy, small-component recall,
mean ± std over seeds, the style classifier over image files, the steps each --parts selection runs,
the report from hand-made results, and the command end to end at --toy size."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.components import component_recall, small_component_hits
from segmentation.datasets import read_manifest
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
    assert set(reproduce.PART_ARMS) == set(reproduce.PARTS)
    assert {n for arms in reproduce.PART_ARMS.values() for n in arms} == set(reproduce.ALL_ARMS)
    assert {a.generated for a in reproduce.ALL_ARMS.values() if a.generated} <= set(names)
    assert {a.target for a in reproduce.ALL_ARMS.values() if a.target} == {"didex"}
    assert reproduce.Plan().scaled(0.5).diff_steps == reproduce.Plan().diff_steps // 2


# ---------------------------------------------------------------------------------------------- --parts
class Recorder:
    """Stands in for reproduce.Steps: records each step (name, module, argv) instead of running it."""

    def __init__(self):
        self.steps = []

    def __call__(self, name, done, module, argv, training=False):
        self.steps.append((name, module, [str(a) for a in argv]))

    def in_process(self, name, done, main, argv):
        self.steps.append((name, main.__module__, [str(a) for a in argv]))


def test_an_in_process_step_logs_both_streams_and_fails_on_a_non_zero_status(tmp_path):
    from types import SimpleNamespace

    state = {}
    step = reproduce.Steps(tmp_path, SimpleNamespace(device="cpu", nproc=1, quiet=True), state)

    def main(argv):
        print("to stdout", argv)
        print("to stderr", file=sys.stderr)
        return 2

    with pytest.raises(SystemExit, match="step gen_x failed \\(exit 2\\); its log: .*gen_x.log"):
        step.in_process("gen_x", lambda: False, main, ["--n", 1])
    log = (tmp_path / "logs" / "gen_x.log").read_text()
    assert "to stdout ['--n', '1', '--device', 'cpu']" in log and "to stderr" in log
    assert "seconds" not in state  # a failed step is not recorded as done


def planned_steps(parts, tmp_path, seeds=2) -> dict[str, tuple[str, list[str]]]:
    """{step: (module, argv)} of run_steps with the TOY plan and the shipped bundle, in order."""
    from mrlf.bundle import SHIPPED, load_bundle
    from segmentation.world import WorldSpec

    labels = tmp_path / "world" / "source" / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(reproduce.TOY.images):
        (labels / f"{i:06d}_labelTrainIds.png").touch()
    rec = Recorder()
    reproduce.run_steps(rec, reproduce.TOY, parts, load_bundle(SHIPPED), tmp_path / "world", WorldSpec(),
                        tmp_path / "out", seeds)
    names = [name for name, _, _ in rec.steps]
    assert len(names) == len(set(names)), names  # every step once
    return {name: (module, argv) for name, module, argv in rec.steps}


def arm_steps(arms, evals=("eval",), seeds=2) -> list[str]:
    return [f"{kind}_{arm}_seed{s}" for arm in arms for s in range(seeds) for kind in ("seg", *evals)]


def option(argv: list[str], name: str, n: int = 1) -> list[str] | str:
    i = argv.index(name)
    return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]


def test_parts_select_their_steps(tmp_path):
    plan, gens = reproduce.TOY, reproduce.generations(reproduce.TOY)
    # dginstyle: the DGInStyle arms and sets alone, in the order they always ran
    steps = planned_steps(["dginstyle"], tmp_path)
    assert list(steps) == ["drift_controlnet", *[f"gen_{g.name}" for g in gens],
                           *[f"adherence_{g.name}" for g in gens], *arm_steps([a.name for a in reproduce.ARMS])]
    assert reproduce.part_generations(plan, ["dginstyle"]) == gens

    # didex: the DGInStyle set it trains with, the pseudo-target, its arms and the two it compares with
    steps = planned_steps(["didex"], tmp_path)
    assert list(steps) == ["gen_dginstyle", "gen_didex",
                           *arm_steps(["source_only", "dginstyle", "didex", "dginstyle_didex"])]
    module, argv = steps["gen_didex"]
    assert module == "mrlf.didex" and option(argv, "-n") == str(plan.images)
    assert option(argv, "--base").endswith("prior.safetensors") and option(argv, "--scale") == "1"
    assert (option(argv, "--strength"), option(argv, "--guidance"), option(argv, "--eta"), option(argv, "--steps")) \
        == ("0.9", "9.0", "0.0", "25")  # DIDEX's sampling
    words = [s.word for s in reproduce.PRIOR_STYLES]
    assert option(argv, "--conditions", len(words)) == words
    out = tmp_path / "out"
    for arm, generated in (("didex", None), ("dginstyle_didex", "dginstyle")):
        module, argv = steps[f"seg_{arm}_seed1"]
        assert module == "train.train_uda" and option(argv, "--target") == str(out / "gen" / "didex")
        assert option(argv, "--target-scale", 2) == ["128", "64"] and option(argv, "--source-scale", 2) == ["128", "64"]
        assert option(argv, "--model") == "mini" and option(argv, "--seed") == "1"
        assert (option(argv, "--max-iters"), option(argv, "--batch-size")) == (str(plan.seg_steps), str(plan.seg_batch))
        assert ("--generated" in argv) == (generated is not None)
    assert option(steps["seg_dginstyle_didex_seed0"][1], "--generated") == str(out / "gen" / "dginstyle")
    assert steps["seg_dginstyle_seed0"][0] == "train.train_segmentation"

    # diff: every arm trained, then evaluated on the first diff_eval scenes of each style only
    steps = planned_steps(["diff"], tmp_path)
    first = f"eval_first{plan.diff_eval}"
    assert list(steps) == ["gen_dginstyle",
                           *arm_steps(["source_only", "mit_diff_budget", "diff", "diff_dginstyle"], (first,))]
    for arm, model in (("mit_diff_budget", "mini"), ("diff", "diff_world"), ("diff_dginstyle", "diff_world")):
        module, argv = steps[f"seg_{arm}_seed0"]
        assert module == "train.train_segmentation" and option(argv, "--model") == model
        assert (option(argv, "--max-iters"), option(argv, "--batch-size")) == (str(plan.diff_steps),
                                                                              str(plan.diff_batch))
        assert ("--diff-unet" in argv) == (model == "diff_world")
    assert option(steps["seg_diff_seed0"][1], "--diff-unet").endswith("prior.safetensors")
    assert option(steps["seg_source_only_seed0"][1], "--max-iters") == str(plan.seg_steps)
    module, argv = steps[f"{first}_diff_seed0"]
    assert module == "segmentation.evaluate" and option(argv, "--limit") == str(plan.diff_eval)
    assert option(argv, "--out").endswith(f"diff/seed0/{first}.json")

    # all: the union, each step once; source only is evaluated both ways
    steps = planned_steps(list(reproduce.PARTS), tmp_path)
    union = {*planned_steps(["dginstyle"], tmp_path), *planned_steps(["didex"], tmp_path),
             *planned_steps(["diff"], tmp_path)}
    assert set(steps) == union
    assert list(steps)[:3] == ["drift_controlnet", "gen_drift", "gen_no_swap"]
    assert arm_steps(["source_only"], ("eval", first)) == [n for n in steps if "source_only" in n]
    assert "--limit" not in steps["eval_source_only_seed0"][1]


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
    """REPRODUCTION.md at OUT is well formed for the parts run there (reproduce.json): their sections, a row
    of numbers for every arm (summary and per style), a verdict per comparison, every knob value and
    small-object set, figures that load; the committed copy links its figures."""
    text = (out / "REPRODUCTION.md").read_text()
    parts = json.loads((out / "reproduce.json").read_text())["parts"]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    number = r"\d+\.\d( ± \d+\.\d)?"

    def summary(row):
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 5 and all(re.fullmatch(number, c) for c in cells), row

    def per_style(row):
        assert len(re.findall(r"\| \d+\.\d ", row)) == len(reproduce.EVAL_STYLES), row

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    if "dginstyle" in parts:
        for heading in ("## Claims", "## Downstream", "## Style diversity", "## Small objects", "## Samples"):
            assert heading in text
        for arm in reproduce.ARMS:
            summary(next(r for r in rows if r.startswith(f"| {arm.what} |")))
            per_style(next(r for r in rows if r.startswith(f"| {arm.name} |")))
        settings = json.loads((out / "reproduce.json").read_text())["settings"]
        plan = reproduce.Plan(**{k: tuple(v) if k == "knob" else v for k, v in settings["plan"].items()})
        for k in plan.knob:
            assert re.search(rf"^\| {k:g} \| (\d+\.\d|n/a) \| \d+\.\d \| \d+\.\d\d \| (\d+\.\d|n/a) \|$", text, re.M), k
        small = [r for r in rows if r.startswith("| MRLF") or r.startswith("| single pass")]
        assert len(small) == 6 and all(len(re.findall(r"\| (\d+\.\d|n/a)", r)) == len(reproduce.SMALL_CLASSES) + 2
                                       for r in small), small
        assert len(links) == 4
    else:
        assert "## Claims" not in text and "## Style diversity" not in text and "knob.png" not in text
    for part, heading, claims in (("didex", "## DIDEX", 2), ("diff", "## DIFF", 3)):
        assert (f"{heading}\n" in text) == (part in parts), heading
        if part in parts:
            section = text.split(f"{heading}\n")[1].split("\n## ")[0].splitlines()
            for name in reproduce.PART_ARMS[part]:
                summary(next(r for r in section if r.startswith(f"| {reproduce.ALL_ARMS[name].what} |")))
            assert len([line for line in section if line.startswith("- ") and "**" in line]) == claims, section
    for name in {n for p in parts for n in reproduce.PART_ARMS[p]}:  # every arm: all scenes, or the subset (†)
        per_style(next(r for r in rows if r.startswith(f"| {name} |") or r.startswith(f"| {name} † |")))
    assert ("## Samples" in text) == ("dginstyle" in parts or "didex" in parts)
    assert "downstream.png" in text
    for link in links:
        with Image.open(out / link) as im:
            im.load()
            assert im.width > 100 and im.height > 50
    if report is not None:
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text()):
            assert (report.parent / link).is_file()


def fake_set(folder: Path, rng, labelled: bool = True) -> None:
    """A generated set of two 64 x 64 images: labelled as mrlf.generate writes it, else as mrlf.didex does
    (the source label named by the record)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 19, (64, 64), dtype=np.uint8)).save(folder / "labels" / f"{i}.png")
        label = {"label": f"labels/{i}.png"} if labelled else {"source_label": str(folder / "labels" / f"{i}.png")}
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", **label}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_report_from_results(tmp_path):
    """The report and figures from hand-made results of every arm and set (two seeds): fast, no models."""
    plan = reproduce.TOY
    rng = np.random.default_rng(0)
    scores = {a.name: {s.name: list(rng.uniform(0.1, 0.6, 2)) for s in reproduce.EVAL_STYLES} for a in reproduce.ARMS}
    classes = [s.name for s in CLASSIFIED]
    measures = {}
    for g in reproduce.generations(plan):
        fake_set(tmp_path / "gen" / g.name, rng)
        counts = rng.integers(0, 5, len(classes))
        measures[g.name] = {"adherence": 0.3, "IoU": {c: 0.2 for c in reproduce.SMALL_CLASSES} | {"rider": None},
                            "small_components": {"recall": 0.25, "totals": {"pole": 4}},
                            "style": {"counts": dict(zip(classes, counts.tolist())), "entropy": entropy(counts),
                                      "source_share": 0.1, "prompted_accuracy": 0.5 if "knob" in g.name else None}}
    fake_set(tmp_path / "gen" / "didex", rng, labelled=False)

    def held(value):  # every style at `value`, the seeds 0.01 apart
        return {s.name: [value - 0.005, value + 0.005] for s in reproduce.EVAL_STYLES}

    # DIDEX clearly above source only; DGInStyle + DIDEX below DGInStyle
    scores |= {"source_only": held(0.2), "didex": held(0.4), "dginstyle": held(0.3), "dginstyle_didex": held(0.25)}
    # on the subset: DIFF below the MiT baseline, above MiT at its samples; + DGInStyle above DIFF
    subset = {"source_only": held(0.3), "mit_diff_budget": held(0.1), "diff": held(0.2), "diff_dginstyle": held(0.35)}
    state = {"command": "python -m train.mini_world reproduce --out X --toy", "machine": "test", "seconds": {"a": 1.0},
             "controlnet_steps": 2, "controlnet_batch": 2, "settings": {"plan": dataclasses.asdict(plan)},
             "paths": {"bundle": "B", "world": "W", "world_seed": 0, "base": 64, "classifier": "c.safetensors"},
             "parts": list(reproduce.PARTS),
             "results": {"downstream": scores, "subset": subset, "sets": measures,
                         "pseudo_target": {"counts": {"source": 1, "night": 1}, "entropy": 1.0, "source_share": 0.5,
                                           "prompted_accuracy": 0.5, "prompted": 2}}}
    (tmp_path / "reproduce.json").write_text(json.dumps(state))
    reproduce.make_figures(tmp_path, tmp_path / "figures", state, plan)
    reproduce.write_report(tmp_path / "REPRODUCTION.md", state, plan, "figures")
    check_report(tmp_path)
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert text.count(" ± ") >= 5 * len(reproduce.ARMS)  # two seeds: every summary cell has its spread
    assert "**" in text.split("## Claims")[1].split("##")[0]  # every claim has a verdict
    claims = {line.split(":")[0][2:]: line for line in text.splitlines() if line.startswith("- ") and "**" in line}
    assert "**reproduces** (DIDEX vs source only: 40.0 vs 20.0 mIoU)" in claims["DIDEX beats source only"]
    assert "**does NOT reproduce**" in claims["DGInStyle + DIDEX beats DGInStyle"]
    samples = f"{plan.seg_steps * plan.seg_batch} training samples to DIFF's {plan.diff_steps * plan.diff_batch}"
    assert "**does NOT reproduce** (DIFF vs the MiT baseline: 20.0 vs 30.0" in claims[
        f"DIFF beats the MiT baseline ({samples})"]
    assert "**reproduces**" in claims["DIFF beats the MiT segmenter trained on as many samples"]
    assert "**reproduces** (DIFF + DGInStyle vs DIFF: 35.0 vs 20.0" in claims["DIFF + DGInStyle beats DIFF"]
    assert "**DIFF trained on fewer samples than the MiT arms**" in text and f"first {plan.diff_eval} scenes" in text
    assert "| diff † |" in text and "| source_only † |" not in text  # source only has all-scene results
    assert "50.0 % in their prompted condition's style" in text

    # without the dginstyle part's results: the DIDEX and DIFF sections alone
    state["parts"] = ["didex", "diff"]
    state["results"] = {"downstream": {k: scores[k] for k in reproduce.PART_ARMS["didex"]}, "subset": subset,
                        "pseudo_target": state["results"]["pseudo_target"]}
    only = tmp_path / "only"
    only.mkdir()
    (only / "reproduce.json").write_text(json.dumps(state))
    (only / "gen").symlink_to(tmp_path / "gen")
    reproduce.make_figures(only, only / "figures", state, plan)
    reproduce.write_report(only / "REPRODUCTION.md", state, plan, "figures")
    check_report(only)
    assert "| no_swap |" not in (only / "REPRODUCTION.md").read_text()


def test_verdicts():
    assert "**reproduces**" in reproduce.verdict("x", [0.50, 0.52, 0.51], [0.30, 0.31, 0.29], "c")
    assert "within seed noise" in reproduce.verdict("x", [0.50, 0.30, 0.40], [0.35, 0.45, 0.38], "c")
    assert "does NOT reproduce" in reproduce.verdict("x", [0.30, 0.31], [0.50, 0.52], "c")
    assert "one seed" in reproduce.verdict("x", [0.5], [0.4], "c")


@pytest.mark.slow
def test_reproduce_toy_end_to_end(test_bundle, tmp_path):
    """The command at --toy size on a random bundle: the dginstyle part, then every part into the same
    folder, which resumes the first run (skips every one of its steps) to the same numbers and runs the
    didex and diff parts; every step runs once and the report is well formed and covers all three. About
    60 steps; a few minutes on an idle 2-core machine."""
    out = tmp_path / "repro"
    report = tmp_path / "docs" / "REPRODUCTION.md"
    cmd = [sys.executable, "-m", "train.mini_world", "reproduce", "--out", str(out), "--bundle", str(test_bundle),
           "--toy", "--seeds", "1", "--device", "cpu", "--quiet", "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # its training steps are child processes: one thread each
    subprocess.run([*cmd, "--parts", "dginstyle"], cwd=ROOT, env=env, check=True, capture_output=True)
    check_report(out, report)
    state = json.loads((out / "reproduce.json").read_text())
    assert set(state["results"]["downstream"]) == {a.name for a in reproduce.ARMS}
    assert state["parts"] == ["dginstyle"] and not (out / "gen" / "didex").exists()

    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)  # every part (the default)
    again = json.loads((out / "reproduce.json").read_text())
    assert {k: again["seconds"][k] for k in state["seconds"]} == state["seconds"]  # nothing of the first run re-ran
    assert {k: again["results"]["downstream"][k] for k in state["results"]["downstream"]} \
        == state["results"]["downstream"] and again["results"]["sets"] == state["results"]["sets"]
    assert again["parts"] == list(reproduce.PARTS)
    check_report(out, report)
    assert set(again["results"]["downstream"]) == {a.name for a in (*reproduce.ARMS, *reproduce.DIDEX_ARMS)}
    assert set(again["results"]["subset"]) == set(reproduce.PART_ARMS["diff"])
    assert {"gen_didex", "seg_didex_seed0", "seg_dginstyle_didex_seed0", "seg_diff_seed0", "seg_diff_dginstyle_seed0",
            "eval_first1_source_only_seed0", "eval_first1_diff_seed0"} <= set(again["seconds"])
    assert "-m train.train_uda " in (out / "logs" / "seg_didex_seed0.cmd").read_text()
    assert "--model diff_world" in (out / "logs" / "seg_diff_seed0.cmd").read_text()
    assert len(read_manifest(out / "gen" / "didex", labels=False)) == reproduce.TOY.images
