"""What one orchestrator request asks for, from its tensors, as a call of the runtime: generation (the default),
or one of unCLIP's operations (``runtime/operations.py``) by the ``operation`` input.

The Triton model (``orchestrator_model.py``) reads each input named in ``orchestrator_io.INPUTS`` that the
request carries into a dict of numpy arrays and calls ``run``; so can any host that has the arrays (tests do,
without a server). Every refusal is an ``InputError`` with one line, which the model returns as the request's
error.

    operation  "generate" | "edit" | "interpolate"     (default "generate")
    generate:     prompt (one or more) and the sampling options, as ``Pipeline.__call__``
    edit:         image (H, W, 3) uint8, source, target, amount (one θ or several: a sweep), seed, text,
                  decoder_steps, decoder_guidance (the inversion's), edit_guidance (the frames'), refine
    interpolate:  end a = image or prompt[0], end b = image_b or the next prompt; frames, latent, seed,
                  decoder_steps, decoder_guidance, refine
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from ..runtime import operations as ops
from ..runtime.errors import InputError
from ..runtime.settings import check_prompts

OPERATIONS = ("generate", "edit", "interpolate")
MAX_IMAGE_SIDE = 4096  # an image input's height and width (the stages read a centre square of at most 256)
MAX_OUTPUTS = 64  # images one operation request may return (edit amounts, interpolation frames)
# the inputs each operation reads; anything else it is given is refused
OPERATION_INPUTS = {
    "edit": ("image", "source", "target", "amount", "seed", "text", "decoder_steps", "decoder_guidance",
             "edit_guidance", "refine"),
    "interpolate": ("image", "image_b", "prompt", "frames", "latent", "seed", "decoder_steps", "decoder_guidance",
                    "refine"),
}
# the inputs only the operations read: a generation request that carries one is refused
OPERATION_ONLY = ("image", "image_b", "source", "target", "amount", "text", "edit_guidance", "frames", "latent",
                  "refine")


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("a text input is not valid UTF-8") from None
    return str(value)


def _scalar(arrays: Mapping[str, np.ndarray], name: str, default=None):
    if name not in arrays:
        return default
    flat = np.asarray(arrays[name]).reshape(-1)
    if flat.size != 1:
        raise InputError(f"{name} must hold one value, got {flat.size}")
    value = flat[0]
    return _text(value) if isinstance(value, bytes | str | np.str_) else value.item()


def _image(arrays: Mapping[str, np.ndarray], name: str) -> Image.Image:
    pixels = np.asarray(arrays[name])
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(f"{name} must be (height, width, 3) uint8 RGB, got {pixels.dtype} {list(pixels.shape)}")
    h, w = pixels.shape[:2]
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise InputError(f"{name} must be 1 … {MAX_IMAGE_SIDE} pixels a side, got {h}×{w}")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def prompts_of(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [] if "prompt" not in arrays else [_text(p) for p in np.asarray(arrays["prompt"]).reshape(-1)]


def _common(pipe, arrays) -> tuple[int, dict]:
    settings = ops.operation_settings(pipe, *(_scalar(arrays, n) for n in ("decoder_steps", "decoder_guidance",
                                                                           "refine")))
    return int(_scalar(arrays, "seed", 0)), settings


def operation_of(arrays: Mapping[str, np.ndarray]) -> str:
    op = _scalar(arrays, "operation", "generate")
    if op not in OPERATIONS:
        raise InputError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")
    return op


def run(pipe, arrays: Mapping[str, np.ndarray], *, options: Mapping[str, object] | None = None,
        callback=None) -> list[Image.Image]:
    """The images one request asks for. ``options``: generation's keyword arguments, already read from the
    request by their ``INPUTS`` entries (num_images, seed and the sampling options)."""
    op = operation_of(arrays)
    if op == "generate":
        stray = sorted(set(arrays) & set(OPERATION_ONLY))
        if stray:
            raise InputError(f"{', '.join(stray)}: inputs of the operations, not of generation (set operation)")
        prompts = prompts_of(arrays)
        if not prompts:
            raise InputError("generation needs a prompt")
        return pipe(prompts, callback=callback, **dict(options or {}))
    allowed = set(OPERATION_INPUTS[op]) | {"operation"}
    stray = sorted(set(arrays) - allowed)
    if stray:
        raise InputError(f"{op} does not take {', '.join(stray)}; it takes {', '.join(OPERATION_INPUTS[op])}")
    seed, settings = _common(pipe, arrays)
    if op == "edit":
        missing = [n for n in ("image", "source", "target") if n not in arrays]
        if missing:
            raise InputError(f"edit needs {', '.join(missing)}")
        amounts = ops.check_amounts(np.asarray(arrays["amount"], np.float64).reshape(-1).tolist()
                                    if "amount" in arrays else [ops.DEFAULT_AMOUNT])
        if len(amounts) > MAX_OUTPUTS:
            raise InputError(f"at most {MAX_OUTPUTS} amounts per request, got {len(amounts)}")
        source, target = check_prompts([_scalar(arrays, "source"), _scalar(arrays, "target")])
        text = _scalar(arrays, "text", True)
        if not isinstance(text, bool):
            raise InputError(f"text must be a boolean, got {text!r}")
        edit_guidance = _scalar(arrays, "edit_guidance")
        pipe.settings(decoder_guidance=edit_guidance)
        return ops.edit(pipe, _image(arrays, "image"), source, target, amount=amounts, seed=seed, text=text,
                        edit_guidance=edit_guidance, callback=callback, **settings)
    frames = ops.check_frames(_scalar(arrays, "frames", 5))
    latent = _scalar(arrays, "latent", "slerp")
    if latent not in ops.LATENT_MODES:
        raise InputError(f"latent must be one of {', '.join(ops.LATENT_MODES)}, got {latent!r}")
    prompts = check_prompts(prompts_of(arrays)) if "prompt" in arrays else []
    images = [_image(arrays, n) if n in arrays else None for n in ("image", "image_b")]
    if sum(im is None for im in images) != len(prompts):
        raise InputError(f"interpolate needs two ends: image and/or image_b, and a prompt for each end without "
                         f"an image; got {2 - images.count(None)} image(s) and {len(prompts)} prompt(s)")
    given = iter(prompts)
    ends = []
    for j, im in enumerate(images):
        ends.append(im if im is not None else
                    ops.from_prompt(pipe, next(given), seed=seed, index=j, decoder_steps=settings["decoder_steps"],
                                    decoder_guidance=settings["decoder_guidance"], callback=callback))
    return ops.interpolate(pipe, *ends, frames=frames, latent=latent, seed=seed, callback=callback, **settings)
