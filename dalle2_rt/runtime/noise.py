"""Noise streams and the seed contract (the determinism contract of the pipeline).

Every random draw is made on the host with numpy. The draws for image j (0-based, per prompt) of a call
with seed s in stage k come from ``np.random.default_rng([s, j, k])``, with k = 0 for the prior
(``PRIOR``), 1 for the decoder (``DECODER``) and 2 + m for SR stage m (``sr_stream(m)``). Within a stage the
order is: (SR stages with a ``noise_aug_t`` only: the noise augmenting the low-res input, shape of low_res),
the starting noise x_T (prior and decoder: the k candidates' rows, in order), then whatever the sampler
draws, step by step. Each draw is float32 ``standard_normal`` of that image's rows.

So an image's pixels are a function of (prompt, s, j, settings, backend) alone: they do not depend on
num_images, on the other prompts of the call, on how the batch is chunked, or on other threads. Two
prompts called with the same seed start from the same noise, which makes prompts comparable.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

PRIOR, DECODER = 0, 1  # stream ids of the stages; SR stage m is sr_stream(m)
SEED_DRAW = 2**32  # a seed drawn for the caller is below this (short enough to type back)


def sr_stream(m: int) -> int:
    """The stream id of SR stage m."""
    return 2 + m


def new_seed() -> int:
    """A fresh seed for a call that gave none (it goes into every image's metadata)."""
    return secrets.randbelow(SEED_DRAW)


class NoiseStreams:
    """Per-image generators, each owning ``rows`` consecutive batch rows (``rows`` = prior candidates).

    Stands in for a ``np.random.Generator`` in the samplers (they only call ``standard_normal``): a draw of
    shape (n·rows, ...) is the concatenation of each image's own draw of (rows, ...). ``seed``: one seed for
    every image (a call), or one per image (``Pipeline.generate``: images of several calls in one batch).
    """

    def __init__(self, seed: int | Sequence[int], indices: Sequence[int], stage: int, rows: int = 1):
        seeds = [seed] * len(indices) if isinstance(seed, int | np.integer) else list(seed)
        if len(seeds) != len(indices):
            raise ValueError(f"{len(seeds)} seeds for {len(indices)} images")
        self.generators = [np.random.default_rng([int(s), int(j), stage]) for s, j in zip(seeds, indices)]
        self.rows = rows

    def subset(self, images: slice) -> NoiseStreams:
        """The streams of some images (the same generator objects: their draws continue)."""
        sub = object.__new__(NoiseStreams)
        sub.generators, sub.rows = self.generators[images], self.rows
        return sub

    def one_row(self) -> NoiseStreams:
        """The same generators owning one row each (the chosen candidate after an early choice): their
        draws continue where the k rows' left off."""
        sub = object.__new__(NoiseStreams)
        sub.generators, sub.rows = self.generators, 1
        return sub

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        size = tuple(size)
        if size[0] != self.rows * len(self.generators):
            raise ValueError(f"draw of {size[0]} rows from {len(self.generators)} images × {self.rows} rows")
        return np.concatenate([g.standard_normal((self.rows, *size[1:]), dtype=dtype) for g in self.generators])
