"""The unCLIP decoder (Ramesh et al. 2022, Sec. 2.1): a GLIDE U-Net conditioned on the CLIP image embedding.

The image embedding is projected and added to the timestep embedding, and projected into
``num_image_tokens`` extra context tokens concatenated with the projected CLIP text encodings; the U-Net's
attention layers attend over that sequence. Both conditionings can be swapped for learned nulls through
``image_keep`` / ``text_keep`` (training dropout, and the unconditional half of guidance). The output is the
prediction ``parameterization`` names: eps by default, v for the bundled shapes-v1 decoder
(``configs/shapes-v1.toml``), stated again in the exported manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import TimestepMLP, keep_or_null
from .unet import UNet, UNetConfig


@dataclass
class DecoderConfig:
    image_size: int = 32
    embed_dim: int = 128
    text_width: int = 128
    context_length: int = 77
    num_image_tokens: int = 4
    context_dim: int = 256
    unet: UNetConfig = field(default_factory=UNetConfig)
    num_timesteps: int = 1000
    schedule: str = "cosine"
    parameterization: str = "eps"


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        if u.context_dim != cfg.context_dim:
            u = UNetConfig(**{**u.__dict__, "context_dim": cfg.context_dim})
        self.time_embed = TimestepMLP(u.emb_dim, u.emb_dim)
        self.image_to_emb = nn.Linear(cfg.embed_dim, u.emb_dim)
        self.image_to_tokens = nn.Linear(cfg.embed_dim, cfg.num_image_tokens * cfg.context_dim)
        self.text_to_tokens = nn.Linear(cfg.text_width, cfg.context_dim)
        self.context_norm = nn.LayerNorm(cfg.context_dim)
        self.null_image_embed = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.null_text = nn.Parameter(torch.randn(cfg.context_length, cfg.text_width) * 0.02)
        self.unet = UNet(u)

    def forward(self, x_t, t, image_embed, text_encodings, image_keep, text_keep):
        """x_t (B,3,S,S); t (B,); image_embed (B,D) unit-norm CLIP embedding; text_encodings (B,L,W);
        image_keep/text_keep (B,) 1.0 or 0.0. Returns the prediction (B,3,S,S) of ``cfg.parameterization``."""
        img = keep_or_null(image_embed, self.null_image_embed, image_keep)  # (B, D)
        txt = keep_or_null(text_encodings, self.null_text, text_keep)  # (B, L, W)
        emb = self.time_embed(t) + self.image_to_emb(img)
        b = x_t.shape[0]
        img_tokens = self.image_to_tokens(img).reshape(b, self.cfg.num_image_tokens, self.cfg.context_dim)
        context = self.context_norm(torch.cat([img_tokens, self.text_to_tokens(txt)], dim=1))  # (B, 4+L, C)
        return self.unet(x_t, emb, context)
