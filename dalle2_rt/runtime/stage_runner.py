"""One sampling stage over all images of a call, in chunks that fit the graphs' batch profiles.

    x = run_stage(plan, engines, opts, conditioning, streams, callback=callback)   # (N·k, *plan.x_shape)

A stage is conditioned by rows: ``Conditioning.cond`` holds its inputs once per conditioning row (a prompt
for the prior, an image for the decoder and SR stages) and ``rows`` says which conditioning row each sampled
row uses (image n owns the k consecutive sampled rows n·k … n·k+k−1, k = ``streams.rows``, the prior's
candidates). The stage then:

1. runs a ``prefix_cache`` stage's ``prefix_graph`` once per conditioning row and guidance half (one prompt's
   text keys and values serve all of its images and candidates at every step);
2. splits the images into chunks whose rows (×2 under guidance) fit the step graphs' max batch;
3. per chunk: draws x_T from the images' streams, builds the denoiser (``parameterization``: guidance
   stacking, prediction kind, clamp) over the step graph, or ``last_graph`` at the last step, and runs the
   sampler.

Every graph call is checked: a NaN or inf output stops the run with ``NonFiniteError`` naming the stage and
the step. ``callback(stage, step, total, x0)`` numbers steps across chunks (chunk c's step i is
c·S + i + 1 of chunks·S).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InputError, NonFiniteError
from .parameterization import make_step_denoiser, split_halves, stack_halves
from .plan import StagePlan
from .samplers import sample
from .schedules import respace
from .settings import ONE_STEP_SAMPLERS
from .stages import sampler_options

# callback(stage, step, total, x0): after every sampling step (x0 = the step's clean estimate, batch order)
# and once after each encoder (step = total = 1, x0 None).
Callback = Callable[[str, int, int, "np.ndarray | None"], None]
# choose(x0 (n·k, ...), images slice) -> (n,) the row of each image's k to finish (early candidate choice)
Chooser = Callable[[np.ndarray, slice], np.ndarray]


@dataclass(frozen=True)
class Conditioning:
    """What a stage is conditioned on, per conditioning row."""

    cond: dict[str, np.ndarray]  # (R, ...) each: the conditional inputs, ``*_keep`` included
    rows: np.ndarray  # (N·k,) int: the conditioning row of each sampled row
    uncond: dict[str, np.ndarray] | None = None  # (R, ...), same keys: the unconditional half; None: unguided


def guidance_halves(plan: StagePlan, cond: dict[str, np.ndarray], keep: dict[str, float], rows: np.ndarray,
                    empty: dict[str, np.ndarray] | None = None, *, negative: dict[str, np.ndarray] | None = None,
                    text_keep: str | None = None) -> Conditioning:
    """A guided stage's conditioning: ``cond`` (R rows) with the ``*_keep`` inputs ``keep`` (1 or 0 each) as the
    conditional half; the unconditional half has every keep at 0 and, for a stage with ``uncond_text:
    empty_prompt``, the empty prompt's text ``empty`` (1 row each) in place of the prompt's.

    negative: a negative prompt's text (``Pipeline.encode_text``, 1 row): the unconditional half reads it in
    place of the prompt's (or the empty prompt's), with the text's keep input ``text_keep`` at 1, so guidance
    moves away from it: pred_neg + w (pred_c − pred_neg)."""
    r = len(next(iter(cond.values())))
    cond = {**cond, **{name: np.full(r, value, np.float32) for name, value in keep.items()}}
    uncond = {**cond, **{name: np.zeros(r, np.float32) for name in keep}}
    if negative is not None:
        uncond.update({name: np.repeat(v, r, 0) for name, v in negative.items() if name in cond})
        if text_keep in keep:
            uncond[text_keep] = np.ones(r, np.float32)
    elif plan.uncond_text == "empty_prompt":
        uncond.update({name: np.repeat(v, r, 0) for name, v in empty.items()})
    return Conditioning(cond=cond, rows=rows, uncond=uncond)


def chunks(n: int, size: int | None) -> list[slice]:
    """0 … n−1 in slices of ``size`` (None: one slice)."""
    size = n if not size else size
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def call_checked(engine, stage: str, *, step: int | None = None, total: int | None = None,
                 timestep: int | None = None, **arrays) -> dict[str, np.ndarray]:
    """One engine call; any non-finite output stops the run naming the stage and step."""
    outs = engine(**arrays)
    for name, value in outs.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise NonFiniteError(stage, name, step, total, timestep)
    return outs


def call_chunked(engine, stage: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``engine`` over rows of ``arrays`` in chunks of its max batch; the outputs concatenated."""
    n = len(next(iter(arrays.values())))
    parts = [call_checked(engine, stage, **{k: v[c] for k, v in arrays.items()}) for c in chunks(n, engine.max_batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def run_stage(plan: StagePlan, engines: Mapping, opts: dict, conditioning: Conditioning, streams,
              callback: Callback | None = None, *, choose: Chooser | None = None,
              choose_at: int | None = None, x_T: np.ndarray | None = None) -> np.ndarray:
    """Sample stage ``plan`` for every image: (N·k, *plan.x_shape), the images' rows in order.

    engines: graph name -> engine (the pipeline's, looked up now); opts: the stage's resolved settings
    {"steps", "guidance", "sampler"}; streams: the stage's noise streams (``noise.NoiseStreams``, k rows
    per image), which x_T and the sampler draw from.

    Early choice (``choose`` and ``choose_at`` = s with 0 < s < steps, k > 1): every row runs the first s
    steps; ``choose(x0, images)`` then picks one row of each image's k from the step-s clean estimate x0
    (n·k rows; returns (n,) ints in 0 … k−1), and only those rows run the remaining steps, so the result has
    one row per image (N, *plan.x_shape). The sampler must take one step at a time (DDIM, DDPM).

    x_T: the starting noise (N·k, *plan.x_shape) in place of the streams' draw. The streams still make that
    draw (and discard it), so the sampler's later draws are the same as without ``x_T``: passing the x_T the
    streams would have drawn gives the same samples.

    A guidance-distilled stage (``plan.guidance_input``) runs one row per sample with the scale fed as that
    input (1.0 when the stage is unguided); otherwise guidance stacks the conditional and unconditional rows.
    """
    g = opts["guidance"]
    cond, uncond = conditioning.cond, conditioning.uncond
    if plan.guidance_input:
        r = len(next(iter(cond.values())))
        cond = {**cond, plan.guidance_input: np.full(r, 1.0 if g is None else g, np.float32)}
        guided, uncond = False, None
    else:
        # g = 1: pred_u + 1·(pred_c − pred_u) = pred_c, so the conditional half alone (same prediction, half the work)
        guided = uncond is not None and g is not None and g != 1.0
        uncond = uncond if guided else None
    if plan.prefix_graph:
        cond, uncond = _prefix(plan, engines[plan.prefix_graph], cond, uncond)
    step_engine = engines[plan.step_graph or plan.graph]
    last_engine = engines[plan.last_graph] if plan.last_graph else step_engine
    schedule = respace(plan.abar, opts["steps"], plan.spacing, betas=plan.betas)
    total = len(schedule)
    k = streams.rows
    if x_T is not None and np.shape(x_T) != (len(conditioning.rows), *plan.x_shape):
        raise InputError(f"{plan.name}: initial latents of shape {np.shape(x_T)}, want "
                         f"{(len(conditioning.rows), *plan.x_shape)}")
    early = choose is not None and choose_at is not None and k > 1 and 0 < choose_at < total
    if early and opts["sampler"] not in ONE_STEP_SAMPLERS:
        raise InputError(f"{plan.name}: early candidate choice needs a one-step sampler "
                         f"({', '.join(ONE_STEP_SAMPLERS)}), not {opts['sampler']}")

    def model(i: int, **arrays) -> np.ndarray:
        engine = last_engine if i == total - 1 else step_engine
        out = call_checked(engine, plan.name, step=i + 1, total=total, timestep=int(schedule.timesteps[i]), **arrays)
        return out[plan.output]

    def run(x, rows, part, offset, rng, step_done):
        """The sampler over ``part`` (steps offset … of the schedule) for sampled rows ``rows``."""
        denoise = make_step_denoiser(
            lambda i, **arrays: model(i + offset, **arrays), kind=plan.kind, schedule=part,
            cond=_take(cond, rows, plan.inputs), uncond=None if uncond is None else _take(uncond, rows, plan.inputs),
            guidance_scale=g if guided else None, clip_x0=plan.clip_x0,
            learned_variance=plan.variance == "learned_range")
        return sample(opts["sampler"], denoise, x, part, rng=rng,
                      callback=lambda i, x_i, x0: step_done(i + offset, x0),
                      **sampler_options(opts["sampler"], plan.variance, plan.ddim_eta))

    parts = chunks(len(conditioning.rows) // k, _images_per_chunk(plan, (step_engine, last_engine), k, guided))
    results = []
    for c, images in enumerate(parts):
        rows = conditioning.rows[images.start * k:images.stop * k]
        rng = streams.subset(images)
        x = rng.standard_normal((len(rows), *plan.x_shape))  # x_T, drawn even when given (the seed contract)
        if x_T is not None:
            x = np.array(x_T[images.start * k:images.stop * k], np.float32)
        seen = {}

        def step_done(i, x0, c=c, seen=seen):
            seen["x0"] = x0
            if callback is not None:
                callback(plan.name, c * total + i + 1, len(parts) * total, x0)

        if early:
            head, tail = schedule.split(choose_at)
            x = run(x, rows, head, 0, rng, step_done)
            picked = np.arange(len(x) // k) * k + np.asarray(choose(seen["x0"], images))  # one row per image
            x, rows = x[picked], rows[picked]
            x = run(x, rows, tail, choose_at, rng.one_row(), step_done)
        else:
            x = run(x, rows, schedule, 0, rng, step_done)
        if not np.isfinite(x).all():
            raise NonFiniteError(plan.name, "x", total, total)
        results.append(x)
    return np.concatenate(results)


def _prefix(plan: StagePlan, engine, cond: dict, uncond: dict | None) -> tuple[dict, dict | None]:
    """The ``cache`` tensors of every conditioning row and half: ``prefix_graph`` over (2R or R rows), once."""
    def pick(arrays: dict) -> dict:
        return {k: v for k, v in arrays.items() if k in plan.prefix_inputs}

    arrays = pick(cond) if uncond is None else stack_halves(pick(cond), pick(uncond))  # (2R, ...): cond, uncond
    out = call_chunked(engine, plan.name, arrays)
    cache = {k: out[k] for k in plan.cache}  # (R or 2R, depth, heads, positions, d_head) for our prior
    return (cache, None) if uncond is None else split_halves(cache)


def _images_per_chunk(plan: StagePlan, engines, k: int, guided: bool) -> int | None:
    """The most images whose k rows (2k guided) fit every step graph's max batch (None: no limit)."""
    per_image = k * (2 if guided else 1)
    most = min((e.max_batch for e in engines if e.max_batch is not None), default=None)
    if most is None:
        return None
    if most < per_image:
        hint = " (ask for fewer candidates)" if k > 1 else ""
        raise InputError(f"{plan.name}: {per_image} rows per image exceed the graph's max batch {most}{hint}")
    return most // per_image


def _take(arrays: dict[str, np.ndarray], rows: np.ndarray, inputs) -> dict[str, np.ndarray]:
    """The inputs a graph takes, gathered to the sampled rows ``rows``: (len(rows), ...) each."""
    return {k: v[rows] for k, v in arrays.items() if k in inputs}
