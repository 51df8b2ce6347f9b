"""The trainers the miniature world added to the chain, each a general CLI: the KL autoencoder
(train.train_vae), the style classifier (train.train_classifier) and caption / text-encoder
training in the U-Net trainer (train.finetune_unet)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import checkpoint as ckpt_io
from segmentation.models.classifier import load_classifier
from segmentation.synthetic import Layout, street_scene
from segmentation.world import PRIOR_STYLES, SOURCE, render
from train import common, finetune_unet, train_classifier, train_vae


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(root, styles, n, h=32, w=64, seed=0, captions=False):
    """n renders (cycling through `styles`) under root/images; with captions a metadata.jsonl."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        style = styles[i % len(styles)]
        sc = street_scene(h, w, np.random.default_rng([seed, i]), layout=Layout(), full=True)
        Image.fromarray(render(sc, style, i)).save(root / "images" / f"{i:04d}.png")
        rows.append({"file_name": f"images/{i:04d}.png", "text": f"a {style.word} street"})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _parse(module, argv):
    return module.get_parser().parse_args([str(a) for a in argv])


# ---------------------------------------------------------------------------------------
# train.train_vae
# ---------------------------------------------------------------------------------------

VAE = ["--config", "mini", "--resolution", 16, "--batch-size", 8, "--lr", "3e-3", "--rec-loss", "l2",
       "--warmup-steps", 2, "--num-workers", 0, "--log-every", 1, "--sample-every", 0, "--scale-batches", 2,
       "--device", "cpu"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("photos"), (SOURCE, *PRIOR_STYLES[:3]), 16)


def test_vae_learns_and_exports_what_it_trained(photos, tmp_path):
    out = tmp_path / "vae"
    train_vae.main(_parse(train_vae, ["--data", photos / "images", "--max-steps", 120, "--output-dir", out, *VAE]))
    m = common.read_metrics(out)
    first, last = m[0]["psnr"], np.mean([r["psnr"] for r in m[-5:]])
    assert last > first + 3.0, (first, last)  # a random autoencoder does not reconstruct
    native = ckpt_io.load_vae(out / "vae.safetensors")
    diffusers = ckpt_io.load_vae(out / "vae")
    assert native.cfg.downsample_factor == 4
    # the latent scale is measured (1 / std of the posterior means), not a preset's
    assert native.cfg.scaling_factor != 0.18215 and 0.05 < native.cfg.scaling_factor < 20
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = native.decode(native.encode(x).mode())
        b = diffusers.decode(diffusers.encode(x).mode())
    torch.testing.assert_close(a, b)


def test_vae_resume_is_exact_with_the_discriminator(photos, tmp_path):
    """4 steps in one run == 2 steps, then a resumed run to 4 (discriminator from step 1, EMA)."""
    extra = ["--disc-weight", 0.5, "--disc-start", 1, "--ema", "--ckpt-every", 2]
    one, two = tmp_path / "one", tmp_path / "two"
    train_vae.main(_parse(train_vae, ["--data", photos / "images", "--max-steps", 4, "--output-dir", one,
                                      *VAE, *extra]))
    train_vae.main(_parse(train_vae, ["--data", photos / "images", "--max-steps", 2, "--output-dir", two,
                                      "--no-export", *VAE, *extra]))
    train_vae.main(_parse(train_vae, ["--data", photos / "images", "--max-steps", 4, "--output-dir", two,
                                      "--resume", "auto", *VAE, *extra]))
    a = ckpt_io.read_state_dict(one / "vae.safetensors")[0]
    b = ckpt_io.read_state_dict(two / "vae.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(r["d"] != 0 for r in common.read_metrics(one))  # the discriminator did train


# ---------------------------------------------------------------------------------------
# train.train_classifier
# ---------------------------------------------------------------------------------------

def test_style_classifier_learns_styles(tmp_path):
    for split, n, seed in (("train", 12, 0), ("val", 6, 1)):
        for style in (SOURCE, PRIOR_STYLES[3], PRIOR_STYLES[5]):  # source, night, snow
            _images(tmp_path / split / style.name, (style,), n, seed=seed)
    out = tmp_path / "cls"
    args = _parse(train_classifier, ["--data", tmp_path / "train", "--val", tmp_path / "val", "--resolution", 32,
                                     "--batch-size", 12, "--max-steps", 40, "--lr", "3e-3", "--warmup-steps", 4,
                                     "--num-workers", 0, "--log-every", 5, "--output-dir", out, "--device", "cpu"])
    train_classifier.main(args)
    val = json.loads((out / "val.json").read_text())
    assert val["accuracy"] >= 0.9, val
    model = load_classifier(out / "classifier.safetensors")
    assert model.cfg.classes == ("night", "snow", "source")  # sorted subfolder names travel in the file
    # a random classifier of the same architecture does not tell the styles apart
    classes, files, labels = train_classifier.class_folders(tmp_path / "val")
    torch.manual_seed(0)
    random = type(model)(model.cfg)
    assert train_classifier.accuracy(random, files, labels, classes, 32, "cpu")["accuracy"] < 0.7
    assert train_classifier.accuracy(model, files, labels, classes, 32, "cpu")["accuracy"] == val["accuracy"]


def test_style_classifier_checks_its_validation_folder_before_training(tmp_path):
    for style in (SOURCE, PRIOR_STYLES[3]):
        _images(tmp_path / "train" / style.name, (style,), 2)
    for style in (SOURCE, PRIOR_STYLES[5]):  # snow where training has night
        _images(tmp_path / "val" / style.name, (style,), 2)
    base = ["--data", tmp_path / "train", "--resolution", 32, "--batch-size", 2, "--max-steps", 2,
            "--num-workers", 0, "--device", "cpu"]
    for val, msg in ((tmp_path / "missing", "no such folder"), (tmp_path / "val", "differ from the training classes")):
        out = tmp_path / f"cls_{val.name}"
        with pytest.raises(SystemExit, match=msg):
            train_classifier.main(_parse(train_classifier, [*base, "--val", val, "--output-dir", out]))
        assert not (out / "checkpoints").exists()  # refused before the first step


# ---------------------------------------------------------------------------------------
# train.finetune_unet: captions and the text encoder
# ---------------------------------------------------------------------------------------

FT = ["--tiny", "--resolution", 32, "--scales", 1.0, "--batch-size", 2, "--grad-accum", 1, "--max-steps", 3,
      "--lr", "1e-3", "--num-workers", 0, "--log-every", 1, "--sample-every", 0, "--device", "cpu"]


def test_unet_trainer_reads_captions_and_trains_the_text_encoder(tmp_path):
    data = _images(tmp_path / "prior", PRIOR_STYLES[:4], 6, captions=True)
    frozen, joint = tmp_path / "frozen", tmp_path / "joint"
    finetune_unet.main(_parse(finetune_unet, ["--data", data, "--output-dir", frozen, *FT]))
    finetune_unet.main(_parse(finetune_unet, ["--data", data, "--output-dir", joint, "--train-text-encoder",
                                              "--text-encoder-lr", "1e-2", *FT]))
    assert "captions from" in (joint / "log.txt").read_text()
    a = ckpt_io.load_components(frozen / "pipeline.safetensors")
    b = ckpt_io.load_components(joint / "pipeline.safetensors")
    assert set(a) == set(b) == {"unet", "vae", "text_encoder"}
    ta, tb = a["text_encoder"].state_dict(), b["text_encoder"].state_dict()
    changed = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert len(changed) > len(ta) // 2  # trained jointly: the encoder moved
    start = tmp_path / "start"  # no step: the weights both runs began from
    finetune_unet.main(_parse(finetune_unet, ["--data", data, "--output-dir", start, *FT, "--max-steps", 0]))
    t0 = ckpt_io.load_components(start / "pipeline.safetensors")["text_encoder"].state_dict()
    assert all(torch.equal(ta[k], t0[k]) for k in ta)  # frozen: it did not
    va, vb = a["vae"].state_dict(), b["vae"].state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is never trained here
    # resuming the joint run without the text encoder in its optimizer is refused, not half-loaded
    with pytest.raises(SystemExit, match="--train-text-encoder True -> False"):
        finetune_unet.main(_parse(finetune_unet, ["--data", data, "--output-dir", joint, *FT, "--max-steps", 4,
                                                  "--resume", "auto"]))


def test_unet_from_scratch_with_another_vae_and_text_encoder_config(tmp_path):
    data = _images(tmp_path / "prior", PRIOR_STYLES[:2], 4, captions=True)
    vae_dir = tmp_path / "vae"
    train_vae.main(_parse(train_vae, ["--data", data / "images", "--max-steps", 1, "--output-dir", vae_dir, *VAE]))
    out = tmp_path / "scratch"
    finetune_unet.main(_parse(finetune_unet, ["--data", data, "--output-dir", out, "--vae", vae_dir / "vae.safetensors",
                                              "--unet-config", "mini", "--text-encoder-config", "mini",
                                              "--proportion-empty-prompts", 0.5, "--random-flip",
                                              "--lr-scheduler", "cosine", "--lr-warmup-steps", 1,
                                              *[a for a in FT if a != "--tiny"]]))
    parts = ckpt_io.load_components(out / "pipeline.safetensors")
    assert parts["vae"].cfg.downsample_factor == 4 and parts["unet"].cfg.to_dict() == \
        ckpt_io.load_unet(out / "unet.safetensors").cfg.to_dict()
    lrs = [r["lr"] for r in common.read_metrics(out)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]  # warm-up of 1 step, then the cosine
