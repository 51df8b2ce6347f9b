"""The CLIP ViT-L/14 text transformer of SD-1.x, with HF ``CLIPTextModel`` names.

Those are the names stored under ``cond_stage_model.transformer.`` in CompVis files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.attention import attention
from ldm.config import CLIPTextConfig
from ldm.layers import may_overwrite, residual


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=True)  # CLIP's text tower is causal
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        x = self.fc1(x)
        if self.act != "quick_gelu":
            return self.fc2(F.gelu(x))
        g = 1.702 * x  # quick-GELU (OpenAI CLIP): x * sigmoid(1.702 x)
        g = g.sigmoid_().mul_(x) if may_overwrite(g) else x * torch.sigmoid(g)  # in place: one MLP-wide buffer fewer
        return self.fc2(g)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = residual(x, self.self_attn(self.layer_norm1(x)))
        return residual(x, self.mlp(self.layer_norm2(x)))


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class _TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids (B, N<=77) -> hidden states (B, N, width).

    `skip=0` returns the last layer's output after the final LayerNorm (SD-1.x's context);
    `skip=1` the penultimate layer's output ("clip skip 2"), also through the final LayerNorm
    as SD-2 and diffusers do; `final_norm=False` returns the raw hidden state instead.
    """

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.text_model = _TextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor, skip: int = 0, final_norm: bool = True) -> torch.Tensor:
        cfg, tm = self.cfg, self.text_model
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_length:
            raise ValueError(f"expected token ids (B, N<={cfg.max_length}), got {tuple(input_ids.shape)}")
        if not 0 <= skip < cfg.layers:
            raise ValueError(f"skip must be in [0, {cfg.layers}), got {skip}")
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers[: cfg.layers - skip]:
            x = layer(x)
        return tm.final_layer_norm(x) if final_norm else x
