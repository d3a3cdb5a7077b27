"""Samplers: plain numpy functions over arrays, shared by every backend.

Each ``sample_X(denoise, x, schedule, *, rng, callback, ...)`` walks a (respaced) ``Schedule`` from its
noisiest step to ᾱ = 1 and returns the clean sample. The contract:

- ``denoise(x_t, i) -> x0`` for sampling step i (built by ``parameterization.make_denoiser``, which owns
  the eps/x0/v conversion, clamping and classifier-free guidance; a sampler knows none of them). A denoiser
  may instead return ``(x0, log_variance)`` (a learned variance, see ``make_denoiser``): ``sample_ddpm``
  uses it, DDIM and DPM-Solver++ ignore it.
- all noise comes from the injected ``rng`` as float32 ``rng.standard_normal``; no hidden state.
- ``callback(i, x, x0)`` after step i, with x the updated sample and x0 the estimate step i used.
- step coefficients are float64; each update is formed in float64 and ``x`` is stored back in its own dtype.

Notation: ᾱ_i = ``schedule.alphas_cumprod[i]``, ᾱ'_i = ``alphas_cumprod_prev[i]`` (ᾱ of the next, less
noisy step; 1.0 after the last), α_i = √ᾱ_i, σ_i = √(1−ᾱ_i).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .schedules import Schedule

Denoiser = Callable[[np.ndarray, int], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
Callback = Callable[[int, np.ndarray, np.ndarray], None]


def ddpm_variances(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """(β_i, β̃_i) of the respaced chain, float64 (S,).

    β_i = 1 − ᾱ_i/ᾱ'_i (the single-step beta between consecutive sampling steps, guided-diffusion
    ``respace.py``; or ``schedule.betas`` where the schedule records them, see ``schedules.respace``) and
    β̃_i = (1 − ᾱ'_i)/(1 − ᾱ_i) β_i, the posterior variance (Eq. 7 of Ho et al. 2020); β̃ = 0 on the last step.
    """
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    betas = 1.0 - abar / abar_prev if schedule.betas is None else np.asarray(schedule.betas, np.float64)
    return betas, (1.0 - abar_prev) / (1.0 - abar) * betas


def _denoise(denoise: Denoiser, x: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Call the denoiser; returns (x0 as float64, log_variance or None)."""
    out = denoise(x, i)
    if isinstance(out, tuple):
        x0, log_variance = out
        return np.asarray(x0, np.float64), np.asarray(log_variance, np.float64)
    return np.asarray(out, np.float64), None


def sample_ddpm(
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    *,
    rng: np.random.Generator,
    callback: Callback | None = None,
    variance: str = "small",
) -> np.ndarray:
    """Ancestral sampling (Ho et al. 2020) over a possibly respaced schedule.

    x_{i+1} = μ̃(x_i, x0) + σ_i z, with the posterior mean (Eq. 7)
        μ̃ = √ᾱ'_i β_i / (1 − ᾱ_i) · x0 + √(1 − β_i) (1 − ᾱ'_i) / (1 − ᾱ_i) · x_i,
    σ_i² = β̃_i (``variance="small"``) or β_i (``"large"``), or exp(log_variance) when the denoiser returns
    one (``variance`` is then unused). No noise on the last step, where μ̃ = x0.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; known: small, large")
    if rng is None:
        raise ValueError("sample_ddpm needs an rng")
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    betas, posterior_variance = ddpm_variances(schedule)
    coef_x0 = np.sqrt(abar_prev) * betas / (1.0 - abar)
    coef_xt = np.sqrt(abar / abar_prev) * (1.0 - abar_prev) / (1.0 - abar)  # √(1−β) without 1 − (1 − ·)
    fixed_std = np.sqrt(posterior_variance if variance == "small" else betas)
    x = np.asarray(x)
    for i in range(len(schedule)):
        x0, log_variance = _denoise(denoise, x, i)
        x_next = coef_x0[i] * x0 + coef_xt[i] * x.astype(np.float64)
        if abar_prev[i] < 1.0:  # every step but the one that reaches the clean sample
            std = fixed_std[i] if log_variance is None else np.exp(0.5 * log_variance)
            x_next += std * rng.standard_normal(x.shape, dtype=np.float32)
        x = x_next.astype(x.dtype)
        if callback is not None:
            callback(i, x, x0.astype(x.dtype))
    return x


def sample_ddim(
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    *,
    rng: np.random.Generator | None = None,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> np.ndarray:
    """DDIM (Eq. 12 of Song et al. 2021):

        x_{i+1} = √ᾱ'_i x0 + √(1 − ᾱ'_i − s_i²) ε̂ + s_i z,   ε̂ = (x_i − √ᾱ_i x0) / √(1 − ᾱ_i),
        s_i = η √((1 − ᾱ'_i)/(1 − ᾱ_i)) √(1 − ᾱ_i/ᾱ'_i)   (Eq. 16).

    η = 0 is deterministic (``rng`` unused, may be None); η = 1 gives s_i² = β̃_i, the ancestral sampler
    (same draws from ``rng`` as ``sample_ddpm(variance="small")``). For η > 1 the ε̂ weight is clamped at 0.
    ε̂ is re-derived from the (possibly clamped) x0, as guided-diffusion does.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and rng is None:
        raise ValueError("sample_ddim with eta > 0 needs an rng")
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    if schedule.update_abar is None:
        _, posterior_variance = ddpm_variances(schedule)
    else:  # the update's own ᾱ (``Schedule.update_abar``); x0 and ε still convert at ``alphas_cumprod``
        up = schedule.update_abar
        abar_prev = np.append(up[1:], schedule.final_abar)
        with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ_{−1} = 1 at t = 0: that step adds no noise
            posterior_variance = np.where(up < 1.0, (1.0 - abar_prev) / (1.0 - up) * (1.0 - up / abar_prev), 0.0)
    sigma = eta * np.sqrt(posterior_variance)  # (S,): Eq. 16 is η √β̃
    eps_weight = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))
    x = np.asarray(x)
    for i in range(len(schedule)):
        x0, _ = _denoise(denoise, x, i)
        eps = (x.astype(np.float64) - np.sqrt(abar[i]) * x0) / np.sqrt(1.0 - abar[i])
        x_next = np.sqrt(abar_prev[i]) * x0 + eps_weight[i] * eps
        if sigma[i] > 0:  # 0 on the last step (ᾱ' = 1) and everywhere for η = 0
            x_next += sigma[i] * rng.standard_normal(x.shape, dtype=np.float32)
        x = x_next.astype(x.dtype)
        if callback is not None:
            callback(i, x, x0.astype(x.dtype))
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    *,
    rng: np.random.Generator | None = None,
    callback: Callback | None = None,
) -> np.ndarray:
    """DPM-Solver++(2M) (Alg. 2 of Lu et al. 2022), deterministic; ``rng`` is accepted and unused.

    In λ = log(α/σ), with h_i = λ_{i+1} − λ_i and D the data-prediction estimate,
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i,
        D_i = x0_i on the first step, else (1 + 1/(2 r_i)) x0_i − 1/(2 r_i) x0_{i−1}, r_i = h_{i−1}/h_i.
    The last step goes to ᾱ = 1 (σ = 0, λ = ∞): first order there (the paper's lower_order_final; the
    second-order weights diverge as h → ∞), so the result is the last x0 estimate.
    One denoiser call per step.
    """
    abar = schedule.alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # λ_i = log(α_i/σ_i), increasing
    x = np.asarray(x)
    last = len(schedule) - 1
    x0_prev, h_prev = None, None
    for i in range(len(schedule)):
        x0, _ = _denoise(denoise, x, i)
        if i == last:
            x_next = x0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                half_inv_r = h / (2.0 * h_prev)  # 1/(2r)
                d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
            x_next = (sigma[i + 1] / sigma[i]) * x.astype(np.float64) - alpha[i + 1] * np.expm1(-h) * d
            x0_prev, h_prev = x0, h
        x = x_next.astype(x.dtype)
        if callback is not None:
            callback(i, x, x0.astype(x.dtype))
    return x


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++": sample_dpmpp_2m,
}


def sample(
    name: str,
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    *,
    rng: np.random.Generator | None,
    callback: Callback | None = None,
    **options,
) -> np.ndarray:
    """Run the sampler called ``name`` (a key of ``SAMPLERS``); ``options`` go to it (eta, variance)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](denoise, x, schedule, rng=rng, callback=callback, **options)
