"""Random inputs for a graph: the one generator behind every benchmark that feeds made-up arrays.

Timing, the FLOP counter's shape probe, the torch FLOP count and the sgemm yardstick all draw their
inputs here. Values are plausible for our graphs' input names, because some of them index tables
(tokens into the embedding, ``t`` into the timestep embedding) and a keep flag of 0 would switch a
branch; the times and FLOP counts measured do not depend on the values otherwise.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SOT, EOT = 49406, 49407  # CLIP BPE start/end of text, the ids every tokenizer of ours writes
TIMESTEPS = 1000  # t and aug_t are model timesteps 0 … T-1 (ARCHITECTURE.md, Graph I/O)


def random_inputs(inputs: Iterable[tuple[str, str, Sequence]], batch: int = 1, seed: int = 0,
                  timesteps: int = TIMESTEPS) -> dict[str, np.ndarray]:
    """``inputs``: (name, dtype, shape) triples; a dim that is not an int (``"batch"``, None) is ``batch``.

    tokens (any integer input): SOT, five word ids, EOT, then padding 0; ``t``/``aug_t``: whole timesteps
    0 … ``timesteps`` − 1 (a graph with a learned timestep table of T rows needs ``timesteps`` ≤ T);
    ``*_keep``/``text_mask``: 1.0 (the conditional branch); ``pixels``: U[0, 1); any other float: N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, dims in inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in dims)
        if name in ("t", "aug_t"):
            value = rng.integers(0, timesteps, shape)
        elif name.endswith("_keep") or name == "text_mask":
            value = np.ones(shape)
        elif np.issubdtype(np.dtype(dtype), np.integer):
            value = _tokens(rng, shape)
        elif name == "pixels":
            value = rng.uniform(0, 1, shape)
        else:
            value = rng.standard_normal(shape)
        feeds[name] = np.asarray(value, dtype=dtype)
    return feeds


def graph_inputs(spec, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """``random_inputs`` for the inputs of a manifest graph spec (``runtime.manifest``'s ``GraphSpec``)."""
    return random_inputs([(t.name, t.dtype, t.shape) for t in spec.inputs], batch, seed)


def _tokens(rng, shape) -> np.ndarray:
    """(B, L) token rows: SOT, up to five words from the common part of the vocabulary, EOT, padding 0."""
    tok = np.zeros(shape, np.int64)
    words = max(0, min(5, shape[-1] - 2))
    tok[..., 0] = SOT
    tok[..., 1:1 + words] = rng.integers(300, 3000, (*shape[:-1], words))
    tok[..., 1 + words] = EOT
    return tok
