"""The patch discriminator and the losses of KL-autoencoder training (CompVis' LPIPSWithDiscriminator
without LPIPS, whose weights are a download).

``PatchDiscriminator`` is the taming-transformers / pix2pix "NLayer" design: 4x4 convs, stride 2 then 1,
LeakyReLU 0.2, one logit per overlapping patch. GroupNorm replaces BatchNorm so that the model does not
depend on the batch split across ranks. The autoencoder's adversarial term is weighted adaptively, as
CompVis does: lambda = |grad of the reconstruction loss| / |grad of the adversarial loss| at the decoder's
last layer, clamped to [0, 1e4], times a user factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3, groups: int = 8):
        super().__init__()
        seq = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = width
        for n in range(1, layers + 1):
            out = width * min(2 ** n, 8)
            seq += [nn.Conv2d(ch, out, 4, stride=2 if n < layers else 1, padding=1, bias=False),
                    nn.GroupNorm(min(groups, out), out), nn.LeakyReLU(0.2, True)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over the latent and averaged over the batch (CompVis)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|d rec / d W| / (|d g / d W| + 1e-4) at the decoder's last weight W, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
