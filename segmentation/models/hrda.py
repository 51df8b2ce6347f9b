"""HRDA: context-aware high-resolution semantic segmentation (Hoyer et al., ECCV 2022), the
source-supervised segmentor (its multi-resolution training and inference; no UDA teacher).

Behaviour of the official ``HRDAEncoderDecoder`` + ``HRDAHead`` (lhoyer/HRDA), as configured in
DGInStyle exp 61 (scales [1, 0.5], detail crop 512, hr loss 0.1, class-wise attention,
feature_scale 0.5, crop_coord_divisible 8, hr slide inference):

Training on a crop x (B, 3, H, W) with labels y (B, H, W):
  - context: x bilinearly resized by the context scale s (0.5) -> backbone -> ``head`` gives the
    context logits (B, C, sH/4, sW/4), ``scale_attention`` (the same kind of head; for DAFormer a
    1x1 ConvModule fusion instead of the ASPP, width ``attention_embed_dim``) gives per-class
    attention logits -> sigmoid;
  - detail: one box per batch, ``hr_crop_size`` at full resolution, offsets drawn uniformly from
    multiples of ``crop_coord_divisible`` in [0, (H - h + 1) // d) * d (the official bound, which
    never reaches the last multiple) -> backbone -> ``head`` gives detail logits (B, C, h/4, w/4);
  - the attention is zeroed outside the box at the context resolution (box / (4 / s)); the context
    logits are weighted by (1 - att) there, then both are upsampled by 1 / s to the output grid
    (H/4, W/4); the detail logits are placed at box / 4 into zeros; fused = att * placed detail +
    up((1 - att) * context);
  - loss = (1 - hr_w - lr_w) * CE(fused) + hr_w * CE(detail, y cropped to the box)
    [+ lr_w * CE((1 - att) * context, y)]; logits are resized bilinearly to the label size (mmseg's
    ``losses``), labels are never resized. With hr_w 0.1: 0.9 * fused CE + 0.1 * detail CE.
Inference on an image x: the context pass on the whole resized image; the detail pass by sliding
``hr_crop_size`` windows with stride half the window (``hr_slide_overlapping``) over x, all windows
in one batch, their logits averaged on the output grid; the (unmasked) attention fuses them as
above; the result is resized to x's size. ``segmentation.evaluate`` slides this over larger test
images (exp 61: 1024 windows, stride 512, at test scale 2048x1024) like any segmentor.

Parameter names follow HRDA's checkpoints: ``backbone.*`` (the plain segmentor's, so ImageNet
MiT weights load as before), ``decode_head.head.*`` and ``decode_head.scale_attention.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .segmentor import (IGNORE_INDEX, PRESETS, Segmentor, SegmentorConfig, build_backbone, build_head,
                        pixel_cross_entropy)

Box = tuple[int, int, int, int]  # y1, y2, x1, x2


def get_crop_box(h: int, w: int, crop: tuple[int, int], divisible: int = 1,
                 generator: torch.Generator | None = None) -> Box:
    """A random ``crop`` box (y1, y2, x1, x2) inside an h x w image, offsets multiples of
    ``divisible`` drawn as HRDA's ``get_crop_bbox`` (uniform over [0, (margin + 1) // divisible)
    times ``divisible``; height first). Uses ``generator`` or torch's global CPU RNG. Where
    HRDA's draw would be empty (a margin below ``divisible`` - 1) the offset is 0."""
    ch, cw = crop
    if (h, w) == (ch, cw):
        return 0, h, 0, w
    nh = max((max(h - ch, 0) + 1) // divisible, 1)
    nw = max((max(w - cw, 0) + 1) // divisible, 1)
    y1 = int(torch.randint(nh, (), generator=generator)) * divisible
    x1 = int(torch.randint(nw, (), generator=generator)) * divisible
    return y1, y1 + ch, x1, x1 + cw


def scale_box(box: Box, scale: float) -> Box:
    """HRDA's ``scale_box``: every coordinate divided by ``scale`` and truncated."""
    return tuple(int(v / scale) for v in box)  # type: ignore[return-value]


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def slide_boxes(h: int, w: int, crop_size: tuple[int, int], stride: tuple[int, int]) -> list[Box]:
    """The windows of HRDA's ``extract_slide_feat`` (row-major; the last ones aligned to the edge)."""
    (ch, cw), (sh, sw) = crop_size, stride
    boxes = []
    for i in range(max(h - ch + sh - 1, 0) // sh + 1):
        for j in range(max(w - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


class HRDAHead(nn.Module):
    """The shared segmentation ``head`` and the ``scale_attention`` head, and their fusion."""

    out_stride = 4  # every head here predicts at 1/4 of its input (HRDA's ``os`` for DAFormer)

    def __init__(self, cfg: SegmentorConfig, in_channels):
        super().__init__()
        h = cfg.hrda
        self.head = build_head(cfg, in_channels)
        if h.fixed_attention is None:
            self.scale_attention = build_head(cfg, in_channels, width=h.attention_embed_dim, attention=True,
                                              num_classes=cfg.num_classes if h.attention_classwise else 1)
        else:
            self.scale_attention = None
        self.fixed_attention = h.fixed_attention
        self.lr_scale, self.hr_scale = sorted(h.scales)

    def attention(self, lr_feats) -> torch.Tensor | float:
        if self.scale_attention is None:
            return self.fixed_attention
        return torch.sigmoid(self.scale_attention(lr_feats))

    def fuse(self, lr_seg: torch.Tensor, hr_seg: torch.Tensor, att: torch.Tensor | float,
             box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """(fused logits on the output grid, (1 - att) * context logits, the attention used).

        ``box``: the training detail crop in input pixels; the attention is zeroed outside it
        (at the context resolution) and the detail logits are placed there. Without a box the
        detail logits cover the whole output grid."""
        if box is not None:
            mask = lr_seg.new_zeros((lr_seg.shape[0], 1, *lr_seg.shape[2:]))
            y1, y2, x1, x2 = scale_box(box, self.out_stride / self.lr_scale)
            mask[:, :, y1:y2, x1:x2] = 1
            att = att * mask
        lr_seg = (1 - att) * lr_seg
        up_lr = _resize(lr_seg, self.hr_scale / self.lr_scale)
        att_up = _resize(att, self.hr_scale / self.lr_scale) if torch.is_tensor(att) else att
        if box is not None:
            placed = torch.zeros_like(up_lr)
            y1, y2, x1, x2 = scale_box(box, self.out_stride)
            if placed[:, :, y1:y2, x1:x2].shape != hr_seg.shape:
                raise ValueError(f"detail logits {tuple(hr_seg.shape[-2:])} do not fit the crop box {box} on the "
                                 f"{tuple(up_lr.shape[-2:])} output grid: the crop size and the input size must be "
                                 f"multiples of {int(self.out_stride / self.lr_scale)}")
            placed[:, :, y1:y2, x1:x2] = hr_seg
        elif hr_seg.shape[-2:] != up_lr.shape[-2:]:
            # only for input sizes that are not multiples of out_stride / lr_scale, where the two
            # grids differ by a row or column (HRDA assumes they never do)
            placed = F.interpolate(hr_seg, size=up_lr.shape[-2:], mode="bilinear", align_corners=False)
        else:
            placed = hr_seg
        return att_up * placed + up_lr, lr_seg, att

    def forward(self, lr_feats, hr_seg: torch.Tensor) -> torch.Tensor:
        """Inference fusion of context features and (already decoded) detail logits."""
        lr_seg = self.head(lr_feats)
        return self.fuse(lr_seg, hr_seg, self.attention(lr_feats))[0]


class HRDASegmentor(Segmentor):
    """``backbone`` + ``decode_head`` (an ``HRDAHead``), configured by ``cfg.hrda``.

    ``forward(x)``: inference logits at x's size; ``forward(x, label)`` / ``forward_train``: the
    training losses; ``extract_feat(x)``: backbone features of x resized to ``feature_scale`` (what
    HRDA's ``extract_feat`` gives a frozen ImageNet copy for the feature distance)."""

    def __init__(self, cfg: SegmentorConfig | str = "hrda_daformer_mitb5"):
        nn.Module.__init__(self)
        if isinstance(cfg, str):
            cfg = PRESETS[cfg]
        if cfg.hrda is None:
            raise ValueError("HRDASegmentor needs a config with hrda set")
        if max(cfg.hrda.scales) != 1:
            raise ValueError(f"the detail scale must be 1 (HRDA crops and labels at full resolution), "
                             f"got scales {cfg.hrda.scales}")
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.decode_head = HRDAHead(cfg, self.backbone.out_channels)
        self.lr_scale, self.hr_scale = sorted(cfg.hrda.scales)

    @property
    def default_window(self) -> tuple[int, int]:
        return self.cfg.hrda.test_crop, self.cfg.hrda.test_stride

    # -- inference -------------------------------------------------------------------------
    def detail_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Detail logits on x's output grid: by sliding windows (all in one batch, averaged where
        they overlap) when ``hr_slide_inference``, else in one pass."""
        h = self.cfg.hrda
        if not h.hr_slide_inference:
            return self.decode_head.head(self.backbone(x))
        win = h.hr_crop_size
        stride = tuple(c // 2 for c in win) if h.hr_slide_overlapping else win
        b = x.shape[0]
        boxes = slide_boxes(*x.shape[-2:], win, stride)
        logits = self.decode_head.head(self.backbone(torch.cat([crop(x, bx) for bx in boxes])))
        os_ = self.decode_head.out_stride
        starts = [scale_box(bx, os_)[::2] for bx in boxes]
        lh, lw = logits.shape[-2:]
        size = (max(y for y, _ in starts) + lh, max(x_ for _, x_ in starts) + lw)
        out = logits.new_zeros((b, logits.shape[1], *size))
        count = logits.new_zeros((1, 1, *size))
        for k, (y, x_) in enumerate(starts):
            out[:, :, y:y + lh, x_:x_ + lw] += logits[k * b:(k + 1) * b]
            count[:, :, y:y + lh, x_:x_ + lw] += 1
        return out / count

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, **kwargs):
        if label is not None:
            return self.forward_train(x, label, **kwargs)
        lr_feats = self.backbone(_resize(x, self.lr_scale))
        hr_seg = self.detail_logits(_resize(x, self.hr_scale))
        fused = self.decode_head(lr_feats, hr_seg)
        return F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)

    # -- training --------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      generator: torch.Generator | None = None, seg_weight: torch.Tensor | None = None) -> dict:
        """Losses of one HRDA training step on crops ``x`` (B, 3, H, W) with labels (B, H, W) and,
        optionally, per-pixel loss weights ``seg_weight`` (B, H, W; cropped with the labels for the
        detail loss).

        Returns ``loss`` (the weighted total), ``loss_fused``, ``loss_hr`` (and ``loss_lr`` when
        its weight is > 0) unweighted, ``logits`` (fused, output grid), ``hr_logits``,
        ``lr_logits`` ((1 - att) * context), ``head_logits`` (= ``logits``), ``attention`` (masked, context grid), ``crop_box``
        (the detail box in input pixels, or None) and ``features`` (the backbone features of the
        ``feature_scale`` input: the context by default)."""
        h = self.cfg.hrda
        lr_feats = self.backbone(_resize(x, self.lr_scale))
        hr_img, box = _resize(x, self.hr_scale), None
        if h.hr_crop_size is not None:
            if hr_img.shape[-2] < h.hr_crop_size[0] or hr_img.shape[-1] < h.hr_crop_size[1]:
                raise ValueError(f"training input {tuple(hr_img.shape[-2:])} is smaller than the detail crop "
                                 f"{h.hr_crop_size}")
            box = get_crop_box(*hr_img.shape[-2:], h.hr_crop_size, h.crop_coord_divisible, generator)
            hr_img = crop(hr_img, box)
        hr_feats = self.backbone(hr_img)

        head = self.decode_head
        lr_seg = head.head(lr_feats)
        hr_seg = head.head(hr_feats)
        fused, lr_weighted, att = head.fuse(lr_seg, hr_seg, head.attention(lr_feats), box)

        def ce(logits, target, weight):
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            return pixel_cross_entropy(logits, target, ignore_index, weight)

        out = {"logits": fused, "head_logits": fused, "hr_logits": hr_seg, "lr_logits": lr_weighted, "attention": att, "crop_box": box,
               "features": lr_feats if h.feature_scale == self.lr_scale else hr_feats}
        out["loss_fused"] = ce(fused, label, seg_weight)
        loss = (1 - h.hr_loss_weight - h.lr_loss_weight) * out["loss_fused"]
        if h.lr_loss_weight > 0:
            out["loss_lr"] = ce(lr_weighted, label, seg_weight)
            loss = loss + h.lr_loss_weight * out["loss_lr"]
        if h.hr_loss_weight > 0:
            hr_label, hr_weight = label, seg_weight
            if box is not None:
                hr_label = crop(label, box)
                hr_weight = None if seg_weight is None else crop(seg_weight, box)
            out["loss_hr"] = ce(hr_seg, hr_label, hr_weight)
            loss = loss + h.hr_loss_weight * out["loss_hr"]
        out["loss"] = loss
        return out

    def feature_input(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(x, self.cfg.hrda.feature_scale)
