"""Attribute heads: an auxiliary CLIP objective that makes both embeddings carry what the world's captions name.

Why (docs/history.md, 2026-11-29): trained on the contrastive loss alone, shapes-v1's CLIP separated a batch of random
captions by colour and background, so its embeddings carried little shape and no position at all (linear probe on
the image embedding: position 21.5 %, chance 20 %), and the prior and the decoder, which live in that space,
could not draw what the caption says. Here small linear heads read the *normalised* embeddings, during training
only, and are asked for the attributes the world knows exactly:

- image embedding (from the rendered scene, everything known): background; for each of the 8 colours, whether
  an object of that colour is present, its shape, and its box (cx, cy, s) as a regression;
- text embedding (from the caption's spec, only what it names): background (if named), colours present, each
  object's shape, the size word and position word (single object), and each object's relation to the other
  (two objects: A gets the named relation, B its inverse).

Linear heads on the unit-norm embedding ask for *linearly readable* attributes, which is what the prior (an
MSE regressor) and the decoder (a linear projection of the embedding) can use. The heads are not part of the
exported model; they live in the training state only. Items without labels (a user's image folder) contribute
nothing to this loss (their rows are masked out).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalle2_rt.world import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES
from dalle2_rt.world.captions import CaptionSpec
from dalle2_rt.world.palette import INVERSE_RELATION
from dalle2_rt.world.scene import Scene

_COLOURS = tuple(COLOURS)
_BACKGROUNDS = tuple(BACKGROUNDS)
_SIZES = tuple(SIZES)
NC, NS = len(_COLOURS), len(SHAPES)

IGNORE = -100  # F.cross_entropy's ignore_index: "this item does not say"


def image_targets(scenes: list[Scene | None]) -> dict[str, torch.Tensor]:
    """Targets read off the rendered scenes. Rows of ``None`` (no scene) are masked out everywhere."""
    b = len(scenes)
    bg = torch.full((b,), IGNORE, dtype=torch.long)
    present = torch.zeros(b, NC)
    known = torch.zeros(b)  # 1 where the row has a scene
    shape = torch.full((b, NC), IGNORE, dtype=torch.long)
    box = torch.zeros(b, NC, 3)  # (cx, cy, s), fractions of W
    box_mask = torch.zeros(b, NC)
    for i, sc in enumerate(scenes):
        if sc is None:
            continue
        known[i] = 1
        bg[i] = _BACKGROUNDS.index(sc.background)
        for o in sc.objects:
            c = _COLOURS.index(o.colour)
            present[i, c] = 1
            shape[i, c] = SHAPES.index(o.shape)
            box[i, c] = torch.tensor([o.cx, o.cy, o.s])
            box_mask[i, c] = 1
    return {"bg": bg, "present": present, "known": known, "shape": shape, "box": box, "box_mask": box_mask}


def text_targets(specs: list[CaptionSpec | None]) -> dict[str, torch.Tensor]:
    """Targets from what each caption names; an attribute it leaves out is IGNORE."""
    b = len(specs)
    bg = torch.full((b,), IGNORE, dtype=torch.long)
    present = torch.zeros(b, NC)
    known = torch.zeros(b)
    shape = torch.full((b, NC), IGNORE, dtype=torch.long)
    size = torch.full((b, NC), IGNORE, dtype=torch.long)
    position = torch.full((b, NC), IGNORE, dtype=torch.long)
    relation = torch.full((b, NC), IGNORE, dtype=torch.long)
    for i, sp in enumerate(specs):
        if sp is None:
            continue
        known[i] = 1
        if sp.background is not None:
            bg[i] = _BACKGROUNDS.index(sp.background)
        cols = [_COLOURS.index(c) for c in sp.colours]
        for c, s in zip(cols, sp.shapes):
            present[i, c] = 1
            shape[i, c] = SHAPES.index(s)
        if sp.kind == "single":
            if sp.size is not None:
                size[i, cols[0]] = _SIZES.index(sp.size)
            if sp.position is not None:
                position[i, cols[0]] = POSITIONS.index(sp.position)
        else:
            relation[i, cols[0]] = RELATIONS.index(sp.relation)
            relation[i, cols[1]] = RELATIONS.index(INVERSE_RELATION[sp.relation])
    return {"bg": bg, "present": present, "known": known, "shape": shape, "size": size, "position": position,
            "relation": relation}


class AttributeHeads(nn.Module):
    """Linear read-outs of a D-dim embedding, one set for the image tower and one for the text tower."""

    def __init__(self, dim: int):
        super().__init__()
        # The embeddings are unit norm (components ~ 1/√D); read them at √D scale so that the heads' weights
        # are O(1), as for unit-variance inputs.
        self.scale = dim ** 0.5
        n_bg = len(_BACKGROUNDS)
        self.image = nn.ModuleDict({
            "bg": nn.Linear(dim, n_bg), "present": nn.Linear(dim, NC), "shape": nn.Linear(dim, NC * NS),
            "box": nn.Linear(dim, NC * 3),
        })
        self.text = nn.ModuleDict({
            "bg": nn.Linear(dim, n_bg), "present": nn.Linear(dim, NC), "shape": nn.Linear(dim, NC * NS),
            "size": nn.Linear(dim, NC * len(_SIZES)), "position": nn.Linear(dim, NC * len(POSITIONS)),
            "relation": nn.Linear(dim, NC * len(RELATIONS)),
        })

    @staticmethod
    def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled entries (0 when none is labelled)."""
        if not (target != IGNORE).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)

    def _common(self, heads: nn.ModuleDict, emb: torch.Tensor, t: dict) -> dict[str, torch.Tensor]:
        b = emb.shape[0]
        out = {"bg": self._ce(heads["bg"](emb), t["bg"])}
        pres = F.binary_cross_entropy_with_logits(heads["present"](emb).float(), t["present"], reduction="none")
        out["present"] = (pres.mean(1) * t["known"]).sum() / t["known"].sum().clamp(min=1)
        out["shape"] = self._ce(heads["shape"](emb).reshape(b * NC, NS), t["shape"].reshape(-1))
        return out

    def losses(self, image_embed: torch.Tensor, text_embed: torch.Tensor, img_t: dict, txt_t: dict
               ) -> dict[str, torch.Tensor]:
        """Per-attribute losses, keyed ``image.<name>`` / ``text.<name>``. Embeddings are (B, D), unit norm."""
        b = image_embed.shape[0]
        image_embed, text_embed = image_embed * self.scale, text_embed * self.scale
        out = {f"image.{k}": v for k, v in self._common(self.image, image_embed, img_t).items()}
        box = self.image["box"](image_embed).float().reshape(b, NC, 3)
        err = ((box - img_t["box"]) ** 2).sum(-1) * img_t["box_mask"]  # (B, NC)
        # ×10: a box error of 0.1 W (a whole position band) then costs about as much as a wrong class
        out["image.box"] = 10 * err.sum() / img_t["box_mask"].sum().clamp(min=1)
        out.update({f"text.{k}": v for k, v in self._common(self.text, text_embed, txt_t).items()})
        for name, n in (("size", len(_SIZES)), ("position", len(POSITIONS)), ("relation", len(RELATIONS))):
            out[f"text.{name}"] = self._ce(self.text[name](text_embed).reshape(b * NC, n), txt_t[name].reshape(-1))
        return out
