"""train/train_text_encoder.py: CLIP's contrastive loss with repeated captions as positives, against a
hand computation; a short pretraining that learns what captions say (a random encoder does not), and
its export loads as a text encoder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import checkpoint as ckpt_io
from ldm.config import preset
from ldm.clip import CLIPTextModel
from ldm.tokenizer import Tokenizer
from train import train_text_encoder as tte

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (30, 40, 200), "yellow": (220, 210, 40)}


def test_same_text_marks_identical_captions():
    same = tte.same_text(["a", "b", "a", "c"])
    assert same.tolist() == [[True, False, True, False], [False, True, False, False],
                             [True, False, True, False], [False, False, False, True]]


def test_contrastive_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    model = tte.Contrastive(CLIPTextModel(preset("text_encoder", "tiny")), dim=8)
    captions = ["a red street", "a blue street", "a red street"]
    ids = Tokenizer()(captions)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        loss, acc = model(images, ids, tte.same_text(captions))

    with torch.no_grad():
        img = model.image_tower(images)
        h = model.text_encoder(ids)
    img = img / img.norm(dim=-1, keepdim=True)
    eos = [row.tolist().index(49407) for row in ids]  # the first end-of-text token of each caption
    txt = model.text_projection(torch.stack([h[i, e] for i, e in enumerate(eos)])).detach()
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = (1 / 0.07) * img @ txt.T
    target = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    ce = lambda lg: float(-(target * lg.log_softmax(dim=1)).sum(1).mean())  # noqa: E731
    assert float(loss) == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    hits = [[0, 2], [1], [0, 2]]
    assert float(acc) == pytest.approx(np.mean([int(logits[i].argmax()) in hits[i] for i in range(3)]))


def test_split_holds_out_a_seeded_share():
    files, caps = list(range(100)), [str(i) for i in range(100)]
    tf, tc, vf, vc = tte.split(files, caps, 0.1, seed=3)
    assert len(vf) == 10 and sorted(tf + vf) == files and tc == [str(f) for f in tf] and vc == [str(f) for f in vf]
    assert tte.split(files, caps, 0.1, seed=3)[2] == vf and tte.split(files, caps, 0.1, seed=4)[2] != vf


@pytest.fixture
def coloured(tmp_path):
    """A captioned folder: noisy images in one of four colours, captioned with the colour word."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(160):
        word = list(COLOURS)[i % 4]
        a = np.clip(np.array(COLOURS[word]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"images/{i:03d}.png", "text": f"a street in {word}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_pretraining_learns_what_captions_say(coloured, tmp_path, one_thread):
    """Held-out images find their caption among four colour words after 60 steps; a random model
    does no better than chance on the same images. The export loads as a text encoder, and its
    padding states tell the colour words apart far more than a random encoder's do."""
    out = tmp_path / "run"
    args = tte.get_parser().parse_args([
        "--data", str(coloured), "--config", "tiny", "--embed-dim", "16", "--resolution", "32",
        "--batch-size", "16", "--max-steps", "60", "--warmup-steps", "5", "--val-split", "0.2",
        "--output-dir", str(out), "--num-workers", "0", "--device", "cpu", "--log-every", "10"])
    tte.main(args)
    val = json.loads((out / "val.json").read_text())
    assert val["images"] == 32 and val["chance"] == pytest.approx(0.25, abs=0.1)
    assert val["accuracy"] > 0.8, val

    files, captions = tte.find_captioned_images(coloured)
    _, _, vf, vc = tte.split(files, captions, 0.2, seed=0)
    torch.manual_seed(1)
    random = tte.Contrastive(CLIPTextModel(preset("text_encoder", "tiny")), dim=16)
    rand = tte.retrieval_accuracy(random, vf, vc, Tokenizer(), 32, 16, "cpu")
    assert rand["accuracy"] < 0.5, rand

    trained = ckpt_io.load_text_encoder(out / "text_encoder.safetensors")
    prompts = [f"a street in {w}" for w in COLOURS]

    def padding_spread(te) -> float:
        with torch.no_grad():
            h = te(Tokenizer()(prompts))[:, 10:]  # padding positions only
        return float((h - h.mean(0)).norm(dim=-1).mean() / h.norm(dim=-1).mean())

    print(f"held-out accuracy {val['accuracy']:.3f} (random {rand['accuracy']:.3f}); padding spread "
          f"{padding_spread(trained):.3f} vs random {padding_spread(random.text_encoder):.3f}")
    assert padding_spread(trained) > 2 * padding_spread(random.text_encoder), \
        (padding_spread(trained), padding_spread(random.text_encoder))
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"])


def test_a_batch_without_negatives_is_refused(coloured, tmp_path):
    args = tte.get_parser().parse_args(["--data", str(coloured), "--batch-size", "1", "--output-dir",
                                        str(tmp_path / "run"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="at least 2"):
        tte.main(args)
