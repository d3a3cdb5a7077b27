"""CLIP via open_clip, built from a config dict (no hub names, no downloads).

``ClipConfig`` is our dataclass; ``open_clip_cfg()`` turns it into open_clip's model-config dict, and
``build_clip`` builds ``open_clip.CLIP`` from it. The two wrappers below are what gets exported:
``ClipTextEncoder`` returns both the pooled, projected, L2-normalised text embedding and the per-token
encodings (the transformer output after ``ln_final``) that the prior and the decoder attend to;
``ClipImageEncoder`` applies CLIP's mean/std to pixels in [0, 1] and returns the normalised image embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn


@dataclass
class ClipConfig:
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_layers: int = 4
    vision_width: int = 128
    vision_head_width: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    text_layers: int = 4
    text_width: int = 128
    text_heads: int = 4

    @classmethod
    def from_open_clip_cfg(cls, oc: dict) -> ClipConfig:
        """Our config for an open_clip model-config dict (a ViT image tower and the standard text tower)."""
        v, t = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
        unsupported = [k for k in ("timm_model_name", "hf_model_name") if v.get(k) or t.get(k)]
        if isinstance(v.get("layers"), (list, tuple)):
            unsupported.append("vision_cfg.layers as a list (a ResNet tower)")
        if unsupported:
            raise ValueError(f"unsupported open_clip config: {', '.join(unsupported)}; only ViT towers are")
        d = cls()
        return cls(embed_dim=oc["embed_dim"], image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                   vision_layers=v.get("layers", 12), vision_width=v.get("width", 768),
                   vision_head_width=v.get("head_width", 64), context_length=t.get("context_length", 77),
                   vocab_size=t.get("vocab_size", d.vocab_size), text_layers=t.get("layers", 12),
                   text_width=t.get("width", 512), text_heads=t.get("heads", 8))

    def open_clip_cfg(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


def build_clip(cfg: ClipConfig | dict) -> open_clip.CLIP:
    """An untrained open_clip CLIP from our dataclass or from an open_clip model-config dict."""
    oc = cfg.open_clip_cfg() if isinstance(cfg, ClipConfig) else cfg
    return open_clip.CLIP(**oc)


def load_open_clip_checkpoint(path: str, model_cfg: dict) -> tuple[open_clip.CLIP, ClipConfig]:
    """Load a user's own open_clip checkpoint file (a state dict, optionally under "state_dict", as
    open_clip's training saves it) built from its model-config dict. ``weights_only`` loading: no code runs."""
    cfg = ClipConfig.from_open_clip_cfg(model_cfg)
    model = build_clip(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model, cfg


class ClipTextEncoder(nn.Module):
    """tokens (B, L) int64 -> text_embed (B, D) unit norm, text_encodings (B, L, W)."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.clip
        x = c.token_embedding(tokens) + c.positional_embedding
        x = c.transformer(x, attn_mask=c.attn_mask)
        enc = c.ln_final(x)  # (B, L, W)
        pooled = enc[torch.arange(enc.shape[0]), tokens.argmax(dim=-1)]  # the <end_of_text> token (highest id)
        proj = c.text_projection
        emb = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return F.normalize(emb, dim=-1), enc


class ClipImageEncoder(nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> image_embed (B, D) unit norm."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image((pixels - self.mean) / self.std), dim=-1)
