"""Training-only paraphrases of a spec: the same facts in other words, so the text encoder sees some variety.

A paraphrase names exactly what the spec names (never more, never less), so the image stays a correct
illustration of it. Evaluation and the scorer use canonical captions only.
"""

from __future__ import annotations

import numpy as np

from .captions import CaptionSpec, caption_text
from .palette import INVERSE_RELATION, POSITIONS, article

_PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "a render of ", "")
_BACKGROUND_STYLES = (", {} background", " on a {} background", " with a {} background", ", on {}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _np(words: list[str], with_article: bool) -> str:
    text = " ".join(words)
    return f"{article(words[0])} {text}" if with_article else text


def _single(spec: CaptionSpec, rng: np.random.Generator) -> str:
    colour, shape = spec.colours[0], spec.shapes[0]
    size = [spec.size] if spec.size else []
    style = int(rng.integers(3))
    if style == 0:  # "red circle on the left": no article
        text = _np(size + [colour, shape], with_article=False)
        if spec.position:
            text += f" {spec.position}"
    elif style == 1:  # "a circle, red, large, on the left"
        text = ", ".join([_np([shape], True), colour] + size + ([spec.position] if spec.position else []))
    else:  # "on the left, a red circle" (falls back to the article-less form without a position)
        noun = _np(size + [colour, shape], with_article=True)
        text = f"{spec.position}, {noun}" if spec.position else _np(size + [colour, shape], with_article=False)
    return text


def _two(spec: CaptionSpec, rng: np.random.Generator) -> str:
    (ca, cb), (sa, sb) = spec.colours, spec.shapes
    a_first = bool(rng.integers(2))  # "A above B" or the same fact as "B below A"
    with_article = bool(rng.integers(2))
    first, second = _np([ca, sa], with_article), _np([cb, sb], with_article)
    if a_first:
        return f"{first} {spec.relation} {second}"
    return f"{second} {INVERSE_RELATION[spec.relation]} {first}"


def paraphrase(spec: CaptionSpec, rng: np.random.Generator) -> str:
    """A random non-canonical wording of `spec` (it may occasionally coincide with the canonical caption)."""
    core = _single(spec, rng) if spec.kind == "single" else _two(spec, rng)
    prefix = _pick(rng, _PREFIXES)
    if core.startswith(POSITIONS):
        prefix = ""  # "on the left, a red circle" takes no "a picture of"
    elif prefix and not core.startswith(("a ", "an ")):
        core = f"{article(core)} {core}"  # "a picture of a red circle", not "a picture of red circle"
    text = prefix + core
    if spec.background:
        text += _pick(rng, _BACKGROUND_STYLES).format(spec.background)
    if rng.random() < 0.2:  # user prompts are often written as sentences
        text = text[0].upper() + text[1:] + "."
    return text


def canonical_or_paraphrase(spec: CaptionSpec, rng: np.random.Generator, paraphrase_prob: float) -> str:
    """The caption a training example carries: canonical with probability 1 - paraphrase_prob."""
    return paraphrase(spec, rng) if rng.random() < paraphrase_prob else caption_text(spec)
