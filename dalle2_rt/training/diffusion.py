"""The Gaussian diffusion process for training, apart from the networks.

ᾱ comes from the runtime's float64 schedules (one source of truth for training and sampling) and is
turned into a torch tensor once. Losses: MSE on ε, x0 (the prior, Ramesh et al. Sec. 2.2) or v (the
pixel stages of the bundled model).
"""
from __future__ import annotations

import torch

from dalle2_rt.runtime.schedules import alphas_cumprod_for


class Diffusion:
    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        self.abar = torch.from_numpy(alphas_cumprod_for(schedule, num_timesteps))  # (T,) float64

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator)

    def _abar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.abar[t.long()].float().reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (Eq. 4 of Ho et al. 2020)."""
        a = self._abar(t, x0.dim())
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model, x0: torch.Tensor, parameterization: str, generator=None, **cond) -> torch.Tensor:
        """Draw t and ε, noise x0, and return the MSE of the model's prediction against its target."""
        t = self.sample_t(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator)
        pred = model(x_t=self.q_sample(x0, t, noise), t=t.float(), **cond)
        return (pred.float() - self.target(x0, t, noise, parameterization)).pow(2).mean()

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, parameterization: str) -> torch.Tensor:
        """What the network predicts: ε, x0, or v = √ᾱ ε − √(1-ᾱ) x0 (Salimans & Ho 2022, Sec. 4).

        v keeps the x0 error weighted at high noise, where an ε-model's x0 = (x_t − √(1-ᾱ) ε)/√ᾱ divides
        the ε error by √ᾱ ≈ 1e-4: with ε, pixel stages learn colour and layout only weakly there.
        """
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        if parameterization == "v":
            a = self._abar(t, x0.dim())
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ValueError(f"unknown parameterization {parameterization!r}; known: eps, x0, v")
