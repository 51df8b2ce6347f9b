"""Reference outputs of controlled generation and MRLF on a tiny random model.

    python tests/data/make_mrlf_reference.py      # writes tests/data/mrlf_reference.npz and *.png

The committed files were made by the pipeline as it was before sampling moved onto the sampler
contract (DDIM loop inside the pipeline, per-view DDIM updates averaged). tests/test_mrlf_reference.py
runs the same cases through the current code and compares. Regenerate them only when the
faithful output is meant to change.

Every case runs in float32 on CPU. ``fingerprint`` stores one ControlNet + U-Net call and one VAE
decode on fixed inputs: a machine whose kernels round differently (another CPU instruction set,
another thread count) cannot be expected to reproduce the files bit for bit, and the test reads
the fingerprint to know which machine it is on.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from controlnet import ControlNet, ControlNetConfig  # noqa: E402
from helpers import randomize_  # noqa: E402
from ldm.sd import StableDiffusion  # noqa: E402
from mrlf.fusion import controlled_model  # noqa: E402
from mrlf.pipeline import MRLFSettings, Pipeline, SamplingSettings, to_pil  # noqa: E402
from segmentation.synthetic import street_scene  # noqa: E402

NPZ = HERE / "mrlf_reference.npz"
SIZE = 64  # base size in pixels: 8x8 latents at pass 1, 16x16 at pass 2 (9 views of 8 at stride 4)
LABEL_SEED = 3
PROMPT = "road sidewalk building sky car"
TILED = MRLFSettings(window=8, stride=4, component_threshold=300, view_batch=4)  # faithful otherwise

# name -> (SamplingSettings, MRLFSettings) of the MRLF cases
MRLF_CASES = {
    "mrlf_faithful": (SamplingSettings(steps=4), TILED),
    "mrlf_eta": (SamplingSettings(steps=4, eta=0.6), TILED),
    "mrlf_tent": (SamplingSettings(steps=4), replace(TILED, blend="tent")),
    "mrlf_matched": (SamplingSettings(steps=4), replace(TILED, inpaint_level="matched")),
}


def build():
    """The tiny model, every parameter random (a zero ControlNet would hide the hint), and the label."""
    sd = StableDiffusion.random("tiny", seed=0)
    for i, m in enumerate((sd.unet, sd.vae, sd.text_encoder)):
        randomize_(m, seed=10 + i)
    cn = randomize_(ControlNet(ControlNetConfig.tiny(20)), seed=3).eval()
    return Pipeline(sd, cn), street_scene(SIZE, SIZE, LABEL_SEED)


@torch.no_grad()
def fingerprint(pipe) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = pipe.hint_from_labels(street_scene(SIZE, SIZE, LABEL_SEED), SIZE, SIZE).expand(2, -1, -1, -1)
    ctx = pipe.sd.encode_prompt(["", PROMPT])
    eps = controlled_model(pipe.sd.unet, pipe.controlnet)(x, torch.tensor(501), ctx, hint)
    return {"fingerprint_eps": eps.numpy(), "fingerprint_decode": pipe.sd.decode_latents(x).numpy()}


def _images(pipe, z) -> np.ndarray:
    return np.stack([np.asarray(im) for im in to_pil(pipe.sd.decode_latents(z))])


@torch.no_grad()
def generate_cases(pipe, label) -> dict[str, np.ndarray]:
    """generate(): one view (two prompts, negative prompt), eta > 0, img2img, and a tiled canvas."""
    out = {}

    def run(name, **kw):
        z = pipe.generate(**kw, output="latents")
        out[f"{name}/latents"], out[f"{name}/images"] = z.numpy(), _images(pipe, z)

    base = dict(labels=label, height=SIZE, width=SIZE)
    run("generate_single", prompts=[PROMPT, "building"], seeds=[7, 8], negative_prompt="blurry",
        settings=SamplingSettings(steps=4, control_scale=0.8), **base)
    run("generate_eta", prompts=PROMPT, seeds=[5], settings=SamplingSettings(steps=4, eta=0.6), **base)
    init = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11)) * 2 - 1
    run("generate_img2img", prompts=PROMPT, seeds=[9], init_images=init,
        settings=SamplingSettings(steps=6, strength=0.5), **base)
    run("generate_tiled", prompts=PROMPT, labels=street_scene(2 * SIZE, 2 * SIZE, LABEL_SEED), seeds=[4],
        height=2 * SIZE, width=2 * SIZE, window=8, stride=4, view_batch=4, settings=SamplingSettings(steps=4))
    return out


@torch.no_grad()
def mrlf_cases(pipe, label) -> dict[str, np.ndarray]:
    """MRLF: the latents of both passes, the re-encoded init, the result and the first pass."""
    out = {}
    for name, (sampling, fusion) in MRLF_CASES.items():
        result = pipe.mrlf(label, PROMPT, torch.Generator().manual_seed(1), settings=sampling, fusion=fusion)
        assert result.mask.any() and not result.mask.all(), "the inpainting mask must be partial"
        out[f"{name}/pass1_latents"] = result.pass1_latents.numpy()
        out[f"{name}/init_latents"] = result.init_latents.numpy()
        out[f"{name}/pass2_latents"] = result.pass2_latents.numpy()
        out[f"{name}/image"] = np.asarray(result.image)[None]
        out[f"{name}/first_pass"] = np.asarray(result.first_pass)[None]
    return out


def main() -> None:
    torch.manual_seed(0)
    pipe, label = build()
    arrays = {**fingerprint(pipe), **generate_cases(pipe, label), **mrlf_cases(pipe, label)}
    np.savez_compressed(NPZ, **arrays)
    for key, a in arrays.items():
        if a.dtype == np.uint8:  # images, for looking at
            Image.fromarray(np.concatenate(list(a), axis=1)).save(HERE / f"mrlf_reference_{key.replace('/', '_')}.png")
    print(f"wrote {NPZ} ({NPZ.stat().st_size} bytes), {len(arrays)} arrays")


if __name__ == "__main__":
    main()
