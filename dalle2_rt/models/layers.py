"""Building blocks shared by the prior and the U-Nets: timestep embedding and attention.

Attention is written with explicit matmuls (no fused kernel) so that the exported ONNX graph is plain
MatMul/Softmax that every backend, TensorRT included, handles; the softmax runs in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    """Sinusoidal features -> MLP (the timestep embedding of DDPM/GLIDE)."""

    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.net = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(timestep_embedding(t, self.freq_dim))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v over (B, H, N, d) tensors; the mask is additive (0 or -inf-like)."""
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Nq, Nk)
    if mask is not None:
        logits = logits + mask
    return torch.matmul(F.softmax(logits.float(), dim=-1).to(v.dtype), v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) -> (B, H, N, d)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def keep_or_null(value: torch.Tensor, null: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Conditioning dropout as arithmetic: keep (B,) of 1.0/0.0 picks ``value`` or the learned ``null``.

    Used for training dropout (a mask drawn by the caller) and for the unconditional half of
    classifier-free guidance; nothing random happens inside ``forward``.
    """
    keep = keep.to(value.dtype).reshape(-1, *([1] * (value.dim() - 1)))
    return keep * value + (1.0 - keep) * null.to(value.dtype)
