"""Samplers and the parameterisation / guidance adapter, against closed-form fake denoisers.

Like diffusers' scheduler tests: ideal denoisers for data whose posterior mean is known in closed form
(a point mass, a Gaussian), golden values after a whole loop, and checks of the guidance batch.
"""
from __future__ import annotations

import numpy as np
import pytest

from dalle2_rt.runtime.parameterization import (
    make_denoiser,
    make_step_denoiser,
    split_halves,
    stack_halves,
    to_eps,
    to_v,
    to_x0,
)
from dalle2_rt.runtime.samplers import (
    SAMPLERS,
    ddpm_variances,
    sample,
    sample_ddim,
    sample_ddpm,
)
from dalle2_rt.runtime.schedules import Schedule, alphas_cumprod_for, cosine_alphas_cumprod, q_sample, respace

T = 1000
ABAR = cosine_alphas_cumprod(T)
# (sampler name, options) covering every noise path
CONFIGS = [("ddpm", {}), ("ddpm", {"variance": "large"}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm++", {})]
CONFIG_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CONFIGS]


# ---------------------------------------------------------------------------------------------------------
# (a) point mass: the ideal denoiser returns x*; every sampler's last step returns its x0 estimate exactly


@pytest.mark.parametrize("name,options", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["x0", "eps", "v"])
def test_point_mass_data_is_recovered(name, options, kind):
    """Engine predicting ``kind`` for data x*, through make_denoiser: every sampler ends at x*."""
    rng = np.random.default_rng(0)
    x_star = rng.uniform(-1, 1, size=(2, 3, 4, 4)).astype(np.float32)
    schedule = respace(ABAR, 25)

    def model(x, t):  # the ideal prediction of each kind for data = x*
        abar = ABAR[int(t[0])]
        x0 = np.broadcast_to(x_star, x.shape).astype(np.float64)
        eps = (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
        pred = {"x0": x0, "eps": eps, "v": np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0}[kind]
        return pred.astype(np.float32)

    denoise = make_denoiser(model, kind=kind, schedule=schedule)
    x = rng.standard_normal(x_star.shape, dtype=np.float32)
    out = sample(name, denoise, x, schedule, rng=rng, **options)
    assert out.dtype == np.float32 and out.shape == x_star.shape
    np.testing.assert_allclose(out, x_star, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# (b) Gaussian data N(μ, s²) per dimension: E[x0 | x_t] = μ + √ᾱ s² / (ᾱ s² + 1 − ᾱ) (x_t − √ᾱ μ)

MU = np.array([1.5, -0.5, 0.0])
STD = np.array([0.5, 1.0, 2.0])


def gaussian_denoiser(schedule: Schedule):
    def denoise(x, i):
        abar = schedule.alphas_cumprod[i]
        gain = np.sqrt(abar) * STD**2 / (abar * STD**2 + 1 - abar)
        return (MU + gain * (x - np.sqrt(abar) * MU)).astype(x.dtype)

    return denoise


def gaussian_x_start(schedule: Schedule, z: np.ndarray) -> np.ndarray:
    """Exact marginal at the first sampling step: x_t ~ N(√ᾱ μ, ᾱ s² + 1 − ᾱ)."""
    abar = schedule.alphas_cumprod[0]
    return (np.sqrt(abar) * MU + np.sqrt(abar * STD**2 + 1 - abar) * z).astype(z.dtype)


@pytest.mark.parametrize(
    "name,steps,options,std_bias",
    [
        # std_bias: the sampler's own discretisation error in std / s at this step count on the trailing
        # cosine schedule, computed by propagating the variance through the (linear) loop: DDPM "small"
        # under-disperses by ≤ 3.5 % at 100 steps, DDIM by ≤ 3.1 % at 50, DPM++(2M) by ≤ 2.3 % at 20.
        ("ddpm", 100, {}, 0.036),
        ("ddim", 50, {"eta": 0.0}, 0.032),
        ("dpm++", 20, {}, 0.024),
    ],
)
def test_gaussian_data_statistics(name, steps, options, std_bias):
    n = 4000
    schedule = respace(ABAR, steps)
    rng = np.random.default_rng(7)
    x = gaussian_x_start(schedule, rng.standard_normal((n, 3), dtype=np.float32))
    out = sample(name, gaussian_denoiser(schedule), x, schedule, rng=rng, **options)
    # Sampling error of n draws: the mean has sd s/√n, the sample std has sd ≈ s/√(2n); allow 4 of those.
    np.testing.assert_array_less(np.abs(out.mean(0) - MU), 4 * STD / np.sqrt(n))
    np.testing.assert_array_less(np.abs(out.std(0) / STD - 1), std_bias + 4 / np.sqrt(2 * n))


@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpm++", 2)])
def test_convergence_order_on_gaussian_data(name, order):
    """Doubling the steps divides the std error by 2^order: DDIM is first order, DPM-Solver++(2M) second.

    Deterministic samplers are affine maps here, so two probe points give the exact output std.
    ``linspace`` spacing keeps the steps uniform down to t = 0, so the asymptotic order shows.
    """
    abar = alphas_cumprod_for("cosine", T)
    errors = []
    for steps in (50, 100, 200):
        schedule = respace(abar, steps, "linspace")
        x = np.stack([gaussian_x_start(schedule, np.zeros(3)), gaussian_x_start(schedule, np.ones(3))])
        out = sample(name, gaussian_denoiser(schedule), x, schedule, rng=None)
        np.testing.assert_allclose(out[0], MU, atol=1e-12)  # the mean is exact for these linear samplers
        errors.append(np.abs((out[1] - out[0]) / STD - 1).max())
    ratios = np.array(errors[1:]) / errors[:-1]
    np.testing.assert_allclose(ratios, 2.0**-order, rtol=0.2)


# ---------------------------------------------------------------------------------------------------------
# (c) golden values: seed 1234, x (2, 3), 10 trailing cosine steps, x0 = 0.8 tanh(x_t) + 0.01 i


def golden_denoiser(x, i):
    return (0.8 * np.tanh(x) + 0.01 * i).astype(np.float32)


def reference_loop(name: str, eta: float = 0.0) -> np.ndarray:
    """An independent float64 loop, written from the papers' equations and not from samplers.py."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((2, 3), dtype=np.float32).astype(np.float64)
    ts = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]  # trailing, 10 of 1000
    abars = [ABAR[t] for t in ts] + [1.0]
    x0_prev = lam_prev = None
    for i in range(10):
        a_t, a_s = abars[i], abars[i + 1]
        x0 = 0.8 * np.tanh(x.astype(np.float32)).astype(np.float64) + 0.01 * i
        if name == "ddpm":  # Ho et al. Eq. 6-7 with the respaced β_t = 1 − ᾱ_t/ᾱ_s
            beta = 1 - a_t / a_s
            mean = (np.sqrt(a_s) * beta * x0 + np.sqrt(1 - beta) * (1 - a_s) * x) / (1 - a_t)
            var = (1 - a_s) / (1 - a_t) * beta
            x = mean + (np.sqrt(var) * rng.standard_normal((2, 3), dtype=np.float32) if i < 9 else 0.0)
        elif name == "ddim":  # Song et al. Eq. 12 and 16
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            sig = eta * np.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sig**2) * eps
            if sig > 0:
                x = x + sig * rng.standard_normal((2, 3), dtype=np.float32)
        else:  # DPM-Solver++(2M) with e^{-h} = (σ_s/α_s)/(σ_t/α_t), first order on the first and last step
            al_t, al_s, si_t, si_s = np.sqrt(a_t), np.sqrt(a_s), np.sqrt(1 - a_t), np.sqrt(1 - a_s)
            if i == 9:
                x = x0
                continue
            lam_t, lam_s = np.log(al_t / si_t), np.log(al_s / si_s)
            d = x0
            if x0_prev is not None:
                r = (lam_t - lam_prev) / (lam_s - lam_t)
                d = x0 + (x0 - x0_prev) / (2 * r)
            x = si_s / si_t * x + (al_s - si_s * al_t / si_t) * d
            x0_prev, lam_prev = x0, lam_t
    return x


GOLDEN = {
    ("ddpm", 0.0): [[0.55358499, 0.21179876, 0.62291467], [0.39683047, 0.20072687, 0.57106352]],
    ("ddim", 0.0): [[-0.50810230, 0.77352488, 0.70202184], [-0.41144904, 0.43248129, -0.45295331]],
    ("ddim", 0.5): [[-0.00330351, 0.68682253, 0.72941852], [-0.10373488, 0.39313295, -0.12298244]],
    ("dpm++", 0.0): [[-0.49782965, 0.77226114, 0.69854808], [-0.39512607, 0.44118148, -0.43880233]],
}


@pytest.mark.parametrize("name,eta", list(GOLDEN), ids=[f"{n}-eta{e}" for n, e in GOLDEN])
def test_golden_values(name, eta):
    schedule = respace(ABAR, 10, "trailing")
    np.testing.assert_array_equal(schedule.timesteps, np.arange(999, 0, -100))
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((2, 3), dtype=np.float32)
    options = {"eta": eta} if name == "ddim" else {}
    out = sample(name, golden_denoiser, x, schedule, rng=rng, **options)
    golden = np.array(GOLDEN[name, eta])
    # The golden numbers were checked against the float64 loop; both must keep matching them.
    np.testing.assert_allclose(reference_loop(name, eta), golden, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out, golden, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------
# (d) determinism, (h) callbacks, dispatch


@pytest.mark.parametrize("name,options", CONFIGS, ids=CONFIG_IDS)
def test_same_seed_same_result(name, options):
    schedule = respace(ABAR, 8)
    x = np.random.default_rng(3).standard_normal((2, 5), dtype=np.float32)
    runs = [sample(name, golden_denoiser, x, schedule, rng=np.random.default_rng(s), **options) for s in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    stochastic = name == "ddpm" or options.get("eta", 0) > 0
    assert (not np.array_equal(runs[0], runs[2])) == stochastic
    np.testing.assert_array_equal(x, np.random.default_rng(3).standard_normal((2, 5), dtype=np.float32))  # x untouched


def test_ddim_eta_one_is_ancestral_ddpm():
    """η = 1 gives s² = β̃ and the same posterior mean, drawing the same noise as DDPM "small"."""
    schedule = respace(ABAR, 30)
    x = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    ddpm = sample_ddpm(golden_denoiser, x, schedule, rng=np.random.default_rng(5))
    ddim = sample_ddim(golden_denoiser, x, schedule, rng=np.random.default_rng(5), eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,options", CONFIGS, ids=CONFIG_IDS)
def test_callback_once_per_step(name, options):
    schedule = respace(ABAR, 6)
    seen = []

    def callback(i, x, x0):
        seen.append((i, x.copy(), x0.copy()))

    x = np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32)
    out = sample(name, golden_denoiser, x, schedule, rng=np.random.default_rng(1), callback=callback, **options)
    assert [i for i, _, _ in seen] == list(range(6))
    assert all(x.dtype == np.float32 and x0.dtype == np.float32 and x.shape == (2, 3) for _, x, x0 in seen)
    np.testing.assert_array_equal(seen[-1][1], out)
    # x0 handed out at step i is the estimate made from the sample before that step
    np.testing.assert_array_equal(seen[3][2], golden_denoiser(seen[2][1], 3))


class _CountingRng:
    """A generator that counts its draws."""

    def __init__(self, seed: int):
        self.rng, self.draws = np.random.default_rng(seed), 0

    def standard_normal(self, size, dtype=np.float32):
        self.draws += 1
        return self.rng.standard_normal(size, dtype=dtype)


def test_sampler_names_run_their_algorithms():
    """The names the CLI offers (--sampler ddpm | ddim | dpm++), each checked by what its algorithm does."""
    assert sorted(SAMPLERS) == ["ddim", "ddpm", "dpm++"]
    schedule = respace(ABAR, 3)
    x = np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32) * 3

    def denoise(x_t, i):  # a non-linear x0 estimate, so first- and second-order updates differ
        return (0.9 * np.tanh(x_t)).astype(np.float32)

    out, draws = {}, {}
    for name in ("ddpm", "ddim", "dpm++"):
        rng = _CountingRng(1)
        out[name], draws[name] = sample(name, denoise, x, schedule, rng=rng), rng.draws
    assert draws == {"ddpm": 2, "ddim": 0, "dpm++": 0}  # DDPM: fresh noise every step but the last
    # DDIM, η = 0 (Eq. 12 of Song et al. 2021): x' = √ᾱ' x0 + √(1 − ᾱ') (x − √ᾱ x0)/√(1 − ᾱ), written out here
    abar, want = list(schedule.alphas_cumprod) + [1.0], x.astype(np.float64)
    for i in range(3):
        x0 = 0.9 * np.tanh(want.astype(np.float32)).astype(np.float64)
        eps = (want - np.sqrt(abar[i]) * x0) / np.sqrt(1 - abar[i])
        want = np.sqrt(abar[i + 1]) * x0 + np.sqrt(1 - abar[i + 1]) * eps
    np.testing.assert_allclose(out["ddim"], want, rtol=1e-5, atol=1e-6)
    # DPM-Solver++(2M): its second step is second order, so it leaves DDIM's path
    assert np.abs(out["dpm++"] - out["ddim"]).max() > 1e-3
    again = sample("ddpm", denoise, x, schedule, rng=_CountingRng(2))
    assert not np.allclose(again, out["ddpm"])  # DDPM's result depends on its noise


def test_sample_refuses_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown sampler 'euler'; known: ddpm, ddim, dpm\\+\\+"):
        sample("euler", golden_denoiser, np.zeros((1, 2), np.float32), respace(ABAR, 4), rng=None)
    with pytest.raises(ValueError, match="variance"):
        sample("ddpm", golden_denoiser, np.zeros((1, 2), np.float32), respace(ABAR, 4), rng=None, variance="big")
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(golden_denoiser, np.zeros((1, 2), np.float32), respace(ABAR, 4), rng=None, eta=-1.0)


def test_ddpm_variances_of_respaced_chain():
    schedule = respace(ABAR, 10)
    betas, posterior = ddpm_variances(schedule)
    abar_prev = np.append(schedule.alphas_cumprod[1:], 1.0)
    # 1 − β cancels at the first step (β ≈ 1 − 2e-9), hence 1e-9
    np.testing.assert_allclose(np.cumprod((1 - betas)[::-1])[::-1], schedule.alphas_cumprod, rtol=1e-9)
    np.testing.assert_allclose(posterior, (1 - abar_prev) / (1 - schedule.alphas_cumprod) * betas)
    assert posterior[-1] == 0.0 and np.all(posterior[:-1] > 0) and np.all(posterior <= betas)


# ---------------------------------------------------------------------------------------------------------
# (e) classifier-free guidance in make_denoiser


class FakeEngine:
    """pred = 0.5 x + keep + t/1000, with the caller's conditioning stacked [cond (keep=1); uncond (keep=0)]."""

    def __init__(self, batch: int, guided: bool):
        self.keep = np.concatenate([np.ones(batch), np.zeros(batch)]) if guided else np.ones(batch)
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.copy(), t.copy()))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (0.5 * x + self.keep.reshape(shape) + t.reshape(shape) / 1000).astype(np.float32)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guidance_one_batched_call_per_step(kind, scale):
    batch, schedule = 2, respace(ABAR, 5)
    engine = FakeEngine(batch, guided=True)
    denoise = make_denoiser(engine, kind=kind, schedule=schedule, guidance_scale=scale)
    x_t = np.random.default_rng(0).standard_normal((batch, 3, 2, 2), dtype=np.float32)
    for i in range(len(schedule)):
        x0 = denoise(x_t, i)
        x_in, t_in = engine.calls[i]
        assert len(engine.calls) == i + 1 and x_in.shape == (2 * batch, 3, 2, 2)
        np.testing.assert_array_equal(x_in[:batch], x_t)
        np.testing.assert_array_equal(x_in[batch:], x_t)
        assert t_in.dtype == np.float32 and np.all(t_in == schedule.timesteps[i])
        # pred_u + g (pred_c − pred_u) = 0.5 x + t/1000 + g
        guided = 0.5 * x_t.astype(np.float64) + schedule.timesteps[i] / 1000 + scale
        expected = to_x0(guided, x_t.astype(np.float64), schedule.alphas_cumprod[i], kind)
        assert x0.dtype == np.float32
        np.testing.assert_allclose(x0, expected, rtol=1e-5, atol=1e-5)


def test_unguided_is_one_call_of_batch_b():
    schedule = respace(ABAR, 5)
    engine = FakeEngine(3, guided=False)
    denoise = make_denoiser(engine, kind="x0", schedule=schedule)
    x_t = np.zeros((3, 4), np.float32)
    x0 = denoise(x_t, 2)
    assert len(engine.calls) == 1 and engine.calls[0][0].shape == (3, 4)
    np.testing.assert_allclose(x0, 1 + schedule.timesteps[2] / 1000, rtol=1e-6)


def test_guidance_is_the_same_on_any_parameterisation():
    """to_x0 is affine in pred, so guiding an eps-engine equals guiding the same engine re-expressed as x0."""
    schedule = respace(ABAR, 5)
    eps_engine = FakeEngine(2, guided=True)

    def x0_engine(x, t):
        return to_x0(eps_engine(x, t), x, ABAR[int(t[0])], "eps")

    x_t = np.random.default_rng(1).standard_normal((2, 6), dtype=np.float32)
    for i in range(len(schedule)):
        a = make_denoiser(eps_engine, kind="eps", schedule=schedule, guidance_scale=3.0)(x_t, i)
        b = make_denoiser(x0_engine, kind="x0", schedule=schedule, guidance_scale=3.0)(x_t, i)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_clip_applies_to_the_guided_x0():
    schedule = respace(ABAR, 5)
    denoise = make_denoiser(FakeEngine(1, guided=True), kind="x0", schedule=schedule, guidance_scale=3.0,
                            clip_x0=(-1.0, 1.0))
    # pred_c = 0.5x + 1 + t/1000, pred_u = 0.5x + t/1000 -> guided 0.5x + 3 + t/1000; x = -8 gives -1 + t/1000
    x0 = denoise(np.array([[-8.0, -20.0, 20.0]], np.float32), 4)
    t = schedule.timesteps[4] / 1000
    np.testing.assert_allclose(x0, [[-1.0 + t, -1.0, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="clip_x0"):
        make_denoiser(FakeEngine(1, False), kind="x0", schedule=schedule, clip_x0=(1.0, -1.0))


def test_step_denoiser_stacks_the_halves_and_passes_the_step():
    """make_step_denoiser owns the guidance batch: x_t twice, cond rows then uncond rows of every feed."""
    schedule = respace(ABAR, 4)
    calls = []

    def model(i, x_t, t, keep, label):  # pred = 0.5 x + 2·keep: the halves differ by 2
        calls.append({"i": i, "x_t": x_t.copy(), "t": t.copy(), "keep": keep.copy(), "label": label.copy()})
        return (0.5 * x_t + 2 * keep[:, None]).astype(np.float32)

    cond = {"keep": np.ones(2, np.float32), "label": np.array([10, 11])}
    uncond = {"keep": np.zeros(2, np.float32), "label": np.array([20, 21])}
    denoise = make_step_denoiser(model, kind="x0", schedule=schedule, cond=cond, uncond=uncond, guidance_scale=3.0)
    x_t = np.arange(6, dtype=np.float32).reshape(2, 3)
    for i in range(4):
        np.testing.assert_allclose(denoise(x_t, i), 0.5 * x_t + 3.0 * 2, rtol=1e-6)  # pred_u + 3 (pred_c − pred_u)
    assert [c["i"] for c in calls] == [0, 1, 2, 3]
    for c, ts in zip(calls, schedule.timesteps):
        np.testing.assert_array_equal(c["x_t"], np.concatenate([x_t, x_t]))
        np.testing.assert_array_equal(c["keep"], [1, 1, 0, 0])
        np.testing.assert_array_equal(c["label"], [10, 11, 20, 21])
        assert c["t"].dtype == np.float32 and np.all(c["t"] == ts)
    calls.clear()
    for unguided in (make_step_denoiser(model, kind="x0", schedule=schedule, cond=cond),
                     make_step_denoiser(model, kind="x0", schedule=schedule, cond=cond, uncond=uncond)):
        np.testing.assert_allclose(unguided(x_t, 1), 0.5 * x_t + 2, rtol=1e-6)  # the conditional half alone
        assert calls.pop()["label"].tolist() == [10, 11]


def test_stack_and_split_halves_are_inverse():
    cond = {"a": np.arange(6).reshape(3, 2), "b": np.ones(3)}
    uncond = {"a": -np.arange(6).reshape(3, 2), "b": np.zeros(3)}
    stacked = stack_halves(cond, uncond)
    assert stacked["a"].shape == (6, 2) and stacked["b"].tolist() == [1, 1, 1, 0, 0, 0]
    back_c, back_u = split_halves(stacked)
    for k in cond:
        np.testing.assert_array_equal(back_c[k], cond[k])
        np.testing.assert_array_equal(back_u[k], uncond[k])


def test_make_denoiser_rejects_bad_kind_and_batch():
    schedule = respace(ABAR, 5)
    with pytest.raises(ValueError, match="unknown prediction kind 'score'"):
        make_denoiser(FakeEngine(1, False), kind="score", schedule=schedule)
    denoise = make_denoiser(lambda x, t: x[:1], kind="x0", schedule=schedule, guidance_scale=2.0)
    with pytest.raises(ValueError, match="batch 1 for an input batch of 4"):
        denoise(np.zeros((2, 3), np.float32), 0)


def test_learned_range_variance_drives_ddpm():
    """A 2C-channel engine (eps, v): v = −1 is β̃ ("small"), v = +1 is β ("large"); the conditional v is used."""
    schedule = respace(ABAR, 12)
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2), dtype=np.float32)
    betas, posterior = ddpm_variances(schedule)

    def engine_with(v_cond, v_uncond=0.3):
        def model(x_in, t):
            eps = 0.1 * x_in
            v = np.full_like(x_in, v_uncond)
            v[: len(x_in) // 2] = v_cond
            return np.concatenate([eps, v], axis=1)  # (2B, 2C, H, W)

        return model

    plain = make_denoiser(lambda x_in, t: 0.1 * x_in, kind="eps", schedule=schedule)
    for v, variance in ((-1.0, "small"), (1.0, "large")):
        learned = make_denoiser(engine_with(v), kind="eps", schedule=schedule, guidance_scale=1.0,
                                learned_variance=True)
        x0, log_variance = learned(x, 3)
        assert x0.shape == log_variance.shape == x.shape
        np.testing.assert_allclose(x0, plain(x, 3), rtol=1e-6)
        np.testing.assert_allclose(log_variance, np.log(posterior[3] if v < 0 else betas[3]), rtol=1e-12)
        out = sample_ddpm(learned, x, schedule, rng=np.random.default_rng(9))
        ref = sample_ddpm(plain, x, schedule, rng=np.random.default_rng(9), variance=variance)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # DDIM and DPM++ take the same denoiser and ignore the variance
    learned = make_denoiser(engine_with(0.0), kind="eps", schedule=schedule, guidance_scale=1.0, learned_variance=True)
    np.testing.assert_array_equal(sample_ddim(learned, x, schedule), sample_ddim(plain, x, schedule))


# ---------------------------------------------------------------------------------------------------------
# (f) parameterisation round trips


@pytest.mark.parametrize("abar", [0.999, 0.5, 1e-3, np.array([0.9, 0.2, 0.01])], ids=["hi", "mid", "lo", "batch"])
def test_parameterisation_round_trips(abar):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4), dtype=np.float32)
    eps = rng.standard_normal((3, 2, 4), dtype=np.float32)
    x_t = q_sample(x0.astype(np.float64), abar, eps.astype(np.float64))
    a = np.asarray(abar).reshape(-1, 1, 1) if np.ndim(abar) else abar
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0  # the definition

    preds = {"x0": x0.astype(np.float64), "eps": eps.astype(np.float64), "v": v}
    for kind, pred in preds.items():
        np.testing.assert_allclose(to_x0(pred, x_t, abar, kind), x0, rtol=0, atol=1e-9 / np.min(np.sqrt(a)))
        np.testing.assert_allclose(to_eps(pred, x_t, abar, kind), eps, rtol=0, atol=1e-9 / np.min(np.sqrt(1 - a)))
        np.testing.assert_allclose(to_v(pred, x_t, abar, kind), v, rtol=0, atol=1e-9 / np.min(np.sqrt(a * (1 - a))))
    # float32 in, float32 out; the float64 math keeps a round trip x0 -> v -> eps -> x0 at float32 rounding
    x_t32 = x_t.astype(np.float32)
    v32 = to_v(x0, x_t32, abar, "x0")
    back = to_x0(to_eps(v32, x_t32, abar, "v"), x_t32, abar, "eps")
    assert v32.dtype == back.dtype == np.float32
    np.testing.assert_allclose(back, x0, rtol=0, atol=2e-6 / np.min(np.sqrt(a)))
    with pytest.raises(ValueError, match="known: eps, x0, v"):
        to_x0(x0, x_t, abar, "sample")
