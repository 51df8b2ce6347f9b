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
- ``style_consistency_loss``: softmax of the clean and hallucinated logits (the decode head's
  logits, before any resize; for HRDA the fused ones), the mixture m = clamp((p + q) / 2, 1e-7, 1),
  loss = (KL(p || m) + KL(q || m)) / 2 with ``F.kl_div(log m, p, reduction="batchmean")``, i.e. the
  sum over classes and pixels divided by the number of pixels (all samples); no temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StyleHallucination", "attach_style_hallucination", "get_style_hallucination", "stage1_features",
           "stage1_statistics", "farthest_point_sample", "style_consistency_loss"]


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
