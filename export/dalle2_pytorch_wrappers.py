"""torch modules that give DALLE2-pytorch 1.15.x networks our graph I/O (ARCHITECTURE.md, "Graph I/O").

Each wrapper's ``forward`` takes the graph's input names as keywords and calls the DALLE2-pytorch module as its
own sampling loops do (``DiffusionPrior.p_sample_loop``, ``Decoder.sample``); the runtime then sees the same
contract as for our models:

- text_encoder: open_clip's ``encode_text`` → (l2norm(text_embed), ln_final's output with every position after
  the eot and every pad token set to 0): ``OpenClipAdapter.embed_text``. The zeros matter: DALLE2-pytorch's
  networks recover the text mask as ``any(text_encodings != 0)``.
- prior: ``DiffusionPriorNetwork(x_t, t, text_embed=, text_encodings=)``; ``cond_keep`` (B,) 1/0 selects per row
  between the conditional call and the one ``forward_with_cond_scale`` makes for its unconditional half
  (text and image drop probability 1: learned null text encodings, null text embedding, null image embedding).
- decoder (the first ``Unet``): ``Unet(x_t, t, image_embed=, text_encodings=)``; ``image_keep`` / ``text_keep``
  select the null image tokens / hiddens and the null text tokens per row.
- upsampler (a later ``Unet``): ``Unet(x_t, t, lowres_cond_img=nearest(low_res))``: ``Decoder.sample`` resizes the
  previous unet's image to this unet's size (nearest, clamped to the image range) before its loop; that resize
  is folded into the graph, so the runtime passes ``low_res`` at the previous size.

Conditioning dropout. DALLE2-pytorch draws its keep masks inside ``forward`` with ``prob_mask_like(shape,
1 - drop_prob)``, which is all-ones or all-zeros at the probabilities its samplers use. ``keep_masks`` makes
those calls return the graph's ``*_keep`` inputs instead (in the order the network asks for them: the prior
text then image, the Unet image then text), so one traced graph holds both halves of guidance as row-wise
``where`` and nothing random is traced.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def keep_masks(*masks: torch.Tensor):
    """While active, DALLE2-pytorch's ``prob_mask_like`` returns ``masks`` (bool (B,)) in call order."""
    import dalle2_pytorch.dalle2_pytorch as d2

    queue = list(masks)
    original = d2.prob_mask_like

    def given(shape, prob, device):
        if not queue:
            raise RuntimeError("the network drew more conditioning masks than the graph supplies")
        return queue.pop(0)

    d2.prob_mask_like = given
    try:
        yield
    finally:
        d2.prob_mask_like = original


class TextEncoderGraph(nn.Module):
    """tokens int64 (B, L) -> text_embed (B, D) (unit), text_encodings (B, L, W) (0 after the eot and on pads)."""

    EOT = 49407  # OpenClipAdapter.eos_id

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self._seen: list[torch.Tensor] = []
        clip.ln_final.register_forward_hook(lambda _m, _i, out: self._seen.append(out))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen.clear()
        embed = self.clip.encode_text(tokens)
        encodings = self._seen.pop()  # (B, L, W): ln_final of every position
        before_eot = torch.cumsum((tokens == self.EOT).to(torch.int64), dim=-1) == 0
        mask = F.pad(before_eot, (1, -1), value=True) & (tokens != 0)  # up to and including the eot
        return F.normalize(embed.float(), dim=-1), encodings.float().masked_fill(~mask[..., None], 0.0)


class PriorGraph(nn.Module):
    """x_t (B, D), t (B,), text_embed (B, D), [text_encodings (B, L, W)], cond_keep (B,) -> pred (B, D)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.discrete_time = not net.continuous_embedded_time  # nn.Embedding over the training steps
        for m in net.modules():
            # rotary_embedding_torch's RotaryEmbedding (shared by every layer of its CausalTransformer) memoises
            # its frequencies by writing into a buffer inside forward; from the second layer on the trace reads
            # that mutated buffer and torch.export cannot functionalise it (prior depth >= 2 failed to export).
            # The frequencies are recomputed instead: the same values, nothing written.
            if hasattr(m, "cache_if_possible"):
                m.cache_if_possible = False

    def forward(self, x_t, t, text_embed, cond_keep, text_encodings=None):
        keep = cond_keep > 0.5
        t = t.long() if self.discrete_time else t
        cond = {"text_embed": text_embed}
        if text_encodings is not None:
            cond["text_encodings"] = text_encodings
        with keep_masks(keep, keep):  # text, then image (DiffusionPriorNetwork.forward)
            return self.net(x_t, t, **cond)


class DecoderGraph(nn.Module):
    """x_t (B, C, s, s), t (B,), image_embed (B, D), [text_encodings (B, L, W)], image_keep (B,), text_keep (B,)
    -> pred (B, C or 2C, s, s) (2C: the prediction and the learned-variance interpolation v)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, image_embed, image_keep, text_keep, text_encodings=None):
        with keep_masks(image_keep > 0.5, text_keep > 0.5):  # image, then text (Unet.forward)
            return self.unet(x_t, t, image_embed=image_embed, text_encodings=text_encodings)


class UpsamplerGraph(nn.Module):
    """x_t (B, C, S, S), t (B,), low_res (B, C, s, s) in [-1, 1] -> pred (B, C or 2C, S, S)."""

    def __init__(self, unet: nn.Module, size: int):
        super().__init__()
        self.unet, self.size = unet, int(size)

    def forward(self, x_t, t, low_res):
        # Decoder.sample: resize_image_to(img, size, clamp_range=input range, nearest=True); the runtime has
        # clamped low_res to [-1, 1] already, and nearest upsampling keeps that range.
        up = F.interpolate(low_res, self.size, mode="nearest")
        ones = torch.ones(x_t.shape[0], dtype=torch.bool, device=x_t.device)
        with keep_masks(ones, ones):  # an upsampler is conditioned on neither: the masks are unused
            return self.unet(x_t, t, image_embed=None, lowres_cond_img=up)
