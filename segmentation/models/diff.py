"""DIFF: a frozen diffusion U-Net's features along a DDIM inversion as a segmentation backbone
(Ji et al. 2024, "Diffusion Features to Bridge Domain Gap for Semantic Segmentation").

Read top to bottom:

1. ``DiffusionFeatures``, the frozen part (its weights are referred to by the config, never part
   of the segmentor's state dict). An image batch is encoded by the VAE (a posterior sample times
   the scaling factor), then pushed up DIFF's grid of timesteps (0, 1, ..., 23, 26, ..., 139, 160)
   by DDIM inversion steps (``samplers.ddim_invert_step``; η = 1 where 10 < t < 250, else 0).
   At the grid points in ``feature_timesteps`` (91, 52, 30, 22, 18, 14, 11, 7, 3) forward hooks on
   the U-Net, by module name, read the decoder of its three finest levels (strides 8, 16, 32 of
   the image): the residual branch of every ResBlock after its second conv, before the skip is
   added (``output_blocks.N.0.out_layers``), and the output of the first transformer block of
   every SpatialTransformer (``output_blocks.N.1.transformer_blocks.0``). Per level the channels
   are: each module in that order, each over the feature timesteps in their order.
2. The trainable fusion: per stride one bottleneck block (1x1 -> 3x3 -> 1x1, GroupNorm, projection
   shortcut) down to ``projection_dims`` (512 / 1024 / 2048), then the finecoder: GroupNorm, and
   transposed-conv upsampling 32 -> 16 -> 8 -> 4 with a residual block after each step, adding the
   aggregated features of each stride on the way. The pyramid (stride 4, 8, 16, 32) feeds the
   project's DAFormer head.
3. ``DIFFSegmentor`` and implicit posterior knowledge learning (IPKL). The unconditional pass runs
   the inversion with the empty prompt. The conditional pass (training only) adds one prompt per
   class of ``ipkl_classes`` present in the batch's labels: each step, every class prompt's
   classifier-free guided ε (scale 5, against the negative prompt) gives its own DDIM update,
   and the next latent is, per latent pixel, the mean of the empty prompt's update and the
   updates of the classes whose (nearest-downsampled) mask covers the pixel. Loss = CE(conditional)
   + CE(unconditional) + 1.0 x MSE between the two passes' head logits; test time runs the
   unconditional pass only.

What the U-Net batch holds, as in the original: one entry (the whole image batch) per prompt,
[negative prompt, prompt, class prompts...]. The ResBlock features are those of the negative
prompt's entry; the transformer features are summed over all entries, so in the unconditional
pass (prompt = negative prompt = "") they count the one entry twice, and in the conditional pass
the class prompts' cross-attention adds to them.

Where this differs from the original code (Yux1angJi/DIFF), and why:
  - no stride-64 branch: the original aggregates the coarsest level (stride 64) and discards it;
  - the inversion stops after the last feature step (t = 91): the steps after it change no feature;
  - a prompt equal to the negative prompt is run once (the original runs both identical entries);
  - one posterior sample per image is shared by the two passes of a training step;
  - the latent stays in fp32 between steps; the frozen networks run in ``dtype`` (fp16 on CUDA);
  - a v-prediction U-Net's output is converted to ε before the step (the original treats it as ε);
  - in eval mode the posterior sample and the inversion noise come from a generator seeded with
    ``eval_seed`` at every forward, so evaluation is deterministic; training draws from the global
    CPU RNG (seeded per rank by the training script and restored on resume);
  - the class prompts are ``class_prompt`` filled with the class name (the original words each
    class by hand);
  - inputs are the project's ImageNet-normalised images; the backbone maps them to [-1, 1] (the
    original normalises with mean = std = 127.5), and pads them to a multiple of the U-Net's
    input stride (64 for SD), cropping the logits back.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm import checkpoint, formats
from ldm.config import UNetConfig
from ldm.tokenizer import Tokenizer
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from ldm.weights import CheckpointError, fingerprint
from samplers import SD15, cfg_combine, ddim_invert_step, eps_from_v, randn, windowed_eta

from ..labels import CLASS_NAMES
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .segmentor import IGNORE_INDEX, PRESETS, DIFFConfig, Segmentor, SegmentorConfig, build_head

LEVELS = 3  # the decoder levels read: strides 8, 16, 32 of the image for SD (a 3-level U-Net: all of them)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- the frozen part
def feature_modules(unet_cfg: UNetConfig) -> list[list[str]]:
    """Per decoder level, finest first, the names of the U-Net modules whose outputs are read:
    every ResBlock's residual branch, then the first transformer block of every SpatialTransformer
    (levels without attention have none)."""
    n_levels, per_level = len(unet_cfg.channels), unet_cfg.num_res_blocks + 1
    if n_levels < LEVELS:
        raise ValueError(f"DIFF reads {LEVELS} decoder levels; this U-Net has {n_levels}")
    names = []
    for level in range(LEVELS):
        first = (n_levels - 1 - level) * per_level  # the decoder runs from the coarsest level
        blocks = range(first, first + per_level)
        level_names = [f"output_blocks.{n}.0.out_layers" for n in blocks]
        if unet_cfg.attention_levels[level]:
            level_names += [f"output_blocks.{n}.1.transformer_blocks.0" for n in blocks]
        names.append(level_names)
    return names


def feature_channels(unet_cfg: UNetConfig, num_timesteps: int) -> tuple[int, ...]:
    """Channels of the features of each level: modules x timesteps x the level's width."""
    return tuple(len(names) * num_timesteps * unet_cfg.channels[level]
                 for level, names in enumerate(feature_modules(unet_cfg)))


def weight_sources(cfg: DIFFConfig) -> dict[str, str]:
    """{component: path} of the frozen networks; the VAE and text encoder default to the U-Net's path."""
    if not cfg.unet:
        raise CheckpointError("DIFF needs the frozen diffusion weights: set DIFFConfig.unet (--diff-unet PATH)")
    return {"unet": cfg.unet, "vae": cfg.vae or cfg.unet, "text_encoder": cfg.text_encoder or cfg.unet}


def class_prompts(cfg: DIFFConfig) -> dict[int, str]:
    return {c: cfg.class_prompt.format(name=CLASS_NAMES[c]) for c in cfg.ipkl_classes}


class DiffusionFeatures:
    """The frozen VAE encoder and U-Net, the encoded prompts, and the feature-reading inversion.

    A plain object, not a module: the segmentor's state dict, parameters, DDP and optimiser never
    see these weights. ``DIFFBackbone`` moves it along with itself (``to``)."""

    def __init__(self, cfg: DIFFConfig, unet: UNetModel, vae: AutoencoderKL, contexts: dict[str, torch.Tensor],
                 weights_fingerprint: str = ""):
        self.cfg, self.unet, self.vae = cfg, unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)
        self.contexts = contexts  # prompt -> (1, 77, width) text context
        self.fingerprint = weights_fingerprint
        self.modules = feature_modules(unet.cfg)
        self.channels = feature_channels(unet.cfg, len(cfg.feature_timesteps))
        self.multiple = vae.cfg.downsample_factor * unet.cfg.downsample_factor  # input sides divide by this
        self.dtype = torch.float32
        self.to("cpu")

    @classmethod
    def load(cls, cfg: DIFFConfig) -> "DiffusionFeatures":
        """Load the three networks (weights.fingerprint over all of them, in the files' dtypes), check
        the fingerprint against ``cfg.fingerprint`` when that is set, encode the prompts and keep
        the VAE's encoder only."""
        sources = weight_sources(cfg)
        models = {}
        for path in dict.fromkeys(sources.values()):  # each file or folder read once
            names = [n for n, p in sources.items() if p == path]
            ck = checkpoint.read_checkpoint(path, components=names)
            for name in names:
                models[name] = formats.load_part(ck, name, dtype=None, device="cpu")
        found = fingerprint({f"{n}.{k}": v for n, m in models.items() for k, v in m.state_dict().items()})
        if cfg.fingerprint and found != cfg.fingerprint:
            raise CheckpointError(
                f"the frozen weights ({', '.join(f'{n}: {p}' for n, p in sources.items())}) are not the ones this "
                f"DIFF model was trained on: fingerprint {found}, expected {cfg.fingerprint}. Point the config "
                "at the original weights (DIFFConfig.unet / vae / text_encoder), or clear its fingerprint to "
                "accept these")
        text_encoder = models["text_encoder"].float()
        prompts = list(dict.fromkeys([cfg.negative_prompt, cfg.prompt, *class_prompts(cfg).values()]))
        with torch.no_grad():
            ids = Tokenizer(max_length=text_encoder.cfg.max_length)(prompts)
            contexts = dict(zip(prompts, text_encoder(ids).split(1)))
        vae = models["vae"]
        vae.decoder = vae.post_quant_conv = None  # features need the encoder alone
        return cls(cfg, models["unet"], vae, contexts, found)

    def to(self, device) -> "DiffusionFeatures":
        """Move to ``device`` in the config's dtype there (auto: fp16 on CUDA, fp32 elsewhere)."""
        device = torch.device(device)
        self.dtype = DTYPES.get(self.cfg.dtype, torch.float16 if device.type == "cuda" else torch.float32)
        self.unet.to(device, self.dtype)
        self.vae.to(device, self.dtype)
        self.contexts = {p: c.to(device, self.dtype) for p, c in self.contexts.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> fp32 latents: a posterior sample (noise drawn on the CPU, as
        ``samplers.randn``) or the mean, times the VAE's scaling factor."""
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.vae.encode(images.to(self.device, self.dtype))
        z = posterior.mean.float()
        if self.cfg.posterior == "sample":
            z = z + posterior.std.float() * randn(z.shape, generator, z.device)
        return z * self.vae.cfg.scaling_factor

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The features of latents ``z`` (B, 4, h, w), one fp32 tensor (B, channels, h / 2^l, w / 2^l)
        per level l = 0, 1, 2. With ``label`` (B, H, W) trainIds this is IPKL's conditional pass:
        a class prompt for every class of ``ipkl_classes`` present in the batch."""
        cfg, b = self.cfg, z.shape[0]
        same = cfg.prompt == cfg.negative_prompt
        # U-Net entries, each the whole batch: [negative, prompt (unless the same), class prompts]
        prompts = [cfg.negative_prompt] + ([] if same else [cfg.prompt])
        masks = [torch.ones_like(z[:, :1])]  # per DDIM update (prompt, classes): where it counts
        if label is not None:
            small = F.interpolate(label[:, None].float(), size=z.shape[-2:], mode="nearest")
            present = set(torch.unique(label).tolist())
            for c, text in class_prompts(cfg).items():
                if c in present:
                    prompts.append(text)
                    masks.append((small == c).float())
        e = len(prompts)
        mask = torch.stack(masks)  # (K, B, 1, h, w)
        context = torch.cat([self.contexts[p].expand(b, -1, -1) for p in prompts])
        # transformer features: summed over the entries, the negative one doubled when it is the prompt too
        weights = torch.ones(e, device=z.device)
        weights[0] = 2.0 if same else 1.0

        out = [z.new_empty((b, c, z.shape[-2] >> level, z.shape[-1] >> level)) for level, c in enumerate(self.channels)]
        slot = [None]  # the feature timestep being read, or None

        def reader(level: int, j: int, transformer: bool):
            width = self.unet.cfg.channels[level]

            def hook(module, inputs, output):
                if slot[0] is None:
                    return
                if transformer:  # tokens (E*B, h*w, C), summed over the entries
                    h = out[level].shape[-2]
                    f = rearrange(output.float(), "(e b) (h w) c -> e b c h w", e=e, h=h)
                    f = torch.einsum("e,ebchw->bchw", weights, f)
                else:  # the negative prompt's entry
                    f = output[:b]
                start = (j * len(cfg.feature_timesteps) + slot[0]) * width
                # copied now: with autograd off the U-Net adds the skip into this very tensor next
                # (ldm.layers.residual)
                out[level][:, start:start + width] = f

            return hook

        handles = [self.unet.get_submodule(name).register_forward_hook(reader(level, j, ".transformer_blocks." in name))
                   for level, names in enumerate(self.modules) for j, name in enumerate(names)]
        slots = {t: s for s, t in enumerate(cfg.feature_timesteps)}
        grid = cfg.timesteps
        last = max(grid.index(t) for t in cfg.feature_timesteps)
        x = z.float()
        try:
            with torch.autocast(z.device.type, enabled=False):
                for i in range(last + 1):
                    t, t_next = grid[i], grid[i + 1]
                    a_t, a_next = SD15.alpha_bar(t), SD15.alpha_bar(t_next)
                    slot[0] = slots.get(t)
                    x_in = x.repeat(e, 1, 1, 1)
                    pred = self.unet(x_in.to(self.dtype), t, context).float()
                    slot[0] = None
                    if i == last:
                        break  # the later steps change no feature
                    eps = eps_from_v(x_in, pred, a_t) if cfg.prediction_type == "v_prediction" else pred
                    eps = eps.unflatten(0, (e, b))
                    guided = cfg_combine(eps[:1], eps[1:], cfg.guidance)  # every prompt against the negative one
                    eps = torch.cat([eps[:1], guided]) if same else guided  # one per DDIM update (K)
                    eta = windowed_eta(t, cfg.eta, cfg.eta_window)
                    noise = randn((len(eps) * b, *x.shape[1:]), generator, x.device).unflatten(0, (len(eps), b)) \
                        if eta > 0 else None
                    nxt = ddim_invert_step(x.expand_as(eps), eps, a_t, a_next, eta, noise)
                    x = nxt[0] if len(nxt) == 1 else (nxt * mask).sum(0) / mask.sum(0)
        finally:
            for handle in handles:
                handle.remove()
        return out


# ---------------------------------------------------------------------------------------------- the fusion
# GroupNorms are named gn*, not *norm*: the recipe's optimiser leaves weight decay on them, as the
# original's (its custom keys for this backbone name the head alone).
def _init_conv(m: nn.Module) -> None:
    """He-normal over fan-out (detectron2's c2_msra_fill, the original's init), zero bias."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """detectron2's BottleneckBlock with GroupNorm: 1x1 (cin -> width) -> 3x3 -> 1x1 (-> cout), no
    conv bias, a GroupNorm after each conv, ReLU after the first two; a 1x1 projection shortcut with
    its GroupNorm; ReLU after the sum."""

    def __init__(self, cin: int, cout: int, width: int, groups: int):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(cin, width, 1, bias=False), nn.GroupNorm(groups, width)
        self.conv2, self.gn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width)
        self.conv3, self.gn3 = nn.Conv2d(width, cout, 1, bias=False), nn.GroupNorm(groups, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None
        self.shortcut_gn = nn.GroupNorm(groups, cout) if cin != cout else None

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        h = F.relu(self.gn2(self.conv2(h)))
        h = self.gn3(self.conv3(h))
        skip = x if self.shortcut is None else self.shortcut_gn(self.shortcut(x))
        return F.relu(h + skip)


class ResidualBlock(nn.Module):
    """3x3 conv, GroupNorm, ReLU, 3x3 conv, GroupNorm, + x, ReLU."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels)
        self.conv2, self.gn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels)

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + x)


class UpFuse(nn.Module):
    """x2 by a 4x4 transposed conv (stride 2, padding 1), plus the finer stride's features if given,
    then a residual block."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        self.block = ResidualBlock(cout, groups)

    def forward(self, x, skip=None):
        x = self.up(x)
        return self.block(x if skip is None else x + skip)


class Finecoder(nn.Module):
    """The aggregated strides 8, 16, 32, each GroupNorm'ed, fused from the coarsest down and
    upsampled once more: returns the pyramid [stride 4, 8, 16, 32]."""

    def __init__(self, dims: tuple[int, int, int], fine_dim: int, groups: int):
        super().__init__()
        d8, d16, d32 = dims
        self.gn = nn.ModuleList(nn.GroupNorm(groups, d) for d in dims)
        self.up = nn.ModuleList([UpFuse(d32, d16, groups), UpFuse(d16, d8, groups), UpFuse(d8, fine_dim, groups)])

    def forward(self, feats):
        s8, s16, s32 = (gn(f) for gn, f in zip(self.gn, feats))
        x = self.up[0](s32, s16)
        x = self.up[1](x, s8)
        return [self.up[2](x), s8, s16, s32]


class DIFFFusion(nn.Module):
    """The trainable part of the backbone: a bottleneck per stride (8, 16, 32) from the features'
    channels to ``projection_dims``, then the finecoder."""

    def __init__(self, cfg: DIFFConfig, channels: tuple[int, int, int]):
        super().__init__()
        self.aggregation = nn.ModuleList(Bottleneck(c, p, p // 4, cfg.aggregation_groups)
                                         for c, p in zip(channels, cfg.projection_dims))
        self.finecoder = Finecoder(cfg.projection_dims, cfg.fine_dim, cfg.finecoder_groups)
        self.out_channels = (cfg.fine_dim, *cfg.projection_dims)  # strides 4, 8, 16, 32
        self.apply(_init_conv)

    def forward(self, feats):
        return self.finecoder([agg(f) for agg, f in zip(self.aggregation, feats)])


# ---------------------------------------------------------------------------------------------- the backbone
def unit_range(x: torch.Tensor) -> torch.Tensor:
    """The project's ImageNet-normalised images -> [-1, 1], the VAE's input range."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) / 127.5 - 1


class DIFFBackbone(nn.Module):
    """``forward(x, label=None)`` -> [stride 4, 8, 16, 32] features of normalised images x (sides
    a multiple of ``multiple``); the frozen networks in ``diffusion``, the trainable fusion in
    ``fusion``."""

    def __init__(self, cfg: DIFFConfig, diffusion: DiffusionFeatures | None = None):
        super().__init__()
        self.cfg = cfg
        self.diffusion = DiffusionFeatures.load(cfg) if diffusion is None else diffusion
        self.fusion = DIFFFusion(cfg, self.diffusion.channels)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.fusion.out_channels

    @property
    def multiple(self) -> int:
        return self.diffusion.multiple

    def latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.diffusion.latents(unit_range(x), generator)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, generator: torch.Generator | None = None,
                latents: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``latents``: this batch's, if already encoded (the two passes of a training step share them)."""
        z = self.latents(x, generator) if latents is None else latents
        return self.fusion(self.diffusion(z, label, generator))

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .cpu() move the frozen networks too; their dtype stays their own
        super()._apply(fn, recurse)
        self.diffusion.to(fn(torch.zeros(())).device)
        return self


class DIFFSegmentor(Segmentor):
    """The DIFF backbone and a decode head (DAFormer's); see the module docstring. Parameter names:
    ``backbone.fusion.*`` and ``decode_head.*`` (lr x 10)."""

    def __init__(self, cfg: SegmentorConfig | str = "diff_sd15", diffusion: DiffusionFeatures | None = None):
        nn.Module.__init__(self)
        if isinstance(cfg, str):
            cfg = PRESETS[cfg]
        if cfg.diff is None:
            raise ValueError("DIFFSegmentor needs a config with diff set")
        self.backbone = DIFFBackbone(cfg.diff, diffusion)
        # the reference to the frozen weights: where they are (local paths made absolute; "" for the
        # U-Net's) and what they are
        where = {k: str(Path(p).resolve()) if Path(p).exists() else p for k, p in weight_sources(cfg.diff).items()}
        where |= {k: "" for k in ("vae", "text_encoder") if where[k] == where["unet"]}
        self.cfg = replace(cfg, diff=replace(cfg.diff, **where, fingerprint=self.backbone.diffusion.fingerprint))
        self.decode_head = build_head(cfg, self.backbone.out_channels)

    def _pad(self, x: torch.Tensor, label: torch.Tensor | None = None):
        """Pad (bottom, right) to sides the U-Net takes: the image with 0 (the mean colour), the label with void."""
        m = self.backbone.multiple
        pad = (0, -x.shape[-1] % m, 0, -x.shape[-2] % m)
        if not any(pad):
            return x, label
        return F.pad(x, pad), None if label is None else F.pad(label, pad, value=IGNORE_INDEX)

    def _generator(self) -> torch.Generator | None:
        """None (the global CPU RNG) in training; a fresh seeded one per eval-mode forward."""
        return None if self.training else torch.Generator().manual_seed(self.cfg.diff.eval_seed)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, **kwargs):
        """Logits of the unconditional pass at x's size; with ``label`` the training losses."""
        if label is not None:
            return self.forward_train(x, label, **kwargs)
        h, w = x.shape[-2:]
        x, _ = self._pad(x)
        logits = self.decode_head(self.backbone(x, generator=self._generator()))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]

    def forward_train(self, x: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> dict:
        """IPKL on crops x (B, 3, H, W) with labels (B, H, W): ``loss`` = ``loss_cond`` + ``loss_uncond``
        + ``loss_consistency`` (the weighted MSE between the passes' head logits), or CE of the
        unconditional pass alone when ``ipkl`` is off; ``logits`` (at the label's size),
        ``head_logits`` and ``features`` of the unconditional pass."""
        h, w = label.shape[-2:]
        x, label = self._pad(x, label)
        generator = self._generator()
        z = self.backbone.latents(x, generator)

        def ce(logits):
            logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
            # mmseg (DAFormer/HRDA) averages over all pixels, ignored ones included (they count as 0)
            return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none").mean(), logits

        out = {}
        if self.cfg.diff.ipkl:  # the conditional pass first, as the original
            cond = self.decode_head(self.backbone(x, label, generator, latents=z))
            out["loss_cond"] = ce(cond)[0]
        feats = self.backbone(x, generator=generator, latents=z)
        uncond = self.decode_head(feats)
        out["loss_uncond"], logits = ce(uncond)
        loss = out["loss_uncond"]
        if self.cfg.diff.ipkl:
            out["loss_consistency"] = self.cfg.diff.consistency_weight * F.mse_loss(cond.float(), uncond.float())
            loss = out["loss_cond"] + loss + out["loss_consistency"]
        return out | {"loss": loss, "logits": logits[..., :h, :w], "head_logits": uncond, "features": feats}
