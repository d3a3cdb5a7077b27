"""The orchestrator model's inputs and outputs, as data: ``export/triton.py`` writes its config from these,
``orchestrator_model.py`` reads requests by them, clients build requests from them.

Every input is optional; a missing one takes the manifest's default (as ``Pipeline.__call__``). Generation
needs ``prompt``; ``operation`` selects one of unCLIP's operations instead, which read the inputs after the
sampling options (``orchestrator_ops.py`` says which).
Scalars travel as shape [1]. The sampling options are ``settings.OPTIONS`` (one input each, named as the
option), so a new option reaches the orchestrator without an edit here. Floats (guidance) are FP64 so a value
reaches the loop exactly as a local call gets it.
"""
from __future__ import annotations

from ..runtime.settings import OPTIONS

TRITON_TYPES = {int: "TYPE_INT32", float: "TYPE_FP64", str: "TYPE_STRING"}  # an option's type as a Triton input

# (name, Triton data type, dims, optional, Pipeline.__call__ keyword)
INPUTS = (
    ("prompt", "TYPE_STRING", [-1], True, None),  # one or more UTF-8 prompts (interpolate: the ends' prompts)
    ("num_images", "TYPE_INT32", [1], True, "num_images"),  # images per prompt
    ("seed", "TYPE_UINT64", [1], True, "seed"),
    *((o.name, TRITON_TYPES[o.kind], [1], True, o.name) for o in OPTIONS),
    # unCLIP's operations (orchestrator_ops.py); read by name, not passed to generation
    ("operation", "TYPE_STRING", [1], True, None),  # generate (default) | edit | interpolate
    ("image", "TYPE_UINT8", [-1, -1, 3], True, None),  # edit: the image; interpolate: end a
    ("image_b", "TYPE_UINT8", [-1, -1, 3], True, None),  # interpolate: end b
    ("source", "TYPE_STRING", [1], True, None),  # edit: a caption of the image as it is
    ("target", "TYPE_STRING", [1], True, None),  # edit: the caption to move it towards
    ("amount", "TYPE_FP64", [-1], True, None),  # edit: θ, one or several (a sweep)
    ("text", "TYPE_BOOL", [1], True, None),  # edit: condition the decoder on the captions' text (default true)
    ("edit_guidance", "TYPE_FP64", [1], True, None),  # edit: the frames' decoder guidance (default: the folder's)
    ("frames", "TYPE_INT32", [1], True, None),  # interpolate: frames, both ends included
    ("latent", "TYPE_STRING", [1], True, None),  # interpolate: slerp | fixed
    ("refine", "TYPE_INT32", [1], True, None),  # fixed-point iterations per inversion step
)


def outputs(image_size: int) -> tuple:
    """(name, Triton data type, dims): images (N, S, S, 3) uint8, prompt-major as ``Pipeline.__call__``
    returns them; metadata (N,) one JSON object per image (its PNG text chunks: prompt, seed, index,
    sampler, steps, guidance, backend, manifest_sha256, ...)."""
    return (("images", "TYPE_UINT8", [-1, image_size, image_size, 3]), ("metadata", "TYPE_STRING", [-1]))
