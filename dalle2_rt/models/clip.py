"""CLIP via open_clip, built from a config dict (no hub names, no downloads).

``ClipConfig`` is our dataclass; ``open_clip_cfg()`` turns it into open_clip's model-config dict, and
``build_clip`` builds ``open_clip.CLIP`` from it. The two wrappers below are what gets exported:
``ClipTextEncoder`` returns both the pooled, projected, L2-normalised text embedding and the per-token
encodings (the transformer output after ``ln_final``) that the prior and the decoder attend to;
``ClipImageEncoder`` applies CLIP's mean/std to pixels in [0, 1] and returns the normalised image embedding.

The image tower is open_clip's ViT (``vision_tower = "vit"``, what open_clip checkpoints hold) or ours,
``ConvImageTower`` (``"conv"``): a small convolutional tower whose head flattens its (S/16)x(S/16) feature grid
(4x4 at 64x64) instead of pooling it, so where a thing is stays in the embedding. The shapes world needs that: a
ViT of the bundled size, pooled through its class token, learned shape but never position (README "Fidelity by
stage").
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from .config_dict import MAX_CONTEXT, MAX_DEPTH, MAX_HEADS, MAX_SIDE, MAX_WIDTH, bounded, check_config


@dataclass
class ClipConfig:
    embed_dim: int = bounded(128, 1, MAX_WIDTH)
    image_size: int = bounded(64, 1, MAX_SIDE)
    patch_size: int = bounded(8, 1, MAX_SIDE)
    vision_layers: int = bounded(4, 1, MAX_DEPTH)
    vision_width: int = bounded(128, 1, MAX_WIDTH)
    vision_head_width: int = bounded(32, 1, MAX_WIDTH)
    context_length: int = bounded(77, 2, MAX_CONTEXT)  # at least <start_of_text> and <end_of_text>
    vocab_size: int = bounded(49408, 2, 2**20)
    text_layers: int = bounded(4, 1, MAX_DEPTH)
    text_width: int = bounded(128, 1, MAX_WIDTH)
    text_heads: int = bounded(4, 1, MAX_HEADS)
    # vit (open_clip's) | conv (ConvImageTower: keeps the spatial layout)
    vision_tower: str = bounded("vit", choices=("vit", "conv"))
    # conv tower: channels at the first resolution (doubled at each of 3 downsamplings)
    conv_width: int = bounded(32, 1, MAX_WIDTH // 4)
    conv_pooled: bool = bounded(False)  # conv tower: also a pooled (mean, max) "what" path beside the flattened grid

    def __post_init__(self):
        if self.vision_tower not in ("vit", "conv"):
            raise ValueError(f"vision_tower must be 'vit' or 'conv', not {self.vision_tower!r}")
        if self.vision_tower == "conv" and self.image_size % 16:
            raise ValueError(f"the conv tower needs image_size divisible by 16, not {self.image_size}")

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
        cfg = cls(embed_dim=oc["embed_dim"], image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                  vision_layers=v.get("layers", 12), vision_width=v.get("width", 768),
                  vision_head_width=v.get("head_width", 64), context_length=t.get("context_length", 77),
                  vocab_size=t.get("vocab_size", d.vocab_size), text_layers=t.get("layers", 12),
                  text_width=t.get("width", 512), text_heads=t.get("heads", 8))
        check_config(cfg, "open_clip config")  # a foreign file's numbers, before open_clip builds from them
        return cfg

    def open_clip_cfg(self) -> dict:
        """open_clip's model-config dict. With the conv tower its vision_cfg describes the ViT that
        ``build_clip`` builds and then replaces, so it alone does not rebuild this model."""
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


# open_clip's model-config keys and the fields ``ClipConfig.from_open_clip_cfg`` sets from them: an importer that
# takes any open_clip architecture checks a config file's numbers by these fields' bounds (``check_foreign``)
OPEN_CLIP_KEYS = {key: (ClipConfig, name) for key, name in {
    "embed_dim": "embed_dim", "vision_cfg.image_size": "image_size", "vision_cfg.patch_size": "patch_size",
    "vision_cfg.layers": "vision_layers", "vision_cfg.width": "vision_width",
    "vision_cfg.head_width": "vision_head_width", "text_cfg.context_length": "context_length",
    "text_cfg.vocab_size": "vocab_size", "text_cfg.layers": "text_layers", "text_cfg.width": "text_width",
    "text_cfg.heads": "text_heads"}.items()}


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvImageTower(nn.Module):
    """normalised pixels (B, 3, S, S) -> image features (B, D), not normalised (open_clip's ``visual`` contract).

    A stride-2 stem, then a residual block and a stride-2 convolution per level (width, 2 width, 4 width), down to
    an (S/16)x(S/16) grid; the head squeezes the grid to 32 channels, flattens it (each cell keeps its own
    weights: position survives) and maps it through a two-layer MLP to D.

    ``pooled`` adds a "what" path: the grid's mean and max over positions (all 4 width channels, the same
    whichever cell the object lies in) projected into the MLP's hidden layer. Its projection starts at zero, so a
    tower warm-started from one without it computes exactly what it did.
    """

    def __init__(self, image_size: int, width: int, embed_dim: int, pooled: bool = False):
        super().__init__()
        w = width
        self.image_size = image_size
        self.stem = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.levels = nn.Sequential(
            _ResBlock(w), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            _ResBlock(2 * w), nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            _ResBlock(4 * w), nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1),
            _ResBlock(4 * w),
        )
        grid = image_size // 16
        self.squeeze = nn.Sequential(nn.GroupNorm(8, 4 * w), nn.SiLU(), nn.Conv2d(4 * w, 32, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * grid * grid, 512), nn.GELU(), nn.LayerNorm(512),
                                  nn.Linear(512, embed_dim))
        self.what = None
        if pooled:
            self.what = nn.Linear(2 * 4 * w, 512)
            nn.init.zeros_(self.what.weight)
            nn.init.zeros_(self.what.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.levels(self.stem(x))
        if self.what is None:
            return self.head(self.squeeze(f))
        a = self.squeeze[1](self.squeeze[0](f))  # the squeeze's norm and activation
        hidden = self.head[1](self.head[0](self.squeeze[2](a)))
        hidden = hidden + self.what(torch.cat([a.mean(dim=(2, 3)), a.amax(dim=(2, 3))], dim=1))
        return self.head[2:](hidden)


def build_clip(cfg: ClipConfig | dict) -> open_clip.CLIP:
    """An untrained open_clip CLIP from our dataclass or from an open_clip model-config dict; with
    ``vision_tower = "conv"`` its ``visual`` is a ``ConvImageTower``."""
    oc = cfg.open_clip_cfg() if isinstance(cfg, ClipConfig) else cfg
    clip = open_clip.CLIP(**oc)
    if isinstance(cfg, ClipConfig) and cfg.vision_tower == "conv":
        clip.visual = ConvImageTower(cfg.image_size, cfg.conv_width, cfg.embed_dim, cfg.conv_pooled)
    return clip


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
