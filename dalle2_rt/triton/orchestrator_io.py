"""The orchestrator model's inputs and outputs, as data: ``export/triton.py`` writes its config from these,
``orchestrator_model.py`` reads requests by them, clients build requests from them.

Every input but ``prompt`` is optional; a missing one takes the manifest's default (as ``Pipeline.__call__``).
Scalars travel as shape [1]. The sampling options are ``settings.OPTIONS`` (one input each, named as the
option), so a new option reaches the orchestrator without an edit here. Floats (guidance) are FP64 so a value
reaches the loop exactly as a local call gets it.
"""
from __future__ import annotations

from ..runtime.settings import OPTIONS

TRITON_TYPES = {int: "TYPE_INT32", float: "TYPE_FP64", str: "TYPE_STRING"}  # an option's type as a Triton input

# (name, Triton data type, dims, optional, Pipeline.__call__ keyword)
INPUTS = (
    ("prompt", "TYPE_STRING", [-1], False, None),  # one or more UTF-8 prompts
    ("num_images", "TYPE_INT32", [1], True, "num_images"),  # images per prompt
    ("seed", "TYPE_UINT64", [1], True, "seed"),
    *((o.name, TRITON_TYPES[o.kind], [1], True, o.name) for o in OPTIONS),
)


def outputs(image_size: int) -> tuple:
    """(name, Triton data type, dims): images (N, S, S, 3) uint8, prompt-major as ``Pipeline.__call__``
    returns them; metadata (N,) one JSON object per image (its PNG text chunks: prompt, seed, index,
    sampler, steps, guidance, backend, manifest_sha256, ...)."""
    return (("images", "TYPE_UINT8", [-1, image_size, image_size, 3]), ("metadata", "TYPE_STRING", [-1]))
