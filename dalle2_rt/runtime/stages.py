"""What a stage entry of the manifest asks the pipeline to do, beyond the schema-1 defaults of our own models.

The keys are specified in ARCHITECTURE.md ("Schema additions for imported families"); each has a default
that is what a folder exported from our checkpoints does, so such folders need none of them. The pipeline
reads them through this module and never looks at a model's name. It also holds what those keys feed: the
prior's candidate choice (``select_candidates``, by ``embed_norm``), the decoder's (``rank_pixels`` +
``select_samples``: CLIP's image encoder on each sample, the one closest to the text kept) and an SR stage's
low-res input (``low_res_inputs``, by ``noise_aug_t``).

  text_encoder.text_mask    absent | "tokens": graphs with a ``text_mask`` input get 1.0 on the positions
                            the tokenizer filled (sot, ids, eot), 0.0 on padding
  <stage>.uncond_text       "null_input" (default): the unconditional half is the conditional inputs with
                            every ``*_keep`` = 0 | "empty_prompt": its text inputs (text_embed,
                            text_encodings, text_mask) are the text encoder's outputs for "" instead
  <stage>.variance          "small" (default) | "large": DDPM's fixed σ² = β̃ or β | "learned_range": the
                            graph outputs 2C channels (prediction, v), σ² interpolated by v
  prior.embed_norm          {"kind": "scale", "scale": s} (default, s = embed_scale): the decoder's
                            image_embed = normalize(pred / s) | {"kind": "mean_std", "mean": [D], "std": [D]}:
                            image_embed = pred · std + mean, not normalised
  sr[m].noise_aug_t         an int: low_res = q_sample(previous, ᾱ[t]) and the graph's aug_t = t | null:
                            low_res = previous image, no draw, no aug_t input
  sr[m].last_step_graph     absent | a graph (same I/O as ``graph``) run for the last sampling step only
"""
from __future__ import annotations

import numpy as np

from .schedules import q_sample

UNCOND_TEXT = ("null_input", "empty_prompt")
VARIANCES = ("small", "large", "learned_range")
TEXT_MASKS = ("tokens",)
EMBED_NORMS = ("scale", "mean_std")


def stage_problems(entry: dict, graphs, *, sr: bool = False) -> list[str]:
    """What is wrong with the additions in one diffusion stage entry (empty: usable)."""
    problems = []
    if entry.get("uncond_text", "null_input") not in UNCOND_TEXT:
        problems.append(f"uncond_text {entry['uncond_text']!r} is not one of {UNCOND_TEXT}")
    if entry.get("variance", "small") not in VARIANCES:
        problems.append(f"variance {entry['variance']!r} is not one of {VARIANCES}")
    last = entry.get("last_step_graph")
    if last is not None and last not in graphs:
        problems.append(f"last_step_graph {last!r} is not in graphs")
    if sr:
        aug = entry.get("noise_aug_t")
        if aug is not None and not isinstance(aug, int):
            problems.append(f"noise_aug_t must be an integer or null, got {aug!r}")
        for name in filter(None, (entry.get("graph"), last)):
            takes_aug = any(t.name == "aug_t" for t in getattr(graphs.get(name), "inputs", ()))
            if takes_aug != (aug is not None):
                problems.append(f"graph {name!r} {'takes' if takes_aug else 'has no'} aug_t but noise_aug_t is "
                                f"{aug!r}")
    norm = entry.get("embed_norm")
    if norm is not None:
        try:
            embed_norm(entry)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"embed_norm is unusable ({e})")
    return problems


def embed_norm(prior_entry: dict) -> dict:
    """The prior's ``embed_norm``, or the schema-1 ``embed_scale`` as {"kind": "scale", "scale": s}."""
    norm = prior_entry.get("embed_norm")
    if norm is None:
        return {"kind": "scale", "scale": float(prior_entry.get("embed_scale", 1.0))}
    kind = norm["kind"]
    if kind == "scale":
        return {"kind": "scale", "scale": float(norm["scale"])}
    if kind == "mean_std":
        mean, std = np.asarray(norm["mean"], np.float64), np.asarray(norm["std"], np.float64)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError("mean and std must be two lists of the same length")
        return {"kind": "mean_std", "mean": mean, "std": std}
    raise ValueError(f"kind {kind!r} is not one of {EMBED_NORMS}")


def image_embed_from_prior(pred: np.ndarray, norm: dict | float) -> np.ndarray:
    """The decoder's ``image_embed`` from prior outputs (..., D), float64.

    scale: normalize(pred / s), the unit CLIP embedding; mean_std: pred · std + mean (karlo's
    ``PriorTransformer.post_process_latents``), the raw CLIP embedding its decoder was trained on.
    """
    if not isinstance(norm, dict):
        norm = {"kind": "scale", "scale": float(norm)}
    pred = np.asarray(pred, np.float64)
    if norm["kind"] == "mean_std":
        return pred * norm["std"] + norm["mean"]
    return normalize(pred / norm["scale"])


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit vectors along ``axis``, float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def select_candidates(pred: np.ndarray, text_embed: np.ndarray, k: int, norm: float | dict):
    """Pick, per image, the prior candidate most similar to its text.

    pred (N·k, D) prior outputs (rows n·k … n·k+k-1 belong to image n), text_embed (N, D). Each candidate
    becomes the decoder's image embedding (``norm``: the prior's embed_norm, or a float embed_scale; for our
    models the unit CLIP embedding normalize(pred / embed_scale)); its score is its cosine with the text
    embedding. Returns (image_embed (N, D) float32, chosen (N,) int, scores (N, k) float64).
    """
    n = text_embed.shape[0]
    emb = image_embed_from_prior(np.asarray(pred).reshape(n, k, -1), norm)  # (N, k, D)
    scores = np.einsum("nkd,nd->nk", normalize(emb), normalize(text_embed))
    chosen = np.argmax(scores, axis=1)
    return emb[np.arange(n), chosen].astype(np.float32), chosen, scores


def rank_pixels(x: np.ndarray, pixel_range, size: int, input_range=(0.0, 1.0)) -> np.ndarray:
    """Decoder samples x (M, C, h, w) as the image encoder's input (M, C, size, size), float32: clamped to the
    pixel range, mapped linearly onto ``input_range``, each pixel repeated size/h times along both axes (nearest;
    ``size`` must be a multiple of h, so that a host reproduces it exactly)."""
    h = x.shape[-1]
    if size % h:
        raise ValueError(f"the image encoder's side {size} is not a multiple of the decoder's {h}")
    lo, hi = (float(v) for v in pixel_range)
    a, b = (float(v) for v in input_range)
    unit = (np.clip(np.asarray(x, np.float64), lo, hi) - lo) / (hi - lo)
    f = size // h
    return (a + unit * (b - a)).repeat(f, axis=-2).repeat(f, axis=-1).astype(np.float32)


def select_samples(x: np.ndarray, image_embed: np.ndarray, text_embed: np.ndarray, k: int):
    """Pick, per image, the decoder sample whose CLIP image embedding is most similar to its text.

    x (N·k, ...) samples (rows n·k … n·k+k-1 belong to image n), image_embed (N·k, D) their image encoder
    outputs, text_embed (N, D). The score is the cosine. Returns (x (N, ...) the chosen samples, chosen (N,)
    int, scores (N, k) float64); ties go to the lowest row, so k = 1 returns x unchanged.
    """
    n = text_embed.shape[0]
    emb = normalize(np.asarray(image_embed).reshape(n, k, -1))
    scores = np.einsum("nkd,nd->nk", emb, normalize(text_embed))
    chosen = np.argmax(scores, axis=1)
    return np.asarray(x)[np.arange(n) * k + chosen], chosen, scores


def low_res_inputs(x: np.ndarray, noise_aug_t: int | None, abar: np.ndarray, streams,
                   pixel_range=(-1.0, 1.0)) -> dict[str, np.ndarray]:
    """An SR stage's conditioning from the previous stage's samples x (N, C, h, w).

    x is clamped to the pixel range; with ``noise_aug_t`` = t: low_res = q_sample(x, ᾱ[t], ε) and aug_t = t,
    ε the first draw of the stage's ``streams`` (the seed contract, noise.py); with None: low_res = x, no draw.
    """
    x = np.clip(x, *pixel_range).astype(np.float32)
    if noise_aug_t is None:
        return {"low_res": x}
    noise = streams.standard_normal(x.shape)
    return {"low_res": q_sample(x, abar[noise_aug_t], noise), "aug_t": np.full(len(x), noise_aug_t, np.float32)}


def sampler_options(sampler: str, variance: str, ddim_eta: float = 0.0) -> dict:
    """Extra keyword arguments of ``samplers.sample`` for a stage's ``variance`` and DDIM η."""
    if sampler == "ddpm" and variance in ("small", "large"):
        return {"variance": variance}
    if sampler == "ddim" and ddim_eta > 0:
        return {"eta": ddim_eta}
    return {}  # learned_range travels with the denoiser; DDIM / DPM++ have no variance choice
