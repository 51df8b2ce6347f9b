"""SHADE: style hallucination and style consistency (Zhao et al., "Style-Hallucinated Dual
Consistency Learning for Domain Generalized Semantic Segmentation", ECCV 2022), as DGInStyle's
SegModel (the HRDA / DAFormer code base) uses it with MiT backbones.

- ``StyleHallucination``: a module without parameters, run by ``MixVisionTransformer`` on its
  stage-1 output in training mode only (attach it with ``attach_style_hallucination``). Per
  sample and channel it takes the spatial mean mu and (unbiased) standard deviation sigma
  (+ 1e-7), both detached, draws combination weights w ~ Dirichlet(concentration * 1_K) and
  forms a new style mu' = w @ basis_mean, sigma' = w @ basis_std from the K basis styles; the
  hallucinated features are (f - mu) / sigma * sigma' + mu'. The backbone continues with the batch
  [clean; hallucinated] (2B samples), so the head predicts both; the caller duplicates the labels.
  Its basis lives in non-persistent buffers: nothing of SHADE appears in a state dict, exported
  weights are those of the plain segmentor, and inference (eval mode) is unchanged.
- The basis: ``stage1_statistics`` of source images (the concatenated per-channel means and
  standard deviations of the stage-1 output, model in eval mode), reduced to K styles by
  ``farthest_point_sample`` (first point drawn uniformly at random, then each time the point
  farthest, in squared Euclidean distance, from those chosen).
- ``compute_basis``: one basis pass over the source images of a training run (a seeded draw of
  them per pass, split over the ranks and gathered, the training pipeline's augmentations), as
  DGInStyle's SegModel runs it before the first step and after every interval of steps.
- ``style_consistency_loss``: softmax of the clean and hallucinated logits (the decode head's
  logits, before any resize; for HRDA the fused ones), the mixture m = clamp((p + q) / 2, 1e-7, 1),
  loss = (KL(p || m) + KL(q || m)) / 2 with ``F.kl_div(log m, p, reduction="batchmean")``, i.e. the
  sum over classes and pixels divided by the number of pixels (all samples); no temperature.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["StyleHallucination", "attach_style_hallucination", "get_style_hallucination", "stage1_features",
           "stage1_statistics", "farthest_point_sample", "StyleImages", "style_inputs", "compute_basis",
           "style_consistency_loss"]


class StyleHallucination(nn.Module):
    """Mixes ``num_styles`` basis styles (channel mean / std of ``style_dim`` channels) with
    Dirichlet(``concentration``) weights. ``forward(x)`` -> (x, hallucinated x)."""

    def __init__(self, num_styles: int = 64, style_dim: int = 64, concentration: float = 0.0156, eps: float = 1e-7):
        super().__init__()
        if num_styles < 1 or style_dim < 1 or concentration <= 0:
            raise ValueError("num_styles and style_dim must be >= 1 and concentration > 0")
        self.num_styles, self.style_dim = int(num_styles), int(style_dim)
        self.concentration, self.eps = float(concentration), float(eps)
        # non-persistent: never in a state dict (checkpoints carry the basis separately)
        self.register_buffer("proto_mean", torch.zeros(num_styles, style_dim), persistent=False)
        self.register_buffer("proto_std", torch.zeros(num_styles, style_dim), persistent=False)
        self.has_basis = False

    def extra_repr(self) -> str:
        return f"num_styles={self.num_styles}, style_dim={self.style_dim}, concentration={self.concentration:g}"

    @torch.no_grad()
    def set_basis(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.proto_mean.shape or std.shape != self.proto_std.shape:
            raise ValueError(f"basis of shape {tuple(mean.shape)} / {tuple(std.shape)}, expected "
                             f"{tuple(self.proto_mean.shape)}")
        self.proto_mean.copy_(mean)
        self.proto_std.copy_(std)
        self.has_basis = True

    def basis(self) -> dict[str, torch.Tensor]:
        return {"mean": self.proto_mean.detach().cpu().clone(), "std": self.proto_std.detach().cpu().clone()}

    def sample_weights(self, n: int) -> torch.Tensor:
        """(n, num_styles) Dirichlet weights (torch's RNG of the basis' device)."""
        alpha = torch.full((self.num_styles,), self.concentration, device=self.proto_mean.device)
        return torch.distributions.Dirichlet(alpha).sample((n,))

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None):
        if not self.has_basis:
            raise RuntimeError("style hallucination has no basis styles yet (set_basis)")
        b, c = x.shape[:2]
        if c != self.style_dim:
            raise ValueError(f"features have {c} channels, the styles {self.style_dim}")
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        std = x.std(dim=(2, 3), keepdim=True).detach() + self.eps
        w = (self.sample_weights(b) if weights is None else weights).detach()
        new_mean = (w @ self.proto_mean.to(w.dtype)).to(x.dtype)[..., None, None]
        new_std = (w @ self.proto_std.to(w.dtype)).to(x.dtype)[..., None, None]
        return x, (x - mean) / std * new_std + new_mean


def attach_style_hallucination(model: nn.Module, num_styles: int = 64, concentration: float = 0.0156
                               ) -> StyleHallucination:
    """Give the MiT backbone of ``model`` (a segmentor, possibly HRDA) a style hallucination module
    on its stage-1 output; returns it. No parameters and no state-dict keys are added."""
    from .mit import MixVisionTransformer

    backbone = getattr(getattr(model, "module", model), "backbone", None)
    if not isinstance(backbone, MixVisionTransformer):
        raise ValueError(f"SHADE is implemented for MiT backbones, not {type(backbone).__name__}")
    ref = next(backbone.parameters())
    sh = StyleHallucination(num_styles, backbone.out_channels[0], concentration).to(ref.device)
    backbone.style_hallucination = sh
    return sh


def get_style_hallucination(model: nn.Module) -> StyleHallucination | None:
    backbone = getattr(getattr(model, "module", model), "backbone", None)
    return getattr(backbone, "style_hallucination", None)


def stage1_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MiT stage-1 output (B, C1, H/4, W/4), where the hallucination acts."""
    x, h, w = backbone.patch_embed1(x)
    for blk in backbone.block1:
        x = blk(x, h, w)
    x = backbone.norm1(x)
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


def stage1_statistics(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 2 * C1) styles of the stage-1 output of ``x``: per-channel spatial means, then unbiased
    standard deviations, in fp32 (the layout SHADE's farthest-point sampling works on)."""
    f = stage1_features(backbone, x).float()
    return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)


def farthest_point_sample(points: torch.Tensor, n: int, start: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (n,) of farthest-point sampling of ``points`` (N, D): the first index ``start`` (by
    default uniform over N, drawn with ``generator``), then repeatedly the point whose squared
    distance to the nearest chosen point is largest (first one on ties). With n > N points repeat
    once every point is chosen, as in SHADE."""
    num = points.shape[0]
    if num == 0:
        raise ValueError("farthest-point sampling of an empty set")
    pts = points.float()
    if start is None:
        start = int(torch.randint(num, (), generator=generator))
    idx = torch.empty(n, dtype=torch.long)
    dist = torch.full((num,), 1e10, device=pts.device)
    far = int(start)
    for i in range(n):
        idx[i] = far
        d = ((pts - pts[far]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = int(torch.argmax(dist))
    return idx


def style_consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """SHADE's style consistency of (2B, C, H, W) logits [clean; hallucinated]: the mean over pixels
    of (KL(p || m) + KL(q || m)) / 2, m = clamp((p + q) / 2, 1e-7, 1), p / q the class softmaxes."""
    if logits.shape[0] % 2:
        raise ValueError(f"expected a [clean; hallucinated] batch, got {logits.shape[0]} samples")
    prob = F.softmax(logits.float(), dim=1)
    b, c = logits.shape[0] // 2, logits.shape[1]
    p = prob[:b].permute(0, 2, 3, 1).reshape(-1, c)
    q = prob[b:].permute(0, 2, 3, 1).reshape(-1, c)
    log_m = torch.clamp((p + q) / 2.0, 1e-7, 1).log()
    return (F.kl_div(log_m, q, reduction="batchmean") + F.kl_div(log_m, p, reduction="batchmean")) / 2.0


# ---------------------------------------------------------------------------------------------
# A basis pass over the source images
# ---------------------------------------------------------------------------------------------
_SHADE_STREAM = 0x5AADE  # seeds the basis passes apart from the training data's draws


class StyleImages(Dataset):
    """Source images for a basis pass: item j is file ``picks[j]`` = (source, index) through that
    source's training pipeline (geometric + photometric; ``segmentation.datasets.TrainSource``), its
    randomness a function of (seed, step, j) only; labels are not needed."""

    def __init__(self, sources, picks, seed: int, step: int):
        self.sources, self.picks, self.seed, self.step = sources, picks, int(seed), int(step)

    def __len__(self):
        return len(self.picks)

    def __getitem__(self, j: int) -> torch.Tensor:
        s, i = self.picks[j]
        rng = np.random.default_rng([self.seed, _SHADE_STREAM, self.step, int(j)])
        src = self.sources[s]
        image, label = src.dataset.load(i)
        image, label = src.pipeline.geometric(image, label, rng)
        return src.pipeline.finish(image, label, rng)[0]


def style_inputs(model: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """The inputs whose stage-1 styles describe ``image``: the image itself, or for HRDA the image at
    its context scale and at full resolution (the two inputs its training forward gives the backbone)."""
    if getattr(model.cfg, "hrda", None) is None:
        return [image]
    out = []
    for s in sorted(model.cfg.hrda.scales):
        out.append(image if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False))
    return out


def _gather(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (a collective under torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return torch.cat(out)


@torch.no_grad()
def compute_basis(model: nn.Module, sources, num_styles: int, *, seed: int, step: int,
                  max_images: int | None = None, batch_size: int = 2, num_workers: int = 0,
                  device: torch.device | str = "cpu", autocast=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(basis means, basis stds, number of styles pooled) for the pass at training ``step``.

    The stage-1 styles of the ``sources``' images (all, or a draw of ``max_images`` seeded by
    (seed, step)), this rank taking every world_size-th of them, run through ``model`` (a segmentor,
    not its DDP wrapper) in eval mode under ``autocast``, gathered to every rank in rank order and
    reduced by farthest-point sampling (first point seeded by (seed, step)) to ``num_styles``
    styles, identical on every rank. A collective under torch.distributed: all ranks call it together."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    files = [(s, i) for s, src in enumerate(sources) for i in range(len(src))]
    pick_rng = np.random.default_rng([seed, _SHADE_STREAM, step])
    n = len(files) if max_images is None else min(max_images, len(files))
    picks = [files[k] for k in pick_rng.choice(len(files), size=n, replace=False)]
    loader = DataLoader(StyleImages(sources, picks[rank::world], seed, step), batch_size=batch_size,
                        num_workers=num_workers, generator=torch.Generator())
    was_training = model.training
    model.eval()
    stats = []
    try:
        for image in loader:
            image = image.to(device, non_blocking=True)
            with autocast or nullcontext():
                for x in style_inputs(model, image):
                    stats.append(stage1_statistics(model.backbone, x).float().cpu())
    finally:
        model.train(was_training)
    c = model.backbone.out_channels[0]
    points = _gather(torch.cat(stats) if stats else torch.zeros(0, 2 * c))
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, _SHADE_STREAM, step, 1]).integers(2 ** 62)))
    idx = farthest_point_sample(points, num_styles, generator=g)
    basis = points[idx].reshape(num_styles, 2, c)
    return basis[:, 0].contiguous(), basis[:, 1].contiguous(), points.shape[0]
