"""Super-resolution U-Net (Ramesh et al. 2022, Sec. 2.1; noise augmentation as in Imagen / CDM).

The low-resolution image, noise-augmented to level ``aug_t`` by the caller (training: random level;
sampling: a small fixed one), is upsampled bilinearly inside the graph and concatenated with x_t as
channels; the augmentation level is embedded and added to the timestep embedding. No text, no CLIP
embedding. The output is the prediction ``parameterization`` names: eps by default, v for the bundled model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.parameterization import KINDS
from ..runtime.schedules import SCHEDULES
from .config_dict import MAX_SIDE, MAX_TIMESTEPS, bounded
from .layers import TimestepMLP
from .unet import UNet, UNetConfig


def _sr_unet() -> UNetConfig:
    return UNetConfig(in_channels=6, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_levels=(),
                      emb_dim=128, context_dim=None, groups=8)


@dataclass
class SRConfig:
    image_size: int = bounded(64, 1, MAX_SIDE)
    low_res_size: int = bounded(32, 1, MAX_SIDE)
    unet: UNetConfig = field(default_factory=_sr_unet)
    num_timesteps: int = bounded(1000, 2, MAX_TIMESTEPS)
    schedule: str = bounded("cosine", choices=SCHEDULES)
    parameterization: str = bounded("eps", choices=KINDS)
    sample_aug_t: int = bounded(100, 0, MAX_TIMESTEPS - 1)  # fixed augmentation level used at sampling time


class SuperRes(nn.Module):
    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.unet.emb_dim
        self.time_embed = TimestepMLP(e, e)
        self.aug_embed = TimestepMLP(e, e)
        self.unet = UNet(cfg.unet)

    def forward(self, x_t, t, low_res, aug_t):
        """x_t (B,3,S,S); t (B,); low_res (B,3,s,s) in [-1,1], already noise-augmented; aug_t (B,)."""
        up = F.interpolate(low_res, size=(self.cfg.image_size, self.cfg.image_size), mode="bilinear",
                           align_corners=False)
        emb = self.time_embed(t) + self.aug_embed(aug_t)
        return self.unet(torch.cat([x_t, up], dim=1), emb)
