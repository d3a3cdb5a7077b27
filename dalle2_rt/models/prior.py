"""The diffusion prior of unCLIP (Ramesh et al. 2022, Sec. 2.2): text -> CLIP image embedding.

A decoder-only transformer with a causal mask over the sequence
    [text token encodings (L), text embedding, timestep embedding, noised image embedding, query]
whose query output predicts the clean (x0) image embedding. The embedding lives in a normalised space:
unit-norm CLIP embedding × √D (``embed_scale``), so each dimension has roughly unit variance.

Because the mask is causal, the first L + 1 positions (the text, or the learned nulls) never see the
timestep or x_t: their keys and values in every layer are the same at every sampling step and for every
candidate of a prompt. ``prefix`` computes them once (a key/value cache) and ``step`` runs only the last
three positions against it; ``step(x_t, t, *prefix(...))`` equals ``forward`` (exported as the graphs
``prior_prefix`` and ``prior_step``, see ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.schedules import SCHEDULES
from .config_dict import MAX_CONTEXT, MAX_DEPTH, MAX_HEADS, MAX_TIMESTEPS, MAX_WIDTH, bounded
from .layers import TimestepMLP, attention, keep_or_null, merge_heads, split_heads


@dataclass
class PriorConfig:
    embed_dim: int = bounded(128, 1, MAX_WIDTH)  # CLIP embedding size D
    text_width: int = bounded(128, 1, MAX_WIDTH)  # CLIP text transformer width (per-token encodings)
    context_length: int = bounded(77, 2, MAX_CONTEXT)
    dim: int = bounded(256, 1, MAX_WIDTH)
    depth: int = bounded(4, 1, MAX_DEPTH)
    heads: int = bounded(4, 1, MAX_HEADS)
    mlp_ratio: float = bounded(4.0, 0.125, 16.0)
    num_timesteps: int = bounded(1000, 2, MAX_TIMESTEPS)
    schedule: str = bounded("cosine", choices=SCHEDULES)

    @property
    def embed_scale(self) -> float:
        return float(self.embed_dim) ** 0.5


class CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple | None = None):
        """x (B, N, d) -> (x', (k, v)), k and v (B, H, N, d_h) of these N positions.

        past: the cached (k, v) of earlier positions, which these N positions also attend to (the mask is
        then (N, N_past + N))."""
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        x = x + self.proj(merge_heads(attention(split_heads(q, self.heads), keys, values, mask)))
        return x + self.mlp(self.norm2(x)), (k, v)


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_tokens_proj = nn.Linear(cfg.text_width, d)
        self.text_embed_proj = nn.Linear(cfg.embed_dim, d)
        self.time_embed = TimestepMLP(d, d)
        self.x_proj = nn.Linear(cfg.embed_dim, d)
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.null_text_tokens = nn.Parameter(torch.randn(cfg.context_length, d) * 0.02)
        self.null_text_embed = nn.Parameter(torch.randn(d) * 0.02)
        seq = cfg.context_length + 4
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([CausalBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.embed_dim)
        causal = torch.full((seq, seq), -1e4).triu(1)  # additive mask; -1e4 stays finite in fp16
        self.register_buffer("causal_mask", causal, persistent=False)

    @property
    def prefix_length(self) -> int:
        """Positions that see only the text: L token encodings + the text embedding."""
        return self.cfg.context_length + 1

    def _text_seq(self, text_embed, text_encodings, cond_keep):
        tokens = keep_or_null(self.text_tokens_proj(text_encodings), self.null_text_tokens, cond_keep)  # (B,L,d)
        temb = keep_or_null(self.text_embed_proj(text_embed), self.null_text_embed, cond_keep)  # (B,d)
        return torch.cat([tokens, temb[:, None]], dim=1)  # (B, L+1, d)

    def _step_seq(self, x_t, t):
        b = x_t.shape[0]
        return torch.cat([self.time_embed(t)[:, None], self.x_proj(x_t)[:, None], self.query.expand(b, 1, -1)], 1)

    def forward(self, x_t, t, text_embed, text_encodings, cond_keep):
        """x_t (B,D) noised normalised embedding; t (B,); text_embed (B,D); text_encodings (B,L,W);
        cond_keep (B,) 1.0 = use the text, 0.0 = learned null. Returns the x0 prediction (B,D)."""
        seq = torch.cat([self._text_seq(text_embed, text_encodings, cond_keep), self._step_seq(x_t, t)], 1)
        seq = seq + self.pos  # (B, L+4, d)
        for block in self.blocks:
            seq, _ = block(seq, self.causal_mask)
        return self.out(self.norm(seq[:, -1]))

    def prefix(self, text_embed, text_encodings, cond_keep):
        """The key/value cache of the text positions: (keys, values), each (B, depth, H, L+1, d_h)."""
        n = self.prefix_length
        seq = self._text_seq(text_embed, text_encodings, cond_keep) + self.pos[:n]
        keys, values = [], []
        for block in self.blocks:
            seq, (k, v) = block(seq, self.causal_mask[:n, :n])
            keys.append(k)
            values.append(v)
        return torch.stack(keys, 1), torch.stack(values, 1)

    def step(self, x_t, t, keys, values):
        """``forward`` given the text positions' cache from ``prefix``: only the last 3 positions run."""
        n = self.prefix_length
        seq = self._step_seq(x_t, t) + self.pos[n:]  # (B, 3, d)
        for i, block in enumerate(self.blocks):
            seq, _ = block(seq, self.causal_mask[n:, :], past=(keys[:, i], values[:, i]))
        return self.out(self.norm(seq[:, -1]))


class PriorPrefix(nn.Module):
    """Graph ``prior_prefix``: (text_embed, text_encodings, cond_keep) -> (keys, values)."""

    def __init__(self, prior: DiffusionPrior):
        super().__init__()
        self.prior = prior

    def forward(self, text_embed, text_encodings, cond_keep):
        return self.prior.prefix(text_embed, text_encodings, cond_keep)


class PriorStep(nn.Module):
    """Graph ``prior_step``: (x_t, t, keys, values) -> pred, equal to the full prior's pred."""

    def __init__(self, prior: DiffusionPrior):
        super().__init__()
        self.prior = prior

    def forward(self, x_t, t, keys, values):
        return self.prior.step(x_t, t, keys, values)
