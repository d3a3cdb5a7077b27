"""The unCLIP decoder (Ramesh et al. 2022, Sec. 2.1): a GLIDE U-Net conditioned on the CLIP image embedding.

The image embedding is projected and added to the timestep embedding, and projected into
``num_image_tokens`` extra context tokens concatenated with the projected CLIP text encodings; the U-Net's
attention layers attend over that sequence. Both conditionings can be swapped for learned nulls through
``image_keep`` / ``text_keep`` (training dropout, and the unconditional half of guidance).

``spatial_map = g > 0`` adds a third path (ours, not the paper's): the embedding is projected to a g×g map of the
U-Net's first width, upsampled (nearest) and added to its first feature map, so that where the embedding says a
thing is becomes a bias at that place (shapes-v2: the tokens and the timestep add carried CLIP's position to the
pixels too slowly). It starts at zero, so adding it to a trained decoder changes nothing until it trains.
``spatial_hidden = h > 0`` adds a GELU MLP of width h beside that linear projection (its output summed into the
same map, its last layer zero at the start): a linear map can only turn "the red object is at x" into a ramp
scaled by x, where a hidden layer can place a bump at x, one per object (shapes-v2 drew single objects in the
right place but two-object scenes with the relation right only 28 % of the time, from embeddings whose relation
reads back linearly every time: bench/RESULTS.md G, docs/history.md).

The output is the prediction ``parameterization`` names: eps by default, v for the bundled decoder
(``configs/shapes-v2.toml``), stated again in the exported manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.parameterization import KINDS
from ..runtime.schedules import SCHEDULES
from .config_dict import MAX_CONTEXT, MAX_SIDE, MAX_TIMESTEPS, MAX_WIDTH, bounded
from .layers import TimestepMLP, keep_or_null
from .unet import UNet, UNetConfig


@dataclass
class DecoderConfig:
    image_size: int = bounded(32, 1, MAX_SIDE)
    embed_dim: int = bounded(128, 1, MAX_WIDTH)
    text_width: int = bounded(128, 1, MAX_WIDTH)
    context_length: int = bounded(77, 2, MAX_CONTEXT)
    num_image_tokens: int = bounded(4, 1, 256)
    context_dim: int = bounded(256, 1, MAX_WIDTH)
    unet: UNetConfig = field(default_factory=UNetConfig)
    num_timesteps: int = bounded(1000, 2, MAX_TIMESTEPS)
    schedule: str = bounded("cosine", choices=SCHEDULES)
    parameterization: str = bounded("eps", choices=KINDS)
    # side of the embedding's spatial map added after the U-Net's input conv; 0 = none
    spatial_map: int = bounded(0, 0, 64)
    # width of a GELU MLP beside the map's linear projection; 0 = none (needs spatial_map)
    spatial_hidden: int = bounded(0, 0, MAX_WIDTH)
    # a guidance-distilled decoder (Meng et al. 2023, stage 1): the guidance scale w is an input, embedded and added
    # to the timestep embedding, and one pass predicts what the teacher's guided pair did
    guidance_input: bool = bounded(False)
    # … and the scales [lo, hi] it was trained on (training/distill.py's guidance_range): the runtime refuses others
    guidance_range: tuple[float, ...] | None = bounded(None, 0.0, 100.0, length=(2, 2))


# w in [1, 4] spread over the sinusoids' periods like timesteps 100 … 400 are
GUIDANCE_EMBED_SCALE = 100.0


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
        if cfg.spatial_map:
            if cfg.image_size % cfg.spatial_map:
                raise ValueError(f"spatial_map {cfg.spatial_map} must divide image_size {cfg.image_size}")
            self.image_to_map = nn.Linear(cfg.embed_dim, u.channels * u.channel_mults[0] * cfg.spatial_map ** 2)
            nn.init.zeros_(self.image_to_map.weight)
            nn.init.zeros_(self.image_to_map.bias)
        if cfg.spatial_hidden:
            if not cfg.spatial_map:
                raise ValueError("spatial_hidden needs spatial_map > 0 (the map it adds to)")
            self.map_hidden = nn.Linear(cfg.embed_dim, cfg.spatial_hidden)
            self.map_out = nn.Linear(cfg.spatial_hidden, self.image_to_map.out_features)
            nn.init.zeros_(self.map_out.weight)
            nn.init.zeros_(self.map_out.bias)
        if cfg.guidance_input:
            # zero at the start: a student warm-started from its teacher first predicts the teacher's conditional
            self.guidance_embed = TimestepMLP(u.emb_dim, u.emb_dim)
            nn.init.zeros_(self.guidance_embed.net[-1].weight)
            nn.init.zeros_(self.guidance_embed.net[-1].bias)

    def forward(self, x_t, t, image_embed, text_encodings, image_keep, text_keep, guidance=None):
        """x_t (B,3,S,S); t (B,); image_embed (B,D) unit-norm CLIP embedding; text_encodings (B,L,W);
        image_keep/text_keep (B,) 1.0 or 0.0; guidance (B,) the scale w (``guidance_input`` only).
        Returns the prediction (B,3,S,S) of ``cfg.parameterization`` (the guided one, for a distilled decoder)."""
        img = keep_or_null(image_embed, self.null_image_embed, image_keep)  # (B, D)
        txt = keep_or_null(text_encodings, self.null_text, text_keep)  # (B, L, W)
        emb = self.time_embed(t) + self.image_to_emb(img)
        if self.cfg.guidance_input:
            if guidance is None:
                raise ValueError("a guidance-distilled decoder needs guidance= (the scale w, one per row)")
            emb = emb + self.guidance_embed(guidance * GUIDANCE_EMBED_SCALE)
        b = x_t.shape[0]
        img_tokens = self.image_to_tokens(img).reshape(b, self.cfg.num_image_tokens, self.cfg.context_dim)
        context = self.context_norm(torch.cat([img_tokens, self.text_to_tokens(txt)], dim=1))  # (B, 4+L, C)
        in_bias = None
        if self.cfg.spatial_map:
            g = self.cfg.spatial_map
            cells = self.image_to_map(img)  # (B, C·g·g)
            if self.cfg.spatial_hidden:
                cells = cells + self.map_out(F.gelu(self.map_hidden(img)))
            in_bias = F.interpolate(cells.reshape(b, -1, g, g), scale_factor=self.cfg.image_size // g, mode="nearest")
        return self.unet(x_t, emb, context, in_bias)
