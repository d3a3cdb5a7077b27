"""unCLIP's operations on an image's bipartite latent (Ramesh et al. 2022, §3).

An image is (z_i, x_T): its CLIP image embedding and the decoder latent that DDIM, run backwards while
conditioned on z_i, reaches from the image (``ddim_invert``). Decoding (z_i, x_T) with DDIM η = 0 gives the
image back; from it follow

- variations: decode (z_i, x_T) with η > 0 (``vary``);
- interpolations: decode slerp(z_a, z_b, θ) with x_T slerped between the two latents (the endpoints are the
  two reconstructions) or held fixed (``interpolate``);
- text diffs: z_d = normalise(z_t − z_t0) for a target caption t and a caption t0 of the image, decode
  slerp(z_i, z_d, θ) from the image's own x_T (``edit``).

The math (``slerp``, ``text_direction``, ``ddim_invert``) is plain numpy over arrays; the rest composes the
pipeline's stages. The decoder is conditioned on the image embedding alone here (``text_keep`` = 0, as
``Pipeline.variations``), so that one latent serves every caption: an edit changes z_i and nothing else.

    inv = invert(pipe, "circle.png")                       # Inversion: image_embed (1, D), latent (1, C, h, w)
    same = reconstruct(pipe, inv)                          # η = 0: the image again
    stars = edit(pipe, inv, "a red circle", "a red star", amount=[0.2, 0.3, 0.4])
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError
from .images import open_image, to_pixels
from .noise import DECODER, NoiseStreams, new_seed
from .parameterization import make_step_denoiser
from .plan import StagePlan
from .samplers import Denoiser, sample_ddim
from .schedules import Schedule, respace
from .settings import Settings, check_int, check_prompts
from .stage_runner import Callback, call_chunked, guidance_halves
from .stages import normalize

# callback(i, x, x0) after inversion step i (i counts up from the clean end, x the noisier sample)
InvertCallback = Callable[[int, np.ndarray, np.ndarray], None]
DEFAULT_AMOUNT = 0.35  # text-diff θ when none is given (python -m bench.operations: the best of 0.2 … 0.8)
PARALLEL_EPS = 1e-7  # below this sin Ω two vectors are taken as parallel (slerp = lerp)


# --------------------------------------------------------------------------------------------------------
# the math


def slerp(a: np.ndarray, b: np.ndarray, theta) -> np.ndarray:
    """Spherical interpolation between ``a`` and ``b`` (the same shape, each taken as one vector):

        slerp(a, b, θ) = sin((1 − θ)Ω)/sin Ω · a + sin(θΩ)/sin Ω · b,   cos Ω = a·b / (|a| |b|),

    Ω the angle between the two whole vectors (not an element-wise arccos). θ = 0 gives a, θ = 1 gives b,
    and for unit vectors every point is a unit vector at angle θΩ from a. Parallel vectors (sin Ω ≈ 0, same
    direction) fall back to (1 − θ) a + θ b; opposite ones have no unique great circle (``InputError``).
    ``theta``: a number -> a.shape; a sequence of S -> (S, *a.shape). Math in float64, output float32.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise InputError(f"slerp between arrays of shapes {a64.shape} and {b64.shape}")
    t = np.asarray(theta, np.float64)
    if t.ndim > 1:
        raise InputError("slerp: theta must be a number or a 1-D sequence")
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 or nb == 0:
        raise InputError("slerp: a zero vector has no direction")
    cos = float(np.clip(np.vdot(a64, b64) / (na * nb), -1.0, 1.0))
    omega = np.arccos(cos)
    tt = t.reshape(t.shape + (1,) * a64.ndim)  # (S, 1, …) or ()
    if np.sin(omega) < PARALLEL_EPS:
        if cos < 0:
            raise InputError("slerp between opposite vectors: no unique great circle")
        return ((1.0 - tt) * a64 + tt * b64).astype(np.float32)
    out = (np.sin((1.0 - tt) * omega) * a64 + np.sin(tt * omega) * b64) / np.sin(omega)
    return out.astype(np.float32)


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """The angle Ω between two arrays taken as vectors, in radians."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.arccos(np.clip(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)), -1.0, 1.0)))


def text_direction(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The text diff z_d = normalise(z_t − z_t0) of CLIP text embeddings (…, D), float32; ``InputError`` when the
    two captions embed alike (there is no direction between them)."""
    diff = np.asarray(target, np.float64) - np.asarray(source, np.float64)
    if np.any(np.linalg.norm(diff, axis=-1) < 1e-6):
        raise InputError("the source and target captions have the same text embedding: nothing to edit towards")
    return normalize(diff).astype(np.float32)


def ddim_invert(denoise: Denoiser, x0: np.ndarray, schedule: Schedule, *, refine: int = 0,
                callback: InvertCallback | None = None) -> np.ndarray:
    """The latent x_T from which ``sample_ddim(denoise, x_T, schedule, eta=0)`` returns ``x0``: DDIM's steps
    run backwards, from the clean end (ᾱ'_{S−1} = 1) to the noisiest step (ᾱ_0). Returns x in x0's dtype.

    DDIM step i (Eq. 12 of Song et al. 2021, η = 0) maps x_i at ᾱ_i to x' = x_{i+1} at ᾱ'_i:
        x' = √ᾱ' x̂0 + √(1 − ᾱ') ε̂,   x̂0 = denoise(x_i, i),   ε̂ = (x_i − √ᾱ x̂0)/√(1 − ᾱ).
    Solved for x_i, with x̂0 and ε̂ still depending on the unknown x_i, in two equivalent forms:
        (A)  x_i = √(ᾱ/ᾱ') x' + (√(1 − ᾱ) − √(ᾱ (1 − ᾱ')/ᾱ')) ε̂          (Eq. 13's ODE form)
        (B)  x_i = √ᾱ x̂0 + √((1 − ᾱ)/(1 − ᾱ')) (x' − √ᾱ' x̂0)            (ᾱ' < 1)
    ``refine`` = 0 is the usual inversion: (A) with ε̂ evaluated at x' (one denoiser call per step; exact only
    as the steps shrink). ``refine`` = k > 0 then iterates one form k times from there, a fixed point at which
    the forward step lands on x' exactly; each iterate's forward step is checked against x' (k + 2 calls per
    step in all) and each row keeps its best iterate, so refining never does worse than the usual step when
    the iteration does not contract (a clamped or badly trained denoiser). Their Jacobians are (A) a (I − √ᾱ J) and
    (B) b J, J = ∂x̂0/∂x, a = (√(1−ᾱ) − √(ᾱ(1−ᾱ')/ᾱ'))/√(1−ᾱ), b = √ᾱ − √((1−ᾱ)ᾱ'/(1−ᾱ')); each step uses
    the form that contracts more for data of standard deviation σ_d = ``SIGMA_DATA``, whose posterior mean
    has J = √ᾱ σ_d²/(ᾱ σ_d² + 1 − ᾱ) I: (A) at low noise, where J ≈ I/√ᾱ, (B) at high noise, where J ≈ 0.
    """
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    x = np.asarray(x0)
    for i in reversed(range(len(schedule))):
        a, a_prev = float(abar[i]), float(abar_prev[i])
        x_prev = x.astype(np.float64)  # x', the less noisy sample
        scale, c = np.sqrt(a / a_prev), np.sqrt(1.0 - a) - np.sqrt(a * (1.0 - a_prev) / a_prev)
        use_b = a_prev < 1.0 and _contraction_b(a, a_prev) < _contraction_a(a, a_prev)
        x0_hat = np.asarray(denoise(x, i), np.float64)
        eps = (x_prev - np.sqrt(a) * x0_hat) / np.sqrt(1.0 - a)
        guess = scale * x_prev + c * eps  # (A) at x': the classic inversion step
        best, best_err = guess, None
        for k in range(refine + 1 if refine else 0):  # verify each iterate (one call), propose the next
            x0_hat = np.asarray(denoise(guess.astype(x.dtype), i), np.float64)
            eps = (guess - np.sqrt(a) * x0_hat) / np.sqrt(1.0 - a)
            err = _row_error(np.sqrt(a_prev) * x0_hat + np.sqrt(1.0 - a_prev) * eps, x_prev)  # DDIM step vs x'
            if best_err is None:
                best_err = err
            better = err < best_err
            best = np.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), guess, best)
            best_err = np.minimum(err, best_err)
            if k == refine:
                break
            if use_b:  # (B)
                guess = np.sqrt(a) * x0_hat + np.sqrt((1.0 - a) / (1.0 - a_prev)) * (x_prev - np.sqrt(a_prev) * x0_hat)
            else:  # (A)
                guess = scale * x_prev + c * eps
        x = best.astype(x.dtype)
        if callback is not None:
            callback(len(schedule) - 1 - i, x, x0_hat.astype(x.dtype))
    return x


def _row_error(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean absolute difference per row (B,)."""
    return np.abs(x - target).reshape(len(x), -1).mean(axis=1)


SIGMA_DATA = 0.5  # the data's standard deviation the fixed point's form is chosen for (images in [−1, 1])


def _posterior_slope(a: float) -> float:
    return np.sqrt(a) * SIGMA_DATA**2 / (a * SIGMA_DATA**2 + 1.0 - a)


def _contraction_a(a: float, a_prev: float) -> float:
    c = (np.sqrt(1.0 - a) - np.sqrt(a * (1.0 - a_prev) / a_prev)) / np.sqrt(1.0 - a)
    return abs(c * (1.0 - np.sqrt(a) * _posterior_slope(a)))


def _contraction_b(a: float, a_prev: float) -> float:
    return abs((np.sqrt(a) - np.sqrt((1.0 - a) * a_prev / (1.0 - a_prev))) * _posterior_slope(a))


# --------------------------------------------------------------------------------------------------------
# the decoder as a denoiser over given conditioning rows


def stage_denoiser(plan: StagePlan, engines: Mapping, schedule: Schedule, cond: dict[str, np.ndarray],
                   uncond: dict[str, np.ndarray] | None, guidance: float | None) -> Denoiser:
    """``denoise(x_t, i) -> x0`` of stage ``plan`` over ``schedule`` for rows conditioned by ``cond`` (B rows
    each, the graph's inputs) and, under classifier-free guidance, ``uncond`` (the same keys).

    The same rules as ``stage_runner.run_stage``: a guidance-distilled stage (``plan.guidance_input``) takes
    w as an input, one row per sample; otherwise guidance w ≠ 1 stacks the conditional and unconditional rows
    (2B per call) and w = 1 or None runs the conditional rows alone. Each call goes to the stage's graph in
    chunks of its max batch (the last step to ``plan.last_graph`` where the folder has one).
    """
    if plan.prefix_graph:
        raise InputError(f"{plan.name}: a prefix-cached stage cannot be inverted here")
    step_engine = engines[plan.step_graph or plan.graph]
    last_engine = engines[plan.last_graph] if plan.last_graph else step_engine
    total = len(schedule)
    if plan.guidance_input:
        rows = len(next(iter(cond.values())))
        cond = {**cond, plan.guidance_input: np.full(rows, 1.0 if guidance is None else guidance, np.float32)}
        guided = False
    else:
        guided = uncond is not None and guidance is not None and guidance != 1.0

    def model(i: int, **arrays) -> np.ndarray:
        engine = last_engine if i == total - 1 else step_engine
        return call_chunked(engine, plan.name, arrays)[plan.output]

    pick = {k: v for k, v in cond.items() if k in plan.inputs}
    return make_step_denoiser(model, kind=plan.kind, schedule=schedule, cond=pick,
                              uncond={k: v for k, v in uncond.items() if k in plan.inputs} if guided else None,
                              guidance_scale=guidance if guided else None, clip_x0=plan.clip_x0)


@dataclass(frozen=True)
class Inversion:
    """Images as unCLIP's bipartite latent: decode (image_embed, latent) with DDIM η = 0 over ``steps`` at
    ``guidance`` to get them back."""

    image_embed: np.ndarray  # (N, D) float32, unit CLIP image embeddings z_i
    latent: np.ndarray  # (N, C, h, w) float32, the decoder's x_T
    target: np.ndarray  # (N, C, h, w) float32, the decoder-sized images the latent decodes to (pixel range)
    steps: int  # the decoder's DDIM steps the latent belongs to
    guidance: float | None  # the decoder guidance it was inverted (and decodes) at
    # the captions' text conditioning it was inverted with (``Pipeline.encode_text`` rows, one per image), or
    # None: inverted without text
    text: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.latent)

    def __getitem__(self, rows) -> Inversion:
        rows = np.atleast_1d(np.arange(len(self))[rows])
        text = None if self.text is None else {k: v[rows] for k, v in self.text.items()}
        return Inversion(self.image_embed[rows], self.latent[rows], self.target[rows], self.steps, self.guidance, text)


def check_amounts(amount) -> list[float]:
    """Text-diff amounts θ: one number or a sequence, each finite in [0, 1]."""
    values = [amount] if isinstance(amount, int | float | np.floating | np.integer) else list(amount)
    if not values:
        raise InputError("no edit amount given")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer) or not 0 <= v <= 1:
            raise InputError(f"an edit amount must be a number in 0 … 1, got {v!r}")
        out.append(float(v))
    return out


def check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int | np.integer) or not 2 <= frames <= MAX_FRAMES:
        raise InputError(f"frames must be an integer between 2 and {MAX_FRAMES}, got {frames!r}")
    return int(frames)


MAX_FRAMES = 64
LATENT_MODES = ("slerp", "fixed")


def frame_thetas(frames: int) -> np.ndarray:
    """θ of each interpolation frame: 0 … 1 in equal steps, both endpoints included."""
    return np.linspace(0.0, 1.0, check_frames(frames))


# the operations' decoder guidance when none is given: unguided, where DDIM inversion is exact to the fixed point
# (python -m bench.operations on the guided decoder: reconstruction 100 % fully right at 1.0, 70 % at the folder's
# 3.0, which generation uses; text diffs 61.5 against 56.5 % at θ = 0.35)
DEFAULT_GUIDANCE = 1.0
DEFAULT_REFINE = 3  # fixed-point iterations per inversion step (ddim_invert), decoder calls = steps·(1 + this)
MAX_REFINE = 32


def operation_settings(pipe, decoder_steps=None, decoder_guidance=None, refine=None) -> dict:
    """The settings every operation takes, checked before any work as every entry point checks them (the CLI,
    HTTP, the Triton orchestrator): {"decoder_steps", "decoder_guidance", "refine"} (refine's default filled in)."""
    if "image_encoder" not in pipe.manifest.stages:
        raise InputError(f"engine folder {pipe.manifest.name} has no image_encoder; the operations need one")
    pipe.settings(decoder_steps=decoder_steps, decoder_guidance=decoder_guidance)
    refine = DEFAULT_REFINE if refine is None else check_int("refine", refine, 0, MAX_REFINE)
    return {"decoder_steps": decoder_steps, "decoder_guidance": decoder_guidance, "refine": refine}


# --------------------------------------------------------------------------------------------------------
# over a pipeline's stages


def encode_images(pipe, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Images (PIL, paths or uint8 (H, W, 3) arrays) -> (unit CLIP image embeddings (N, D) float32
    (``Pipeline.encode_image``), the images at the decoder's size in its pixel range (N, C, h, w) float32: the
    x0 the decoder reconstructs)."""
    sources = [Image.fromarray(np.asarray(im, np.uint8)) if isinstance(im, np.ndarray) else open_image(im)
               for im in images]
    embed = pipe.encode_image(sources)
    side = pipe.decoder_plan.x_shape[-1]
    target = np.stack([to_pixels(im, side, pipe.pixel_range) for im in sources])  # (N, 3, h, w)
    return embed, target


def _decoder_denoiser(pipe, image_embed: np.ndarray, schedule: Schedule, guidance: float | None,
                      text: dict[str, np.ndarray] | None = None) -> Denoiser:
    """The decoder conditioned on ``image_embed`` (N, D) and, when given, ``text`` (``Pipeline.encode_text``
    rows, one per image); without text on the learned null text (text_keep = 0) as ``Pipeline.variations``.
    Under guidance the unconditional half drops both."""
    plan = pipe.decoder_plan
    n = len(image_embed)
    if text is None:
        text = {"text_encodings": np.zeros((n, *_decoder_text_shape(pipe)), np.float32)}
    cond = {"image_embed": np.asarray(image_embed, np.float32), **{k: v for k, v in text.items() if k != "text_embed"}}
    empty = pipe.encode_text([""]) if plan.uncond_text == "empty_prompt" else None
    keep = {"image_keep": 1.0, "text_keep": 0.0 if "text_embed" not in text else 1.0}
    halves = guidance_halves(plan, cond, keep, np.arange(n), empty)
    return stage_denoiser(plan, pipe.engines, schedule, halves.cond, halves.uncond, guidance)


def _decoder_text_shape(pipe) -> tuple[int, ...]:
    spec = pipe.manifest.graphs[pipe.decoder_plan.graph]
    enc = next((t for t in spec.inputs if t.name == "text_encodings"), None)
    return tuple(enc.shape[1:]) if enc is not None else (0,)


def _steps(callback: Callback | None, stage: str, total: int):
    """A sampler's or ``ddim_invert`` 's per-step callback (i, x, x0) as the pipeline's progress callback
    (stage, step, total, x0); the pipeline's may raise to stop the operation (a cancelled request)."""
    if callback is None:
        return None
    return lambda i, x, x0: callback(stage, i + 1, total, x0)


def _decoder_run(pipe, decoder_steps, decoder_guidance) -> dict:
    """The resolved settings of an operation (``Pipeline.settings``): its decoder steps (by default the folder's
    ``operation_steps``, else its ``steps``) and guidance (``DEFAULT_GUIDANCE`` by default, not the folder's),
    DDIM. A step-distilled decoder samples in few steps but inverts poorly in them (the bundled 3-step decoder:
    reconstruction 82.5 % fully right in 3 steps, 100 % in 6), so its folder names more for the operations."""
    guidance = DEFAULT_GUIDANCE if decoder_guidance is None else decoder_guidance
    if decoder_steps is None:
        decoder_steps = pipe.decoder_plan.defaults.get("operation_steps")
    return pipe.settings(decoder_steps=decoder_steps, decoder_guidance=guidance, sampler="ddim")


def invert(pipe, images, *, captions: Sequence[str] | None = None, decoder_steps: int | None = None,
           decoder_guidance: float | None = None, refine: int = DEFAULT_REFINE,
           callback: Callback | None = None) -> Inversion:
    """Images (one PIL image or path, or a list) as (z_i, x_T): the image encoder's embedding and the decoder
    latent ``ddim_invert`` finds for the image at the decoder's size, conditioned on that embedding.
    ``decode(pipe, inv)`` gives the images back (up to the fixed point's convergence and the SR stage).
    ``callback``: the pipeline's progress callback, stage "inversion" once per step."""
    run = _decoder_run(pipe, decoder_steps, decoder_guidance)
    embed, target = encode_images(pipe, _as_list(images))
    text = None if captions is None else pipe.encode_text(_as_list(captions))
    if text is not None and len(text["text_embed"]) != len(embed):
        raise InputError(f"{len(text['text_embed'])} captions for {len(embed)} images")
    inv = Inversion(embed, np.zeros_like(target), target, run["decoder"]["steps"], run["decoder"]["guidance"], text)
    return dataclasses.replace(inv, latent=invert_targets(pipe, inv, refine=refine, callback=callback))


def invert_targets(pipe, inv: Inversion, *, refine: int = DEFAULT_REFINE,
                   callback: Callback | None = None) -> np.ndarray:
    """The decoder latents (N, C, h, w) float32 of ``inv.target`` conditioned on ``inv.image_embed`` over
    ``inv.steps`` DDIM steps at ``inv.guidance`` (``inv.latent`` unused): ``ddim_invert`` on the decoder."""
    refine = check_int("refine", refine, 0, MAX_REFINE)
    plan = pipe.decoder_plan
    schedule = respace(plan.abar, inv.steps, plan.spacing, betas=plan.betas)
    denoise = _decoder_denoiser(pipe, inv.image_embed, schedule, inv.guidance, inv.text)
    return ddim_invert(denoise, np.asarray(inv.target, np.float32), schedule, refine=refine,
                       callback=_steps(callback, "inversion", len(schedule))).astype(np.float32)


def from_prompt(pipe, prompt: str, *, seed: int, index: int = 0, decoder_steps: int | None = None,
                decoder_guidance: float | None = None, callback: Callback | None = None) -> Inversion:
    """A prompt as an ``Inversion`` without inverting anything: z_i from the prior, x_T the decoder's own draw
    for (seed, ``index``) (noise.py), and as target what they decode to (no text, as every operation decodes)."""
    run = _decoder_run(pipe, decoder_steps, decoder_guidance)
    z = pipe.prior(pipe.encode_text([check_prompts(prompt)[0]]), seed=seed, indices=[index],
                   callback=callback)  # (1, D)
    x_T = NoiseStreams(seed, [index], DECODER).standard_normal((1, *pipe.decoder_plan.x_shape))
    steps, guidance = run["decoder"]["steps"], run["decoder"]["guidance"]
    target = decode(pipe, z, x_T, steps=steps, guidance=guidance, upsample=False, callback=callback)
    return Inversion(z, x_T, target, steps, guidance)


def decode(pipe, image_embed: np.ndarray, latent: np.ndarray, *, steps: int, guidance: float | None,
           text: dict[str, np.ndarray] | None = None, eta: float = 0.0, seed: int = 0,
           indices: Sequence[int] | None = None, sr_steps: int | None = None, upsample: bool = True,
           callback: Callback | None = None) -> np.ndarray:
    """Decode rows (image_embed (N, D), x_T (N, C, h, w)) with DDIM (η ``eta``) then the SR stages: the final
    images (N, C, H, W) in the pixel range (``upsample`` False: the decoder's samples). ``text``: the decoder's
    text conditioning rows (``Pipeline.encode_text``, one per row), None: none (the learned null text).

    Noise follows the seed contract (noise.py): row r draws from the streams of (seed, ``indices[r]``), the
    decoder's stream for η > 0 and the SR stages' own.
    """
    if not 0 <= eta <= 1 or not np.isfinite(eta):
        raise InputError(f"eta must be a number in 0 … 1, got {eta!r}")
    n = len(latent)
    indices = np.arange(n) if indices is None else np.asarray(indices)
    plan = pipe.decoder_plan
    schedule = respace(plan.abar, _decoder_run(pipe, steps, guidance)["decoder"]["steps"], plan.spacing,
                       betas=plan.betas)
    denoise = _decoder_denoiser(pipe, image_embed, schedule, guidance, text)
    rng = NoiseStreams(seed, indices, DECODER) if eta > 0 else None
    x = sample_ddim(denoise, np.asarray(latent, np.float32), schedule, rng=rng, eta=eta,
                    callback=_steps(callback, "decoder", len(schedule)))
    if not upsample:
        return x
    return pipe.upsample(x, seed=seed, indices=indices, sr_steps=sr_steps, callback=callback)


def _inversion(pipe, image, steps, guidance, refine, captions=None, callback=None) -> Inversion:
    return image if isinstance(image, Inversion) else invert(pipe, image, captions=captions, decoder_steps=steps,
                                                             decoder_guidance=guidance, refine=refine,
                                                             callback=callback)


def _settings_meta(inv: Inversion) -> dict:
    return {"sampler": "ddim", "steps": f"decoder={inv.steps}", "guidance": f"decoder={inv.guidance}"}


def reconstruct(pipe, image, *, seed: int = 0, decoder_steps: int | None = None,
                decoder_guidance: float | None = None, refine: int = DEFAULT_REFINE,
                callback: Callback | None = None) -> list[Image.Image]:
    """Each image (or an ``Inversion``) decoded from its own (z_i, x_T) with η = 0: the images again."""
    inv = _inversion(pipe, image, decoder_steps, decoder_guidance, refine, callback=callback)
    x = decode(pipe, inv.image_embed, inv.latent, steps=inv.steps, guidance=inv.guidance, text=inv.text, seed=seed,
               callback=callback)
    return pipe.to_pil(x, _text([{"operation": "reconstruct", "seed": seed, "index": j, **_settings_meta(inv)}
                               for j in range(len(inv))]))


def vary(pipe, image, *, num_images: int = 1, eta: float = 1.0, seed: int | None = None,
         decoder_steps: int | None = None, decoder_guidance: float | None = None,
         refine: int = DEFAULT_REFINE, callback: Callback | None = None) -> list[Image.Image]:
    """The paper's variations of one image: its (z_i, x_T) decoded with DDIM η > 0, image j drawing its noise
    from (seed, j) (η = 0 would give the reconstruction every time)."""
    s = Settings(num_images=num_images, seed=seed)
    seed = new_seed() if s.seed is None else s.seed
    inv = _inversion(pipe, image, decoder_steps, decoder_guidance, refine, callback=callback)[0]
    rows = np.zeros(s.num_images, int)
    text = None if inv.text is None else {k: v[rows] for k, v in inv.text.items()}
    x = decode(pipe, inv.image_embed[rows], inv.latent[rows], steps=inv.steps, guidance=inv.guidance, text=text,
               eta=eta, seed=seed, indices=range(s.num_images), callback=callback)
    return pipe.to_pil(x, _text([{"operation": "variation", "eta": eta, "seed": seed, "index": j,
                                **_settings_meta(inv)} for j in range(s.num_images)]))


def edit_embeddings(image_embed: np.ndarray, direction: np.ndarray, amounts: Sequence[float]) -> np.ndarray:
    """slerp(z_i, z_d, θ) for each θ of ``amounts``: (len(amounts), D) float32, unit vectors."""
    return slerp(np.asarray(image_embed).ravel(), np.asarray(direction).ravel(), list(amounts))


def edit(pipe, image, source: str, target: str, *, amount=DEFAULT_AMOUNT, seed: int = 0, text: bool = True,
         decoder_steps: int | None = None, decoder_guidance: float | None = None,
         edit_guidance: float | None = None, refine: int = DEFAULT_REFINE,
         callback: Callback | None = None) -> list[Image.Image]:
    """The text diff of one image (or a one-row ``Inversion``) from caption ``source`` towards ``target``: for
    each θ of ``amount`` (one number or several, the frames of a sweep) decode (slerp(z_i, z_d, θ), x_T) with
    z_d = normalise(z_t − z_t0) and the image's own inverted x_T, η = 0.

    decoder_guidance: the inversion's (``DEFAULT_GUIDANCE``, unguided, by default: exact to the fixed point);
    edit_guidance: the edited frames' decoding (by default the folder's generation guidance: the unguided
    decoder keeps redrawing the old shape from x_T; python -m bench.operations). At edit_guidance equal to the
    inversion's and θ = 0 without text, a frame is the reconstruction.

    text: also condition the decoder on the captions: an image given as pixels is inverted with ``source`` 's
    text, and every frame of an inversion made with captions is decoded with ``target`` 's (θ = 0 is then the
    image redrawn under the target caption; python -m bench.operations finds it edits more often). With
    False, or an inversion made without captions, θ = 0 is the reconstruction."""
    amounts = check_amounts(amount)
    source, target = check_prompts(source)[0], check_prompts(target)[0]
    inv = _inversion(pipe, image, decoder_steps, decoder_guidance, refine, [source] if text else None, callback)[0]
    captions = pipe.encode_text([source, target])
    z_t0, z_t = captions["text_embed"]
    z = edit_embeddings(inv.image_embed, text_direction(z_t, z_t0), amounts)  # (A, D)
    rows = np.ones(len(amounts), int)  # the target caption's row
    guidance = edit_guidance_of(pipe, edit_guidance)
    x = decode(pipe, z, np.repeat(inv.latent, len(amounts), 0), steps=inv.steps, guidance=guidance,
               text=None if inv.text is None else {k: v[rows] for k, v in captions.items()}, seed=seed,
               indices=np.zeros(len(amounts), int), upsample=False, callback=callback)
    x = pipe.upsample(x, seed=seed, indices=np.zeros(len(x), int), callback=callback)
    meta = {**_settings_meta(inv), "guidance": f"inversion={inv.guidance},decoder={guidance}"}
    return pipe.to_pil(x, _text([{"operation": "edit", "source": source, "target": target, "amount": a,
                                "seed": seed, "index": j, **meta} for j, a in enumerate(amounts)]))


def edit_guidance_of(pipe, edit_guidance: float | None) -> float:
    """The decoding guidance of an edit: ``edit_guidance``, else the folder's decoder guidance (checked as every
    guidance is: ``Pipeline.settings``)."""
    return float(pipe.settings(decoder_guidance=edit_guidance)["decoder"]["guidance"])


def interpolation_rows(a: Inversion, b: Inversion, thetas: np.ndarray, latent: str,
                       fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image_embed (F, D), x_T (F, C, h, w)) of each frame: z = slerp(z_a, z_b, θ); x_T = slerp(x_Ta, x_Tb, θ)
    (``latent="slerp"``: the endpoints are the two reconstructions) or ``fixed`` (C, h, w) for every frame."""
    if latent not in LATENT_MODES:
        raise InputError(f"latent must be one of {', '.join(LATENT_MODES)}, got {latent!r}")
    z = slerp(a.image_embed[0], b.image_embed[0], thetas)
    if latent == "slerp":
        x_T = slerp(a.latent[0], b.latent[0], thetas)
    else:
        x_T = np.repeat(np.asarray(fixed, np.float32)[None], len(thetas), 0)
    return z, x_T


def interpolate(pipe, a, b, *, frames: int = 5, latent: str = "slerp", seed: int = 0,
                decoder_steps: int | None = None, decoder_guidance: float | None = None,
                refine: int = DEFAULT_REFINE, callback: Callback | None = None) -> list[Image.Image]:
    """``frames`` images along slerp(z_a, z_b, θ), θ = 0 … 1, between two images (PIL, paths or one-row
    ``Inversion`` s). latent="slerp": x_T slerped between the two inverted latents (θ = 0 and 1 reconstruct a
    and b); "fixed": one x_T drawn from (seed, 0) for every frame, as the paper's second option."""
    thetas = frame_thetas(frames)
    inv_a = _inversion(pipe, a, decoder_steps, decoder_guidance, refine, callback=callback)[0]
    inv_b = _inversion(pipe, b, inv_a.steps, inv_a.guidance, refine, callback=callback)[0]
    if (inv_a.steps, inv_a.guidance) != (inv_b.steps, inv_b.guidance):
        raise InputError("the two inversions were made with different decoder steps or guidance")
    fixed = None
    if latent == "fixed":
        fixed = NoiseStreams(seed, [0], DECODER).standard_normal((1, *pipe.decoder_plan.x_shape))[0]
    z, x_T = interpolation_rows(inv_a, inv_b, thetas, latent, fixed)
    if inv_a.text is not None or inv_b.text is not None:
        raise InputError("interpolation decodes without text: give inversions made without captions")
    x = decode(pipe, z, x_T, steps=inv_a.steps, guidance=inv_a.guidance, seed=seed,
               indices=np.zeros(len(thetas), int), callback=callback)
    return pipe.to_pil(x, _text([{"operation": "interpolate", "latent": latent, "theta": round(float(t), 6),
                                "seed": seed, "index": j, **_settings_meta(inv_a)} for j, t in enumerate(thetas)]))


def _text(meta: list[dict]) -> list[dict[str, str]]:
    """PNG text chunks: every value as a string."""
    return [{k: str(v) for k, v in m.items()} for m in meta]


def _as_list(x) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]
