"""torch modules that give the networks of a diffusers ``UnCLIPPipeline`` our graph I/O (ARCHITECTURE.md).

Each wrapper's ``forward`` takes the graph's input names as keywords and calls the diffusers / transformers
module exactly as ``UnCLIPPipeline.__call__`` does (diffusers 0.42, ``pipelines/deprecated/unclip``); what
the pipeline computes between calls and that depends only on the graph's inputs is folded in here, so the
runtime sees the same contract as for our own models:

- text_encoder: ``CLIPTextModelWithProjection(tokens)`` -> (text_embeds, last_hidden_state). Unlike our
  CLIP, ``text_embed`` is the projected embedding *without* L2 normalisation (karlo feeds it as is).
- prior: ``PriorTransformer(x_t, t, proj_embedding=text_embed, encoder_hidden_states=text_encodings,
  attention_mask=text_mask)``; x_t and pred live in the prior's normalised space ((e − mean) / std).
- decoder: ``UnCLIPTextProjModel`` + ``UNet2DConditionModel``. ``image_keep`` = 0 swaps ``image_embed`` for
  the learned classifier-free-guidance embedding (what text_proj does to the unconditional half); the
  4 extra context tokens' mask (always attended) is prepended to ``text_mask``. Output (B, 2C, H, W):
  eps and the learned-range variance interpolation v.
- super-res: ``UNet2DModel(cat([x_t, upscale(low_res)]), t)``. ``upscale`` is the pipeline's
  ``F.interpolate(mode="bicubic", align_corners=False, antialias=True)`` from the decoder's size to the
  SR size, written as two constant matrices (out = R_h · low_res · R_wᵀ), which are read off torch's own
  kernel and checked against it (``resize_matrices``). A MatMul exports and runs on every backend; an
  antialiased cubic Resize (the ``antialias`` attribute of opset 18) is not something every backend
  implements, and computing it per step costs ~S²·s multiply-adds per channel, nothing beside the U-Net.

Masks and keeps are float32 1.0 / 0.0 like every ``*_keep`` input; the wrappers compare with 0.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# What the pipeline's F.interpolate call uses for the super-res conditioning image (non-MPS devices).
SR_RESIZE = {"mode": "bicubic", "align_corners": False, "antialias": True}


class TextEncoderGraph(nn.Module):
    """tokens int64 (B, L) -> text_embed (B, D) (projected, not normalised), text_encodings (B, L, W)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No attention_mask, as in UnCLIPPipeline._encode_prompt: causal attention only, pooled at the eot.
        out = self.text_encoder(input_ids=tokens, return_dict=True)
        return out.text_embeds, out.last_hidden_state


class PriorGraph(nn.Module):
    """x_t (B, D), t (B,), text_embed (B, D), text_encodings (B, L, W), text_mask (B, L) -> pred (B, D)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, x_t, t, text_embed, text_encodings, text_mask) -> torch.Tensor:
        return self.prior(x_t, timestep=t, proj_embedding=text_embed, encoder_hidden_states=text_encodings,
                          attention_mask=text_mask > 0.5, return_dict=False)[0]


class DecoderGraph(nn.Module):
    """text_proj + UNet2DConditionModel.

    x_t (B, C, H, W), t (B,), image_embed (B, D) (un-normalised, as the prior gives it), text_embed (B, D),
    text_encodings (B, L, W), text_mask (B, L), image_keep (B,) -> pred (B, 2C, H, W).
    """

    def __init__(self, text_proj: nn.Module, unet: nn.Module):
        super().__init__()
        self.text_proj, self.unet = text_proj, unet
        self.extra_tokens = int(text_proj.clip_extra_context_tokens)

    def forward(self, x_t, t, image_embed, text_embed, text_encodings, text_mask, image_keep) -> torch.Tensor:
        null = self.text_proj.learned_classifier_free_guidance_embeddings.to(image_embed.dtype)  # (D,)
        image_embed = torch.where(image_keep[:, None] > 0.5, image_embed, null.expand_as(image_embed))
        # do_classifier_free_guidance=False: the null embedding was chosen per row above, not by stacking.
        context, added = self.text_proj(image_embeddings=image_embed, prompt_embeds=text_embed,
                                        text_encoder_hidden_states=text_encodings,
                                        do_classifier_free_guidance=False)  # (B, n + L, X), (B, time_dim)
        ones = torch.ones(text_mask.shape[0], self.extra_tokens, dtype=text_mask.dtype, device=text_mask.device)
        mask = torch.cat([ones, text_mask], dim=1) > 0.5  # the pipeline's F.pad(text_mask, (n, 0), value=True)
        return self.unet(x_t, t, encoder_hidden_states=context, class_labels=added, attention_mask=mask,
                         return_dict=False)[0]


def resize_matrices(low: int, high: int, *, mode: str, align_corners: bool | None,
                    antialias: bool) -> torch.Tensor:
    """R (high, low) float64 with ``F.interpolate(x, (high, high), ...) == R · x · Rᵀ`` on square images.

    Read off torch's kernel by resizing basis images that are constant along the width (every row
    of the kernel's weights sums to 1, so the width pass leaves them constant), then checked on a random
    image: a mode that is not separable this way raises instead of exporting a wrong graph.
    """
    kw = {"mode": mode, "antialias": antialias}
    if mode in ("linear", "bilinear", "bicubic", "trilinear"):
        kw["align_corners"] = align_corners
    basis = torch.eye(low, dtype=torch.float64)[:, None, :, None].expand(low, 1, low, low).contiguous()
    # (low basis images, 1, low, low) -> (low, 1, high, high); column j of R is image j's first column.
    r = F.interpolate(basis, size=(high, high), **kw)[:, 0, :, 0].T.contiguous()  # (high, low)
    x = torch.randn(2, 3, low, low, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, size=(high, high), **kw)
    got = torch.einsum("hi,bcij,wj->bchw", r, x, r)
    err = float((got - want).abs().max())
    if not err < 1e-9:
        raise RuntimeError(f"F.interpolate({kw}) {low}->{high} is not a separable linear map (err {err:.3g})")
    return r


class SuperResGraph(nn.Module):
    """x_t (B, C, S, S), t (B,), low_res (B, C, s, s) in [-1, 1] -> pred (B, C, S, S) (eps)."""

    def __init__(self, unet: nn.Module, low_res_size: int):
        super().__init__()
        self.unet = unet
        size = int(unet.config.sample_size)
        r = resize_matrices(low_res_size, size, **SR_RESIZE).to(torch.float32)
        self.register_buffer("resize", r, persistent=False)  # (S, s)

    def forward(self, x_t, t, low_res) -> torch.Tensor:
        up = torch.matmul(torch.matmul(self.resize, low_res), self.resize.T)  # (B, C, S, S) = R · low · Rᵀ
        return self.unet(torch.cat([x_t, up], dim=1), t, return_dict=False)[0]
