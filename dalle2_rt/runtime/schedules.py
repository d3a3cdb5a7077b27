"""Noise schedules: float64 numpy arrays, built once, shared by training and every backend.

A schedule is described by ᾱ_t (``alphas_cumprod``) over the model's training timesteps
t = 0 … T-1. Respacing to fewer sampling steps selects a subset of timesteps and makes a new
``Schedule`` from it (guided-diffusion ``respace.py``); samplers never see the full chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """ᾱ_t of the cosine schedule (Eq. 17 of Nichol & Dhariwal 2021), betas clipped at ``max_beta``."""
    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(num_timesteps + 1, dtype=np.float64)
    betas = np.clip(1.0 - f(t[1:]) / f(t[:-1]), 0.0, max_beta)
    return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """ᾱ_t of the linear-beta schedule of Ho et al. 2020, scaled to ``num_timesteps``."""
    scale = 1000.0 / num_timesteps
    betas = np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def squaredcos_cap_v2_alphas_cumprod(num_timesteps: int) -> np.ndarray:
    """diffusers' ``squaredcos_cap_v2`` (the cosine schedule with s = 0.008, betas capped at 0.999)."""
    return cosine_alphas_cumprod(num_timesteps)


_BUILDERS = {
    "cosine": cosine_alphas_cumprod,
    "linear": linear_alphas_cumprod,
    "squaredcos_cap_v2": squaredcos_cap_v2_alphas_cumprod,
}
SCHEDULES = tuple(_BUILDERS)  # the names a model config or a manifest may give


def alphas_cumprod_for(name: str, num_timesteps: int) -> np.ndarray:
    """Build ᾱ for a named schedule (the names written in the manifest)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](num_timesteps)


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) sampling schedule.

    ``timesteps[i]`` is the model timestep fed to the network at sampling step i, in *decreasing*
    order (noisiest first); ``alphas_cumprod[i]`` is ᾱ at that timestep. Both have length S.
    """

    timesteps: np.ndarray  # (S,) int64, decreasing
    alphas_cumprod: np.ndarray  # (S,) float64, increasing
    betas: np.ndarray | None = None  # (S,) float64 single-step β_i when recorded (see ``respace``), else derived
    # ᾱ after the last step: 1.0 (the clean image) for a whole schedule; the next step's ᾱ for a head of one
    # (``split``), so that a sampler run on the head stops at that step's noise level; ᾱ_0 for "linspace_floor"
    final_abar: float = 1.0
    # (S,) the ᾱ that DDIM's update uses at each step, where it is not ``alphas_cumprod`` (the "shifted" spacing:
    # ᾱ_{t−1}); the x0 and ε conversions always use ``alphas_cumprod``. None: the same.
    update_abar: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """ᾱ of the step after each one; ``final_abar`` (1.0: the clean image) after the last."""
        return np.append(self.alphas_cumprod[1:], self.final_abar)

    def split(self, s: int) -> tuple[Schedule, Schedule]:
        """The first ``s`` steps and the rest (0 < s < S): running a one-step sampler (DDIM, DDPM) over the head
        and then the tail takes the same steps as running it over the whole schedule."""
        if not 0 < s < len(self):
            raise ValueError(f"split step must be in 1 … {len(self) - 1}, got {s}")
        betas = (None, None) if self.betas is None else (self.betas[:s], self.betas[s:])
        up = (None, None) if self.update_abar is None else (self.update_abar[:s], self.update_abar[s:])
        head = Schedule(self.timesteps[:s], self.alphas_cumprod[:s], betas[0],
                        float(self.alphas_cumprod[s] if up[0] is None else self.update_abar[s]), up[0])
        return head, Schedule(self.timesteps[s:], self.alphas_cumprod[s:], betas[1], self.final_abar, up[1])


def respace(alphas_cumprod: np.ndarray, steps: int, spacing: str = "trailing",
            betas: np.ndarray | None = None) -> Schedule:
    """Choose ``steps`` of the T training timesteps and return the schedule over them.

    spacing: ``trailing`` (always includes t = T-1; Lin et al. 2023 Table 2), ``leading``
    (diffusers' DDIM default), ``linspace`` (round(linspace(0, T-1, S))), and two grids that DALLE2-pytorch's
    DDIM loops take (for S < T; S = T is the whole chain, as its DDPM):
    ``linspace_floor``: the S distinct values > 0 of floor(linspace(0, T, S + 2))[:-1], the last step landing
    on t = 0 (ᾱ_0, not the clean sample: ``final_abar``);
    ``linspace_floor_shifted``: trunc(linspace(−1, T, S + 1))[1:] (its S − 1 values ≥ 0, then the clean sample),
    with DDIM's update taking ᾱ_{t−1} at each t (ᾱ_{−1} = 1: ``update_abar``), as its prior's loop indexes
    ``alphas_cumprod_prev``.
    betas: the training chain's own β_t (T,), when a model records them beside ᾱ (an imported scheduler's
    values). A step whose successor is the adjacent timestep t − 1 (for t = 0: the clean sample) then
    takes β_t itself instead of 1 − ᾱ_t/ᾱ_{t−1}, as diffusers' DDPM and UnCLIP schedulers do. The two
    agree in exact arithmetic; they differ where ᾱ was accumulated in float32: at t = 0, 1 − ᾱ_0 keeps
    only ~3 digits of β_0 ≈ 4e-5, and the last DDPM step returns x0·β_0/(1 − ᾱ_0) ≈ 1.001·x0 there.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if spacing in ("linspace_floor", "linspace_floor_shifted") and steps < num_timesteps:
        return _floor_grid(alphas_cumprod, steps, spacing)
    if spacing in ("linspace_floor", "linspace_floor_shifted"):
        ts = np.arange(num_timesteps)[::-1].astype(np.int64)
    elif spacing == "trailing":
        # The first S values of arange(T, 0, -T/S), bit for bit (numpy fills start + k·((start + step) - start),
        # so .5 ties round as in diffusers' "trailing"), without arange's float-length bug: arange itself can
        # yield an (S+1)-th value ≈ 0 (e.g. T=1000, S=61), which used to become a duplicate t = 0.
        step = (num_timesteps - num_timesteps / steps) - num_timesteps
        ts = np.round(num_timesteps + np.arange(steps) * step).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (num_timesteps // steps))[::-1].astype(np.int64)
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps))[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; known: trailing, leading, linspace")
    ts = np.clip(ts, 0, num_timesteps - 1)
    abar = alphas_cumprod[ts]
    step_betas = None
    if betas is not None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.shape != alphas_cumprod.shape:
            raise ValueError(f"betas has shape {betas.shape}, alphas_cumprod {alphas_cumprod.shape}")
        adjacent = np.append(ts[1:], -1) == ts - 1  # the next step is t − 1 (or the clean sample after t = 0)
        step_betas = np.where(adjacent, betas[ts], 1.0 - abar / np.append(abar[1:], 1.0))
    return Schedule(timesteps=ts, alphas_cumprod=abar, betas=step_betas)


def _floor_grid(alphas_cumprod: np.ndarray, steps: int, spacing: str) -> Schedule:
    """``respace``'s DALLE2-pytorch grids for S < T, truncated as torch's ``.int()``. The linspace is float64 here;
    torch's float32 one (whose rounding depends on the CPU's vector width) can land just below an integer, so for
    some (T, S) its grid has one timestep one lower (e.g. T = 64, S = 13)."""
    num_timesteps = len(alphas_cumprod)
    if spacing == "linspace_floor":
        times = np.trunc(np.linspace(0.0, num_timesteps, steps + 2)[:-1]).astype(np.int64)
        ts = np.unique(times[times > 0])[::-1].astype(np.int64)
        return Schedule(timesteps=ts, alphas_cumprod=alphas_cumprod[ts], final_abar=float(alphas_cumprod[0]))
    times = np.trunc(np.linspace(-1.0, num_timesteps, steps + 1)[:-1]).astype(np.int64)
    ts = np.unique(times[times >= 0])[::-1].astype(np.int64)  # a repeated t is an identity step there
    if len(ts) == 0:
        ts = np.array([num_timesteps - 1], np.int64)  # S = 1: its loop runs no step; one step here
    shifted = np.concatenate([[1.0], alphas_cumprod[:-1]])  # ᾱ_{t−1}
    return Schedule(timesteps=ts, alphas_cumprod=alphas_cumprod[ts], update_abar=shifted[ts])


def q_sample(x0: np.ndarray, abar: float | np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x_t = √ᾱ x0 + √(1-ᾱ) ε (Eq. 4 of Ho et al. 2020); ``abar`` broadcasts over the batch."""
    abar = np.asarray(abar, dtype=np.float64)
    while abar.ndim and abar.ndim < x0.ndim:
        abar = abar[..., None]
    return (np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise).astype(x0.dtype)
