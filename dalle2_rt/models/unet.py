"""A GLIDE-style U-Net (Nichol et al. 2021; Dhariwal & Nichol 2021) shared by the decoder and the upsampler.

Residual blocks take a conditioning embedding (timestep [+ CLIP image embedding / augmentation level]) as a
scale-shift of the second GroupNorm. Attention blocks attend over the feature map and, when a context is
given, over the context tokens too (concatenated to the keys/values, as GLIDE does for text).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import MAX_HEADS, MAX_WIDTH, bounded
from .layers import attention, merge_heads, split_heads

MAX_LEVELS = 8  # resolutions of a U-Net: 2048 pixels halved 7 times is 16


@dataclass
class UNetConfig:
    in_channels: int = bounded(3, 1, 64)
    out_channels: int = bounded(3, 1, 64)
    channels: int = bounded(64, 1, MAX_WIDTH // 2)  # at the first level; level i has channels · channel_mults[i]
    channel_mults: tuple[int, ...] = bounded((1, 2, 2), 1, 16, length=(1, MAX_LEVELS))
    num_res_blocks: int = bounded(2, 1, 16)
    attention_levels: tuple[int, ...] = bounded((1, 2), 0, MAX_LEVELS - 1, length=(0, MAX_LEVELS))  # into channel_mults
    heads: int = bounded(4, 1, MAX_HEADS)
    emb_dim: int = bounded(256, 1, MAX_WIDTH)
    context_dim: int | None = bounded(None, 1, MAX_WIDTH)  # width of the context tokens; None = no context
    groups: int = bounded(16, 1, 1024)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions; context tokens (B, N, C_ctx) join the keys and values."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int | None):
        super().__init__()
        self.heads = heads
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.ctx_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww)).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.ctx_kv is not None and context is not None:
            ck, cv = self.ctx_kv(context).chunk(2, dim=-1)  # (B, N, C) each
            k = torch.cat([ck, k], dim=1)
            v = torch.cat([cv, v], dim=1)
        h = merge_heads(attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)))
        return x + self.proj(h.transpose(1, 2)).reshape(b, c, hh, ww)


class UNet(nn.Module):
    """x (B, C_in, H, W), emb (B, emb_dim), context (B, N, C_ctx) or None -> (B, C_out, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = [cfg.channels * m for m in cfg.channel_mults]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for level, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._stage(cur, c, level))
                cur = c
                skips.append(cur)
            if level < len(ch) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([
            ResBlock(cur, cur, cfg.emb_dim, cfg.groups),
            AttentionBlock(cur, cfg.heads, cfg.groups, cfg.context_dim),
            ResBlock(cur, cur, cfg.emb_dim, cfg.groups),
        ])
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(self._stage(cur + skips.pop(), ch[level], level))
                cur = ch[level]
                if level > 0 and i == cfg.num_res_blocks:
                    self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    self.up.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.norm_out = norm(cur, cfg.groups)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _stage(self, cin: int, cout: int, level: int) -> nn.ModuleList:
        layers = [ResBlock(cin, cout, self.cfg.emb_dim, self.cfg.groups)]
        if level in self.cfg.attention_levels:
            layers.append(AttentionBlock(cout, self.cfg.heads, self.cfg.groups, self.cfg.context_dim))
        return nn.ModuleList(layers)

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if isinstance(layer, nn.ModuleList):
            for sub in layer:
                h = sub(h, emb) if isinstance(sub, ResBlock) else sub(h, context)
            return h
        return layer(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                in_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``in_bias`` (B, channels·mults[0], H, W), if given, is added to the input convolution's output."""
        h = self.conv_in(x)
        if in_bias is not None:
            h = h + in_bias
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h, context)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = self._run(layer, torch.cat([h, hs.pop()], dim=1), emb, context)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
