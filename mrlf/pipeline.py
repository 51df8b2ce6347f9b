"""Controlled generation and DGInStyle's Multi-Resolution Latent Fusion.

`Pipeline.sample` runs a sampler of `samplers/` (`SamplingSettings.sampler`: DDIM as the
original, Euler, DPM++ 2M or any other registered one) on a guided, ControlNet-controlled
denoiser over a latent canvas tiled into views (`mrlf.fusion.tiled_eps`; one view = plain
generation). Latent inpainting happens in the sampler's step callback, at the noise level the
sampler gives for its state (`samplers.registry`). `Pipeline.mrlf` is the two-pass driver:

    pass 1 at base size -> Lanczos x f -> VAE encode (posterior sample) ->
    tiled pass at f x base with latent inpainting of the large label components -> decode ->
    Lanczos back to base size.

Per-sample randomness comes from one private CPU torch.Generator, drawn in the original's order:
pass-1 init, posterior sample, pass-2 init, then one inpainting noise per step. With eta > 0
(DDIM) each step first draws its canvas noise, in pass 1 too. Images are PIL at the edges and
[-1, 1] NCHW tensors inside.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ldm.graphs import CUDAGraphed
from mrlf.components import large_component_mask, latent_mask
from mrlf.fusion import controlled_model, tiled_eps
from mrlf.tiles import blend_weights, get_views
from samplers import SD15, Schedule, Split, get_sampler, img2img_start, noised, randn
from segmentation.labels import one_hot, validate_label


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 20
    guidance_scale: float = 7.5
    control_scale: float = 1.0
    guess_mode: bool = False
    eta: float = 0.0  # DDIM's fresh noise per step
    strength: float = 1.0  # img2img (DDIM): fraction of the schedule run from the init image (1 = from noise)
    sampler: str = "ddim"  # a name in samplers.SAMPLERS: "ddim" (the original), "euler", "dpmpp_2m"
    # The ControlNet acts in this window of the steps run (diffusers' control_guidance_start/end); the
    # steps outside it are the U-Net's alone.
    control_start: float = 0.0
    control_end: float = 1.0
    # Classifier-free guidance acts in this window of the steps run (guidance in a limited interval,
    # Kynkäänniemi et al. 2024); the steps outside it take the conditional prediction alone, at half the cost.
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def __post_init__(self):
        get_sampler(self.sampler)
        for name in ("control", "guidance"):
            start, end = getattr(self, f"{name}_start"), getattr(self, f"{name}_end")
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"the {name} window needs 0 <= {name}_start < {name}_end <= 1, got "
                                 f"{start:g} to {end:g}")
        if self.sampler != "ddim" and (self.eta > 0 or self.strength < 1):
            raise ValueError(f"eta > 0 and strength < 1 (img2img) need the ddim sampler, not {self.sampler!r}")


@dataclass(frozen=True)
class MRLFSettings:
    """Every size, stride, threshold and factor of the two-pass driver (faithful dataset values)."""

    scale_factor: int = 2  # 1: plain controlled generation at the base size
    window: int = 64  # latent view size of the tiled pass (64 latents = 512 px)
    stride: int = 8  # latent stride of the tiled pass (dataset: 8 -> 81 views; demo: 16 -> 25)
    component_threshold: int = 20000  # pixels (> this) at the base size; demo: 30000
    # Level the init latents are noised to after each step. "matched": the level the step lands on.
    # "faithful": with DDIM the original's t-1 (t: the step's timestep); the other samplers have
    # no such quirk to keep, so there it is the matched level.
    inpaint_level: str = "faithful"
    posterior: str = "sample"  # "sample" (faithful) or "mean" for the pass-1 re-encode
    blend: str = "uniform"  # view weights: "uniform" (faithful average), "tent", "gaussian"
    view_batch: int = 8

    def __post_init__(self):
        if self.scale_factor < 1 or int(self.scale_factor) != self.scale_factor:
            raise ValueError(f"scale_factor must be a positive integer, got {self.scale_factor}")
        if self.inpaint_level not in ("faithful", "matched"):
            raise ValueError(f"inpaint_level must be 'faithful' or 'matched', got {self.inpaint_level!r}")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got {self.posterior!r}")
        if self.view_batch < 1:
            raise ValueError("view_batch must be >= 1")


def step_window(steps: int, start: float, end: float) -> list[bool]:
    """Which of `steps` sampler steps lie in the window [start, end] of the steps run: step i unless
    i/steps < start or (i+1)/steps > end, diffusers' rule for control_guidance_start/end."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


DEMO = MRLFSettings(stride=16, component_threshold=30000)  # the original demo.py
DATASET = MRLFSettings()  # the original gen_datasets.py defaults


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (B, 3, H, W) -> uint8 PIL images, rounded as diffusers' numpy_to_pil."""
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


def from_pil(image: Image.Image) -> torch.Tensor:
    """uint8 PIL -> (1, 3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return ((a.float() / 255.0 - 0.5) / 0.5)[None]


@dataclass
class Inpaint:
    """Latent inpainting after each sampler step: z <- m * noised(init) + (1 - m) * z."""

    init: torch.Tensor  # clean scaled latents (B, 4, H, W)
    mask: torch.Tensor  # (H, W) or (B, 1, H, W), 1 = take the noised init
    level: str = "faithful"  # as MRLFSettings.inpaint_level


@dataclass
class MRLFResult:
    image: Image.Image  # the result, at the base size
    first_pass: Image.Image
    mask: np.ndarray  # large-component mask at the base size, True = inpainted from pass 1
    components: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    pass1_latents: torch.Tensor | None = None  # (1, 4, h, w): pass 1's sampler result
    init_latents: torch.Tensor | None = None  # (1, 4, f*h, f*w): the upscaled first pass re-encoded (f > 1)
    pass2_latents: torch.Tensor | None = None  # (1, 4, f*h, f*w): the tiled pass's sampler result (f > 1)


class Pipeline:
    """Guided, controlled SD sampling on a view-tiled latent canvas.

    sd: an `ldm.sd.StableDiffusion` (its U-Net is the denoiser, U^P for Style Swap);
    controlnet: a `controlnet.ControlNet` or None.
    cuda_graphs: replay the guided ControlNet + U-Net call as CUDA graphs (`ldm.graphs`), one per
        batch shape, kept for the pipeline's lifetime. Same numbers, fewer CPU launches; CUDA only
        (ignored on other devices and under autocast). Call `reset_graphs()` after replacing weight
        tensors in place of the old ones (`load_state_dict(assign=True)`, `.to(...)`); in-place updates
        such as `mrlf.style.blend_unet_` need none, and other modules get graphs of their own
        (`reset_graphs()` frees the old ones).
    """

    def __init__(self, sd, controlnet=None, schedule: Schedule = SD15, cuda_graphs: bool = False):
        self.sd, self.controlnet, self.schedule = sd, controlnet, schedule
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}

    def reset_graphs(self) -> None:
        self._graphs.clear()

    def model_fn(self, settings: SamplingSettings):
        """model_fn(x, t, context, hint) -> eps for `samplers.guidance` (graphed if cuda_graphs)."""
        fn = controlled_model(self.sd.unet, self.controlnet, settings.control_scale, settings.guess_mode)
        if not self.cuda_graphs:
            return fn
        # The modules' identities too: a graph (or its eager fallback) keeps calling the modules it was made for.
        key = (id(self.sd.unet), id(self.controlnet), settings.control_scale, settings.guess_mode)
        if key not in self._graphs:
            self._graphs[key] = CUDAGraphed(fn)
        return self._graphs[key]

    @property
    def factor(self) -> int:
        return self.sd.latent_factor

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.factor * self.sd.unet.cfg.downsample_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {f}")
        return height // self.factor, width // self.factor

    def contexts(self, prompts: list[str], negative: str | list[str] = "") -> Split:
        neg = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(neg) != len(prompts):
            raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
        ctx = self.sd.encode_prompt(list(neg) + list(prompts))
        return Split(ctx[: len(prompts)], ctx[len(prompts):])

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, context: Split, hint: torch.Tensor | None = None,
               settings: SamplingSettings = SamplingSettings(), window: int | None = None, stride: int | None = None,
               view_batch: int = 8, blend: str = "uniform", inpaint: Inpaint | None = None,
               generator=None, timesteps=None, callback=None) -> torch.Tensor:
        """Denoise `latents` (B, 4, H, W), unit-variance noise, with `settings.sampler`; returns the final latents.

        window/stride: latent view size and stride (None: one view over the whole canvas).
        generator: CPU torch.Generator (or one per sample) for inpainting and eta noise.
        timesteps: DDIM only, the tail of the grid to run from an img2img start in `latents`.
        callback(i, t, latents) runs after each step (after its inpainting) with the sampler's state
        (Euler's is x0 + σ·noise, the others' the latent itself).
        """
        sd, s = self.sd, settings
        sampler = get_sampler(s.sampler)
        _, _, H, W = latents.shape
        views = get_views(H, W, window or max(H, W), stride or max(H, W))
        weights = None if blend == "uniform" else blend_weights(views[0].height, views[0].width, blend)

        hint = None if hint is None else hint.to(sd.device, sd.dtype)
        n_steps = s.steps if timesteps is None else len(timesteps)
        # per step: (with the ControlNet, guided); steps outside a window drop the ControlNet or the guidance
        modes = list(zip([c and hint is not None for c in step_window(n_steps, s.control_start, s.control_end)],
                         step_window(n_steps, s.guidance_start, s.guidance_end)))
        fns = {(c, g): tiled_eps(self.model_fn(s), views, context=context, guidance=s.guidance_scale if g else 1.0,
                                 hint=hint if c else None, hint_factor=self.factor, view_batch=view_batch,
                                 weights=weights) for c, g in set(modes)}
        step = [0]  # the step under way, for samplers that call eps_fn more than once per step too

        def eps_fn(z, t):
            # t as a device tensor: a CUDA graph replays it as data (an int would be baked in).
            return fns[modes[step[0]]](z, torch.tensor(t, device=sd.device))

        grid = {} if timesteps is None else {"timesteps": timesteps}
        levels = None if inpaint is None else sampler.levels(s.steps, self.schedule, **grid)
        mask = None if inpaint is None else inpaint.mask.to(sd.device, latents.dtype)

        def after_step(i, t, z, x0):
            step[0] = i + 1
            if inpaint is not None:
                if inpaint.level == "faithful" and s.sampler == "ddim":
                    # Parity trap: the original noises the init to t-1 although z now sits at t - N//n.
                    a, scale = self.schedule.alpha_bar(t - 1), 1.0
                else:
                    a, scale = levels.alpha_bar[i], levels.scale[i]
                n = randn(z.shape, generator, sd.device, torch.float32)
                init_t = noised(inpaint.init.float(), n, a, scale)
                z = (mask * init_t + (1 - mask) * z.float()).to(z.dtype)
            if callback is not None:
                callback(i, t, z)
            return z

        noise = {} if s.eta == 0 else {"eta": s.eta, "generator": generator}
        return sampler.sample(eps_fn, latents.to(sd.device, sd.dtype), s.steps, self.schedule, callback=after_step,
                              **grid, **noise)

    def hint_from_labels(self, labels, height: int, width: int) -> torch.Tensor:
        """(B, H, W) or (H, W) trainId labels (or a (B, K, H, W) one-hot/image hint) -> hint at height x width.

        Label maps are nearest-upsampled like the original (pixel replication for integer factors).
        """
        if torch.is_tensor(labels) and labels.is_floating_point() and labels.ndim == 4:
            hint = labels
        else:
            hint = one_hot(labels)
            hint = hint[None] if hint.ndim == 3 else hint
        if hint.shape[-2:] != (height, width):
            hint = torch.nn.functional.interpolate(hint, size=(height, width), mode="nearest")
        return hint

    @torch.no_grad()
    def generate(self, prompts: str | list[str], labels=None, *, height: int = 512, width: int = 512,
                 images_per_prompt: int = 1, seeds: int | list[int] = 0, negative_prompt: str = "",
                 settings: SamplingSettings = SamplingSettings(), init_images: torch.Tensor | None = None,
                 window: int | None = None, stride: int | None = None, view_batch: int = 8,
                 callback=None, output: str = "pil"):
        """Prompts (+ label maps) -> images. One private CPU generator per image (seed i), so an image
        does not depend on the batch it is generated in. `init_images` ([-1, 1]) with settings.strength < 1
        is img2img (DDIM). callback(i, t, latents) runs after each step. output: "pil", "tensor" ([-1, 1])
        or "latents"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        n = len(prompts)
        seeds = list(range(seeds, seeds + n)) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        h, w = self._check_size(height, width)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        hint = None
        if labels is not None:
            if self.controlnet is None:
                raise ValueError("labels given but no ControlNet loaded")
            hint = self.hint_from_labels(labels, height, width)
            if hint.shape[0] == n // images_per_prompt and images_per_prompt > 1:
                hint = hint.repeat_interleave(images_per_prompt, 0)
            if hint.shape[0] == 1 and n > 1:
                hint = hint.expand(n, -1, -1, -1)
            if hint.shape[0] != n:
                raise ValueError(f"{hint.shape[0]} label maps for {n} images")
        ctx = self.contexts(prompts, negative_prompt)
        z = randn((n, 4, h, w), gens, self.sd.device, self.sd.dtype)
        timesteps = None
        if init_images is not None or settings.strength < 1:
            if init_images is None:
                raise ValueError("strength < 1 needs init_images")
            if settings.sampler != "ddim":
                raise ValueError(f"img2img (init_images) needs the ddim sampler, not {settings.sampler!r}")
            x0 = self.sd.encode_image(init_images.expand(n, -1, -1, -1) if init_images.shape[0] == 1 else init_images,
                                      gens)
            z, timesteps = img2img_start(x0.float(), settings.steps, settings.strength, self.schedule, noise=z)
            z = z.to(self.sd.dtype)
        z = self.sample(z, ctx, hint, settings, window, stride, view_batch, generator=gens,
                        timesteps=timesteps, callback=callback)
        if output == "latents":
            return z
        images = self.sd.decode_latents(z)
        return images if output == "tensor" else to_pil(images)

    @torch.no_grad()
    def mrlf(self, label: np.ndarray, prompt: str, generator: torch.Generator, *,
             settings: SamplingSettings = SamplingSettings(), fusion: MRLFSettings = DATASET,
             negative_prompt: str = "", source: str = "label", callback=None) -> MRLFResult:
        """DGInStyle's two-pass generation for one (H, W) trainId label crop: the base-size image and the
        latents of both passes.

        settings: the sampling of both passes; fusion: MRLF's factor, views, threshold and options.
        callback(pass_index, i, t, latents) runs after every step of pass 1 (pass_index 1) and of the
        tiled pass 2 (pass_index 2, after the inpainting), as `sample`'s callback.
        """
        label = validate_label(np.asarray(label), source=source)
        H, W = label.shape
        h, w = self._check_size(H, W)
        f = fusion.scale_factor
        dev, dt = self.sd.device, self.sd.dtype
        timings = {}
        tic = time.perf_counter()
        mask, comps = large_component_mask(label, fusion.component_threshold)  # before any one-hot (void stays void)
        ctx = self.contexts([prompt], negative_prompt)
        hint1 = self.hint_from_labels(label, H, W)
        # Pass 1: plain controlled generation at the base size (one view, as the original's stride 64 at 512).
        z1 = randn((1, 4, h, w), generator, dev, dt)
        z1 = self.sample(z1, ctx, hint1, settings, view_batch=fusion.view_batch, generator=generator,
                         callback=_for_pass(callback, 1))
        first = to_pil(self.sd.decode_latents(z1))[0]  # quantised to uint8, as the original
        timings["pass1_s"] = time.perf_counter() - tic
        if f == 1:
            return MRLFResult(first, first, mask, comps, timings, pass1_latents=z1)
        tic = time.perf_counter()
        up = first.resize((W * f, H * f), Image.LANCZOS)
        post = self.sd.vae.encode(from_pil(up).to(dev, self.sd.vae_dtype))
        z_init = (post.sample(generator) if fusion.posterior == "sample" else post.mode()) * self.sd.vae.cfg.scaling_factor
        # Pass 2: tiled at f x base, large components re-injected from pass 1 after every step.
        hint2 = self.hint_from_labels(label, H * f, W * f)
        m = torch.from_numpy(latent_mask(mask, self.factor // f) if self.factor % f == 0 else
                             _nearest_resize(mask, h * f, w * f)).float()
        z2 = randn((1, 4, h * f, w * f), generator, dev, dt)
        z2 = self.sample(z2, ctx, hint2, settings, fusion.window, fusion.stride, fusion.view_batch, fusion.blend,
                         Inpaint(z_init, m, fusion.inpaint_level), generator=generator,
                         callback=_for_pass(callback, 2))
        big = to_pil(self.sd.decode_latents(z2))[0]
        image = big.resize((W, H), Image.LANCZOS)
        timings["pass2_s"] = time.perf_counter() - tic
        return MRLFResult(image, first, mask, comps, timings, pass1_latents=z1, init_latents=z_init,
                          pass2_latents=z2)


def _for_pass(callback, pass_index: int):
    """callback(pass_index, i, t, latents) as a per-pass callback(i, t, latents)."""
    return None if callback is None else functools.partial(callback, pass_index)


def _nearest_resize(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """PyTorch legacy nearest to (h, w): index floor(i * H / h)."""
    H, W = mask.shape
    return mask[(np.arange(h) * H // h)[:, None], (np.arange(w) * W // w)[None, :]]
