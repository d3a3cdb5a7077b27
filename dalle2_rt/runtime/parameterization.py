"""The one adapter between an engine's native prediction and the sampler's denoiser contract.

An exported graph predicts one of (its ``kind`` is stated once, in the manifest):

- ``eps``: the noise ε,
- ``x0``:  the clean sample x0,
- ``v``:   v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022, progressive distillation),

for x_t = √ᾱ x0 + √(1−ᾱ) ε. Samplers only ever see ``denoise(x_t, i) -> x0``; this module builds that
function from an engine call, and it is the only place that stacks the classifier-free-guidance batch
(``stack_halves``: conditional rows first, unconditional second) and splits the prediction again.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .samplers import Denoiser, ddpm_variances
from .schedules import Schedule

KINDS = ("eps", "x0", "v")

Model = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x_batch (N, ...), t_batch (N,) float32) -> pred (N, ...)
# model(i, x_t=(N, ...), t=(N,) float32, **feeds) -> pred (N, ...), for sampling step i; N = B or 2B (guided)
StepModel = Callable[..., np.ndarray]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; known: {', '.join(KINDS)}")


def _coefficients(abar: float | np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(√ᾱ, √(1−ᾱ)) in float64, with a per-sample ᾱ (B,) broadcast over the trailing ``ndim - 1`` axes."""
    abar = np.asarray(abar, dtype=np.float64)
    if abar.ndim:
        abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def _out_dtype(pred: np.ndarray, x_t: np.ndarray) -> np.dtype:
    # float16 engine output with float32 x_t -> float32; never float64 unless an input was.
    return np.result_type(np.asarray(pred).dtype, np.asarray(x_t).dtype)


def to_x0(pred: np.ndarray, x_t: np.ndarray, abar: float | np.ndarray, kind: str) -> np.ndarray:
    """x0 from a prediction of ``kind``; math in float64, output in the inputs' dtype.

    eps: x0 = (x_t − √(1−ᾱ) ε) / √ᾱ  (Eq. 4 of Ho et al. 2020 solved for x0)
    v:   x0 = √ᾱ x_t − √(1−ᾱ) v
    """
    _check_kind(kind)
    dtype = _out_dtype(pred, x_t)
    if kind == "x0":
        return np.asarray(pred).astype(dtype, copy=False)
    p, x = np.asarray(pred, np.float64), np.asarray(x_t, np.float64)
    a, s = _coefficients(abar, x.ndim)
    x0 = (x - s * p) / a if kind == "eps" else a * x - s * p
    return x0.astype(dtype)


def to_eps(pred: np.ndarray, x_t: np.ndarray, abar: float | np.ndarray, kind: str) -> np.ndarray:
    """ε from a prediction of ``kind``; math in float64, output in the inputs' dtype.

    x0: ε = (x_t − √ᾱ x0) / √(1−ᾱ)  (undefined at ᾱ = 1, which no sampling step has)
    v:  ε = √(1−ᾱ) x_t + √ᾱ v
    """
    _check_kind(kind)
    dtype = _out_dtype(pred, x_t)
    if kind == "eps":
        return np.asarray(pred).astype(dtype, copy=False)
    p, x = np.asarray(pred, np.float64), np.asarray(x_t, np.float64)
    a, s = _coefficients(abar, x.ndim)
    eps = (x - a * p) / s if kind == "x0" else s * x + a * p
    return eps.astype(dtype)


def to_v(pred: np.ndarray, x_t: np.ndarray, abar: float | np.ndarray, kind: str) -> np.ndarray:
    """v = √ᾱ ε − √(1−ᾱ) x0 from a prediction of ``kind`` (for exporters and tests)."""
    _check_kind(kind)
    dtype = _out_dtype(pred, x_t)
    if kind == "v":
        return np.asarray(pred).astype(dtype, copy=False)
    p, x = np.asarray(pred, np.float64), np.asarray(x_t, np.float64)
    a, s = _coefficients(abar, x.ndim)
    # With x_t = a x0 + s ε and a² + s² = 1:  v = (a x_t − x0) / s = (ε − s x_t) / a.
    v = (a * x - p) / s if kind == "x0" else (p - s * x) / a
    return v.astype(dtype)


def stack_halves(cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The classifier-free-guidance batch: every input as concat([conditional (B, ...), unconditional (B, ...)])
    = (2B, ...). ``uncond`` has the same keys (the ``*_keep`` inputs at 0, or another prompt's text)."""
    return {k: np.concatenate([v, uncond[k]]) for k, v in cond.items()}


def split_halves(stacked: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inverse of ``stack_halves``: (conditional, unconditional) halves of (2B, ...) arrays."""
    half = {k: len(v) // 2 for k, v in stacked.items()}
    return {k: v[:half[k]] for k, v in stacked.items()}, {k: v[half[k]:] for k, v in stacked.items()}


def make_denoiser(
    model: Model,
    *,
    kind: str,
    schedule: Schedule,
    guidance_scale: float | None = None,
    clip_x0: tuple[float, float] | None = None,
    learned_variance: bool = False,
) -> Denoiser:
    """``make_step_denoiser`` for a model that closes over its conditioning: ``model(x_batch, t_batch)``.

    Under guidance (a number ``guidance_scale``) the closure must already hold its conditioning stacked as
    ``stack_halves`` does, conditional half first; prefer ``make_step_denoiser`` with ``cond`` / ``uncond``,
    which stacks it here.
    """
    return make_step_denoiser(lambda i, x_t, t: model(x_t, t), kind=kind, schedule=schedule, cond={},
                              uncond=None if guidance_scale is None else {}, guidance_scale=guidance_scale,
                              clip_x0=clip_x0, learned_variance=learned_variance)


def make_step_denoiser(
    model: StepModel,
    *,
    kind: str,
    schedule: Schedule,
    cond: dict[str, np.ndarray],
    uncond: dict[str, np.ndarray] | None = None,
    guidance_scale: float | None = None,
    clip_x0: tuple[float, float] | None = None,
    learned_variance: bool = False,
) -> Denoiser:
    """Wrap a graph call into the sampler contract ``denoise(x_t, i) -> x0``.

    model: ``model(i, x_t=x_batch, t=t_batch, **feeds) -> pred`` for sampling step i (so the caller can run
        another graph for some step without mapping t back to i). ``t_batch`` is float32 (N,) filled with
        ``schedule.timesteps[i]`` (the model's training timestep, not i).
    kind: the graph's native prediction, ``eps``, ``x0`` or ``v`` (from the manifest).
    cond: the conditioning inputs (B, ...) each, fed at every step.
    uncond / guidance_scale: both given = classifier-free guidance with scale g: one call of batch 2B on
        ``concat([x_t, x_t])`` with ``stack_halves(cond, uncond)`` (stacked once, here), and the
        prediction ``pred_u + g (pred_c − pred_u)``. Either None = unguided, one call of batch B on
        ``cond``. g = 1 still runs 2B; a caller that wants the conditional branch alone passes no uncond.
    clip_x0: None, or (lo, hi) clamp of the x0 estimate, applied after guidance (pixel stages: (−1, 1)).
    learned_variance: the model outputs 2C channels on axis 1, (native prediction, v) with v ∈ [−1, 1]
        the "learned_range" interpolation of Nichol & Dhariwal 2021 Eq. 15 (karlo / diffusers UnCLIP).
        The denoiser then returns ``(x0, log_variance)`` with log σ² = f log β_i + (1 − f) log β̃_i,
        f = (v + 1)/2, β and β̃ of the (respaced) schedule; under guidance the conditional half's v is
        used, as karlo and diffusers' UnCLIPPipeline do. ``sample_ddpm`` uses it; DDIM / DPM++ ignore it.

    Why guidance combines native predictions: to_x0 and to_eps are affine in ``pred`` with the same x_t,
    and the guidance weights (1 − g, g) sum to 1, so guiding eps, x0 or v gives the same x0 in exact
    arithmetic. Combining on the native output (eps as in GLIDE / karlo, x0 for the x0-prior) is where those
    references put it, so the remaining difference is float rounding; it clamps only the guided x0 (clamping
    each half first does not commute with extrapolation, g > 1); and it leaves the learned-variance
    channels out of the combination.
    """
    _check_kind(kind)
    guided = guidance_scale is not None and uncond is not None
    g = float(guidance_scale) if guided else 1.0
    feeds = stack_halves(cond, uncond) if guided else dict(cond)  # (2B, ...) or (B, ...)
    if clip_x0 is not None:
        lo, hi = (float(c) for c in clip_x0)
        if not lo < hi:
            raise ValueError(f"clip_x0 must be (lo, hi) with lo < hi, got {clip_x0}")
    if learned_variance:
        betas, posterior_variance = ddpm_variances(schedule)
        log_beta = np.log(betas)
        # β̃ = 0 on the last step (ᾱ_prev = 1); that step adds no noise, the floor only avoids log(0).
        log_posterior = np.log(np.maximum(posterior_variance, 1e-20))

    def denoise(x_t: np.ndarray, i: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        batch = x_t.shape[0]
        x_in = np.concatenate([x_t, x_t], axis=0) if guided else x_t  # (2B, ...) or (B, ...)
        t = np.full((x_in.shape[0],), schedule.timesteps[i], dtype=np.float32)
        out = np.asarray(model(i, x_t=x_in, t=t, **feeds))
        if out.shape[0] != x_in.shape[0]:
            raise ValueError(f"model returned batch {out.shape[0]} for an input batch of {x_in.shape[0]}")
        if learned_variance:
            channels = out.shape[1] // 2
            out, var_values = out[:, :channels], out[:, channels:]  # (N, C, ...) each
            var_values = var_values[:batch]  # conditional half under guidance
        dtype = _out_dtype(out, x_t)
        if guided:
            pred_c, pred_u = out[:batch], out[batch:]  # the halves stack_halves made
            # float64 until x0 is formed: a float32 rounding of pred_c − pred_u would be magnified g× (g ~ 4-10).
            pred = pred_u.astype(np.float64) + g * (pred_c.astype(np.float64) - pred_u)
        else:
            pred = out
        x0 = to_x0(pred, x_t, schedule.alphas_cumprod[i], kind).astype(dtype, copy=False)
        if clip_x0 is not None:
            x0 = np.clip(x0, lo, hi)
        if not learned_variance:
            return x0
        frac = (var_values.astype(np.float64) + 1.0) / 2.0
        log_variance = frac * log_beta[i] + (1.0 - frac) * log_posterior[i]
        return x0, log_variance

    return denoise
