"""One pass through every stage for the images of several requests: rows of (prompt, seed, index).

``Pipeline.__call__`` takes one seed for all its images, so requests with different seeds cannot share one of
its calls. The seed contract (``dalle2_rt/runtime/noise.py``) is what makes a shared pass possible: image j of
seed s draws all its noise from ``default_rng([s, j, stage])`` whatever batch it runs in. ``generate`` runs the
pipeline's stages (``stage_runner.run_stage``, the same function ``Pipeline`` runs) over image rows that each
carry their own (seed, index) noise streams, so a served image equals
``Pipeline(prompt, seed=s, num_images > j)[j]`` pixel for pixel, metadata included (tests/test_serve.py).

What is here is only the orchestration of ``Pipeline.__call__`` with per-image seeds: text encoding of the
distinct prompts, the guidance halves, candidate choice, the SR inputs and the image metadata, each through
the runtime's public functions. The runtime hook that would retire it: per-image seeds in
``noise.NoiseStreams`` (``seeds: Sequence[int]`` beside ``indices``) and a ``Pipeline.generate(prompts, seeds,
indices, settings, callback)`` taking one (prompt, seed, index) per image, of which ``__call__`` is the case
"one seed, indices 0 … n-1 per prompt" (and ``Pipeline._halves`` public, which ``_guided`` below mirrors).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..runtime.images import to_uint8
from ..runtime.noise import DECODER, PRIOR, sr_stream
from ..runtime.settings import describe
from ..runtime.stage_runner import Callback, Conditioning, call_chunked, run_stage
from ..runtime.stages import low_res_inputs, select_candidates


@dataclass(frozen=True)
class Row:
    """One image to make: its prompt, and the (seed, index) naming its noise."""

    prompt: str
    seed: int
    index: int


class RowStreams:
    """The noise of each image of a pass, ``rows`` consecutive batch rows per image (prior: k candidates).

    ``noise.NoiseStreams`` with a seed per image: a draw of (n·rows, ...) is the concatenation of each image's
    own draw of (rows, ...) from ``default_rng([seed, index, stage])``.
    """

    def __init__(self, keys: Sequence[tuple[int, int]], stage: int, rows: int = 1):
        self.generators = [np.random.default_rng([int(s), int(j), stage]) for s, j in keys]
        self.rows = rows

    def subset(self, images: slice) -> RowStreams:
        sub = object.__new__(RowStreams)  # the same generator objects: their draws continue
        sub.generators, sub.rows = self.generators[images], self.rows
        return sub

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        size = tuple(size)
        if size[0] != self.rows * len(self.generators):
            raise ValueError(f"draw of {size[0]} rows from {len(self.generators)} images × {self.rows} rows")
        return np.concatenate([g.standard_normal((self.rows, *size[1:]), dtype=dtype) for g in self.generators])


def _text(pipe, prompts: list[str]) -> dict[str, np.ndarray]:
    """text_embed (P, D), text_encodings (P, L, W) and, where the folder asks for it, text_mask (P, L)."""
    graph = pipe.manifest.stages["text_encoder"]["graph"]
    out = call_chunked(pipe.engines[graph], "text_encoder", {"tokens": pipe.tokenizer.encode(prompts)[0]})
    text = {name: out[name] for name in ("text_embed", "text_encodings")}
    if pipe.text_mask == "tokens":
        text["text_mask"] = pipe.tokenizer.text_mask(prompts)
    return text


def _guided(plan, cond: dict, keep: dict, rows: np.ndarray, empty: dict | None) -> Conditioning:
    """The conditional half (``cond`` with the ``*_keep`` values ``keep``) and the unconditional one (every keep
    0; the empty prompt's text for ``uncond_text: empty_prompt``), as ``Pipeline`` builds them."""
    r = len(next(iter(cond.values())))
    cond = {**cond, **{name: np.full(r, value, np.float32) for name, value in keep.items()}}
    uncond = {**cond, **{name: np.zeros(r, np.float32) for name in keep}}
    if plan.uncond_text == "empty_prompt":
        uncond.update({name: np.repeat(v, r, 0) for name, v in empty.items()})
    return Conditioning(cond=cond, rows=rows, uncond=uncond)


def generate(pipe, rows: Sequence[Row], run: dict, callback: Callback | None = None) -> list[Image.Image]:
    """The images of ``rows``, in order, all with the resolved settings ``run`` (``pipe.settings(...)``).

    Image r equals ``pipe(rows[r].prompt, seed=rows[r].seed, num_images=rows[r].index + 1, ...)[-1]``.
    ``callback(stage, step, total, x0)`` as ``Pipeline``'s.
    """
    prompts = list(dict.fromkeys(r.prompt for r in rows))  # each distinct prompt encoded once
    prompt_of = np.array([prompts.index(r.prompt) for r in rows])  # image -> its prompt
    text = _text(pipe, prompts)
    if callback is not None:
        callback("text_encoder", 1, 1, None)
    prior_plan, decoder_plan, *sr_plans = pipe.stages
    empty = _text(pipe, [""]) if "empty_prompt" in (prior_plan.uncond_text, decoder_plan.uncond_text) else None
    keys = [(r.seed, r.index) for r in rows]
    k = run["candidates"]

    # prior: k candidates per image, conditioned by rows of prompts; the one closest to its text kept
    prior = _guided(prior_plan, text, {prior_plan.cond_input: 1.0}, np.repeat(prompt_of, k), empty)
    pred = run_stage(prior_plan, pipe.engines, run["prior"], prior, RowStreams(keys, PRIOR, rows=k), callback)
    image_embed = select_candidates(pred, text["text_embed"][prompt_of], k, pipe.embed_norm)[0]  # (N, D)

    cond = {"image_embed": image_embed, **{name: v[prompt_of] for name, v in text.items()}}
    decoder = _guided(decoder_plan, cond, {"image_keep": 1.0, "text_keep": 1.0}, np.arange(len(rows)), empty)
    x = run_stage(decoder_plan, pipe.engines, run["decoder"], decoder, RowStreams(keys, DECODER), callback)

    for m, plan in enumerate(sr_plans):
        streams = RowStreams(keys, sr_stream(m))
        low_res = low_res_inputs(x, plan.noise_aug_t, plan.abar, streams, pipe.pixel_range)  # its first draw
        x = run_stage(plan, pipe.engines, run[plan.name], Conditioning(cond=low_res, rows=np.arange(len(x))),
                      streams, callback)

    common = {**describe(run, pipe.stages, candidates=True), "backend": pipe.backend.describe(),
              "engines": pipe.manifest.name, "manifest_sha256": pipe.manifest.sha256, "software": "dalle2-rt"}
    images = []
    for pixels, r in zip(to_uint8(x, pipe.pixel_range), rows):
        image = Image.fromarray(pixels)  # (H, W, 3) uint8
        image.info.update({"prompt": r.prompt, "seed": str(r.seed), "index": str(r.index), **common})
        images.append(image)
    return images
