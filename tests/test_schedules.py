"""Noise schedules and respacing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dalle2_rt.runtime.schedules import (
    Schedule,
    alphas_cumprod_for,
    cosine_alphas_cumprod,
    linear_alphas_cumprod,
    q_sample,
    respace,
)

SPACINGS = ["trailing", "leading", "linspace"]


def test_cosine_matches_its_closed_form():
    """ᾱ_t = f(t+1)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), wherever no beta hit the 0.999 cap."""
    abar = cosine_alphas_cumprod(1000)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    closed = np.array(f[1:]) / f[0]
    np.testing.assert_allclose(abar[:-1], closed[:-1], rtol=1e-10)
    assert abar.dtype == np.float64 and abar.shape == (1000,)
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 1e-8 and abar[0] > 0.9999
    # diffusers' name for the same schedule; each call builds its own array, so a caller that edits its copy
    # leaves the next caller's schedule as the closed form says
    mine = alphas_cumprod_for("squaredcos_cap_v2", 1000)
    np.testing.assert_array_equal(mine, abar)
    mine[:] = 0.5
    abar[:] = 0.5
    np.testing.assert_allclose(alphas_cumprod_for("squaredcos_cap_v2", 1000)[:-1], closed[:-1], rtol=1e-10)
    np.testing.assert_allclose(cosine_alphas_cumprod(1000)[:-1], closed[:-1], rtol=1e-10)


def test_linear_schedule():
    abar = linear_alphas_cumprod(1000)
    assert abar[0] == pytest.approx(1 - 1e-4)
    assert abar[-1] / abar[-2] == pytest.approx(1 - 0.02)
    # guided-diffusion's rescaling to T: betas from 1e-4·1000/T to 0.02·1000/T
    short = linear_alphas_cumprod(250)
    assert 1 - short[0] == pytest.approx(4e-4) and 1 - short[-1] / short[-2] == pytest.approx(0.08)
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'; known: cosine, linear"):
        alphas_cumprod_for("sigmoid", 1000)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_timesteps", [10, 50, 1000])
def test_respace_every_step_count(spacing, num_timesteps):
    abar = cosine_alphas_cumprod(num_timesteps)
    for steps in range(1, num_timesteps + 1):
        schedule = respace(abar, steps, spacing)
        ts = schedule.timesteps
        assert isinstance(schedule, Schedule) and len(schedule) == steps == len(schedule.alphas_cumprod)
        assert ts.dtype == np.int64 and np.all(np.diff(ts) < 0), (steps, ts)
        assert 0 <= ts[-1] and ts[0] <= num_timesteps - 1
        np.testing.assert_array_equal(schedule.alphas_cumprod, abar[ts])
        if spacing == "trailing":
            assert ts[0] == num_timesteps - 1
        if spacing == "linspace" and steps > 1:
            assert ts[0] == num_timesteps - 1 and ts[-1] == 0


def test_respace_known_values():
    abar = cosine_alphas_cumprod(1000)
    np.testing.assert_array_equal(respace(abar, 10, "trailing").timesteps, np.arange(999, 0, -100))
    np.testing.assert_array_equal(respace(abar, 10, "leading").timesteps, np.arange(900, -1, -100))
    np.testing.assert_array_equal(respace(abar, 4, "linspace").timesteps, [999, 666, 333, 0])
    np.testing.assert_array_equal(respace(abar, 1000).timesteps, np.arange(999, -1, -1))
    # regression: arange(1000, 0, -1000/61) has 62 elements; the 62nd used to become a duplicate t = 0
    ts = respace(abar, 61).timesteps
    assert len(ts) == 61 and ts[-1] == 15


def test_trailing_matches_diffusers_rounding():
    """Bit-for-bit the first S values of diffusers' round(arange(T, 0, -T/S)) - 1, .5 ties included."""
    for num_timesteps in (50, 1000):
        abar = cosine_alphas_cumprod(num_timesteps)
        for steps in range(1, num_timesteps + 1):
            ref = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps))[:steps].astype(np.int64) - 1
            np.testing.assert_array_equal(respace(abar, steps).timesteps, ref)


def test_respace_rejects_bad_arguments():
    abar = cosine_alphas_cumprod(100)
    for steps in (0, 101):
        with pytest.raises(ValueError, match="steps must be in 1..100"):
            respace(abar, steps)
    with pytest.raises(ValueError, match="unknown spacing 'karras'"):
        respace(abar, 10, "karras")


def test_alphas_cumprod_prev():
    schedule = respace(cosine_alphas_cumprod(1000), 5)
    np.testing.assert_array_equal(schedule.alphas_cumprod_prev[:-1], schedule.alphas_cumprod[1:])
    assert schedule.alphas_cumprod_prev[-1] == 1.0


def test_q_sample():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4), dtype=np.float32)
    noise = rng.standard_normal((3, 2, 4, 4), dtype=np.float32)
    out = q_sample(x0, 0.25, noise)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5 * x0 + math.sqrt(0.75) * noise, rtol=1e-6)
    abar = np.array([1.0, 0.0, 0.5])  # per-sample ᾱ broadcasts over (C, H, W)
    out = q_sample(x0, abar, noise)
    np.testing.assert_allclose(out[0], x0[0])
    np.testing.assert_allclose(out[1], noise[1])
    np.testing.assert_allclose(out[2], math.sqrt(0.5) * (x0[2] + noise[2]), rtol=1e-6)


def test_dalle2_pytorch_grids_at_t25():
    """Its DDIM loops' grids (DALLE2-pytorch 1.15.6, read from its source): the decoder's trunc(linspace(0, T, S+2))
    down to t = 0 (ᾱ_0), the prior's trunc(linspace(−1, T, S+1)) with ᾱ_{t−1} in the update; S = T: every step."""
    abar = cosine_alphas_cumprod(25)
    dec = respace(abar, 5, "linspace_floor")
    assert dec.timesteps.tolist() == [20, 16, 12, 8, 4] and dec.final_abar == abar[0] and dec.update_abar is None
    prior = respace(abar, 5, "linspace_floor_shifted")
    assert prior.timesteps.tolist() == [19, 14, 9, 4] and prior.final_abar == 1.0
    np.testing.assert_array_equal(prior.update_abar, abar[[18, 13, 8, 3]])
    for spacing in ("linspace_floor", "linspace_floor_shifted"):
        whole = respace(abar, 25, spacing)
        assert whole.timesteps.tolist() == list(range(24, -1, -1)) and whole.update_abar is None
        assert whole.final_abar == 1.0


def test_a_shifted_schedule_split_takes_the_same_ddim_steps_as_the_whole():
    from dalle2_rt.runtime.samplers import sample_ddim

    schedule = respace(cosine_alphas_cumprod(50), 8, "linspace_floor_shifted")
    x = np.random.default_rng(0).standard_normal((2, 4))

    def denoise(x, i):
        return np.tanh(x * 0.7)

    whole = sample_ddim(denoise, x, schedule, rng=np.random.default_rng(1), eta=1.0)
    head, tail = schedule.split(3)
    rng = np.random.default_rng(1)
    split = sample_ddim(denoise, sample_ddim(denoise, x, head, rng=rng, eta=1.0), tail, rng=rng, eta=1.0)
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-12)
    # and the update used ᾱ_{t−1}: the same grid without it lands elsewhere
    plain = Schedule(schedule.timesteps, schedule.alphas_cumprod)
    assert not np.allclose(sample_ddim(denoise, x, plain, rng=np.random.default_rng(1), eta=1.0), whole)


def test_a_shifted_grid_that_reaches_t0_samples_finite_values():
    """S > (T + 1)/2 puts t = 0 on the prior's grid, where ᾱ_{t−1} = 1: that step returns x0, with no noise."""
    from dalle2_rt.runtime.samplers import sample_ddim

    schedule = respace(cosine_alphas_cumprod(25), 20, "linspace_floor_shifted")
    assert schedule.timesteps[-1] == 0 and schedule.update_abar[-1] == 1.0
    x0 = np.full((1, 4), 0.25)
    out = sample_ddim(lambda x, i: x0, np.ones((1, 4)), schedule, rng=np.random.default_rng(0), eta=1.0)
    np.testing.assert_allclose(out, x0)

