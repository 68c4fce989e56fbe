"""lensjax.diffusion: schedules, forward process, parameterisations, losses and samplers.

References are computed independently here in float64 numpy (schedule closed
forms, the Gaussian conditional behind the DDPM posterior, Hang et al.'s
min-SNR weights). Samplers are checked with exact "oracle" models: for data
that is one point, a two-point mixture or a Gaussian, E[x0 | x_t] is known in
closed form, so a correct sampler must return that point, the mixture's
weights, or the Gaussian's mean and variance.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lensjax import diffusion

PARAMETERIZATIONS = ("eps", "x0", "v")


def _np_cosine_alphas_cumprod(num_steps: int, s: float = 0.008) -> np.ndarray:
    """alphas_cumprod of Nichol & Dhariwal's cosine schedule at indices 0..T-1, before clipping."""
    i = np.arange(1, num_steps + 1, dtype=np.float64)
    f = lambda u: np.cos((u / num_steps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    return f(i) / f(0.0)


def _np_betas(kind: str, num_steps: int) -> np.ndarray:
    """Float64 betas: Ho et al.'s linear 1e-4..0.02, or the clipped cosine schedule."""
    if kind == "linear":
        return np.linspace(1e-4, 0.02, num_steps)
    abar = np.concatenate([[1.0], _np_cosine_alphas_cumprod(num_steps)])
    return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)


def _schedule_numpy(schedule: diffusion.NoiseSchedule) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, np.float64) for name, value in schedule._asdict().items()}


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------

def test_linear_schedule_endpoints_and_cumprod():
    schedule = _schedule_numpy(diffusion.make_schedule("linear", 1000))
    assert schedule["betas"].shape == (1000,)
    np.testing.assert_allclose(schedule["betas"][[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(schedule["betas"]), 0.0199 / 999, rtol=1e-3)
    reference = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(schedule["alphas_cumprod"], reference, rtol=1e-5, atol=1e-9)


def test_cosine_schedule_matches_closed_form():
    num_steps = 1000
    schedule = _schedule_numpy(diffusion.make_schedule("cosine", num_steps))
    reference = _np_cosine_alphas_cumprod(num_steps)
    unclipped = schedule["betas"] < 0.999
    # Only the last betas (where alphas_cumprod -> 0) reach the clip.
    assert unclipped[:-1].all() and not unclipped[-1]
    np.testing.assert_allclose(schedule["alphas_cumprod"][unclipped], reference[unclipped],
                               rtol=1e-5, atol=1e-9)
    assert schedule["betas"].max() == pytest.approx(0.999, rel=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [10, 1000])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(kind, num_steps):
    abar = np.asarray(diffusion.make_schedule(kind, num_steps).alphas_cumprod, np.float64)
    assert np.all((abar > 0.0) & (abar < 1.0))
    assert np.all(np.diff(abar) < 0.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_derived_terms_match_the_gaussian_posterior(kind):
    """Coefficients of q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0."""
    schedule = _schedule_numpy(diffusion.make_schedule(kind, 200))
    betas = _np_betas(kind, 200)
    np.testing.assert_allclose(schedule["betas"], betas, rtol=1e-6)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(schedule["alphas_cumprod_prev"], abar_prev, rtol=1e-5)
    np.testing.assert_allclose(schedule["sqrt_alphas_cumprod"] ** 2, abar, rtol=1e-5)
    np.testing.assert_allclose(schedule["sqrt_one_minus_alphas_cumprod"] ** 2, 1.0 - abar,
                               rtol=1e-5)
    np.testing.assert_allclose(schedule["snr"], abar / (1.0 - abar), rtol=1e-4)
    # x_{t-1} = sqrt(abar_prev) x0 + N(0, 1 - abar_prev); x_t = sqrt(1 - beta) x_{t-1} + N(0, beta).
    covariance = np.sqrt(1.0 - betas) * (1.0 - abar_prev)
    coef_xt = covariance / (1.0 - abar)
    coef_x0 = np.sqrt(abar_prev) - coef_xt * np.sqrt(abar)
    variance = (1.0 - abar_prev) - covariance ** 2 / (1.0 - abar)
    np.testing.assert_allclose(schedule["posterior_mean_coef_xt"], coef_xt, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(schedule["posterior_mean_coef_x0"], coef_x0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(schedule["posterior_variance"], variance, rtol=1e-4, atol=1e-9)
    assert schedule["posterior_variance"][0] == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: diffusion.make_schedule("sigmoid", 10), "schedule kind must be one of"),
    (lambda: diffusion.make_schedule("linear", 0), "num_steps must be a positive integer"),
    (lambda: diffusion.make_schedule("linear", 10, beta_start=0.1, beta_end=0.01),
     "beta_start <= beta_end"),
    (lambda: diffusion.training_target(diffusion.make_schedule("linear", 10), jnp.zeros((1, 2)),
                                       jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2)), "score"),
     "parameterization must be one of"),
    (lambda: diffusion.loss_weight(diffusion.make_schedule("linear", 10), jnp.zeros((1,), int),
                                   parameterization="eps", weighting="p2"),
     "weighting must be one of"),
    (lambda: diffusion.ddim_timesteps(10, 11), "num_steps must be in"),
])
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_model_space_round_trip():
    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    x = diffusion.to_model_space(images)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_allclose(diffusion.from_model_space(x), images, atol=1e-6)
    np.testing.assert_array_equal(diffusion.from_model_space(jnp.array([-3.0, 3.0])), [0.0, 1.0])


# ----------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------

def test_q_sample_mean_and_variance():
    schedule = diffusion.make_schedule("cosine", 1000)
    num_draws = 8192
    x0 = jax.random.uniform(jax.random.key(1), (1, 4, 4, 1), minval=-1.0, maxval=1.0)

    @jax.jit
    def draw(schedule, t_value):
        noise = jax.random.normal(jax.random.key(2), (num_draws, 4, 4, 1))
        return diffusion.q_sample(schedule, jnp.broadcast_to(x0, noise.shape),
                                  jnp.full((num_draws,), t_value), noise)

    for t_value in (0, 250, 998, 999):
        abar = float(_np_cosine_alphas_cumprod(1000)[t_value] if t_value < 999
                     else schedule.alphas_cumprod[t_value])      # the clipped last step
        x_t = np.asarray(draw(schedule, t_value), np.float64)
        standard_error_mean = np.sqrt((1.0 - abar) / num_draws)
        standard_error_var = (1.0 - abar) * np.sqrt(2.0 / num_draws)
        np.testing.assert_array_less(np.abs(x_t.mean(0) - np.sqrt(abar) * np.asarray(x0[0])),
                                     5 * standard_error_mean + 1e-6)
        np.testing.assert_array_less(np.abs(x_t.var(0) - (1.0 - abar)),
                                     5 * standard_error_var + 1e-9)


@jax.jit
def _round_trips(schedule, x0, eps, t):
    """Per parameterisation: target, x0 and eps recovered from it, target rebuilt from those."""
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    out = {}
    for parameterization in PARAMETERIZATIONS:
        prediction = diffusion.training_target(schedule, x0, t, eps, parameterization)
        x0_back = diffusion.prediction_to_x0(schedule, x_t, t, prediction, parameterization)
        eps_back = diffusion.prediction_to_eps(schedule, x_t, t, prediction, parameterization)
        rebuilt = diffusion.training_target(schedule, x0_back, t, eps_back, parameterization)
        out[parameterization] = (prediction, x0_back, eps_back, rebuilt)
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_parameterisation_round_trips(kind):
    schedule = diffusion.make_schedule(kind, 1000)
    keys = jax.random.split(jax.random.key(3), 3)
    x0 = jax.random.uniform(keys[0], (64, 6, 6, 1), minval=-1.0, maxval=1.0)
    eps = jax.random.normal(keys[1], x0.shape)
    t = jnp.concatenate([jnp.array([0, 1, 999]), jax.random.randint(keys[2], (61,), 0, 1000)])
    results = _round_trips(schedule, x0, eps, t)
    x0, eps = np.asarray(x0), np.asarray(eps)
    sqrt_a = np.asarray(schedule.sqrt_alphas_cumprod)[t][:, None, None, None]
    sqrt_1ma = np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[t][:, None, None, None]
    np.testing.assert_allclose(results["v"][0], sqrt_a * eps - sqrt_1ma * x0, atol=1e-6)
    np.testing.assert_array_equal(results["eps"][0], eps)
    np.testing.assert_array_equal(results["x0"][0], x0)

    for parameterization, (prediction, x0_back, eps_back, rebuilt) in results.items():
        # eps -> x0 divides the float32 rounding of x_t (|x_t| up to ~4, so up to
        # ~5e-7) by sqrt(a) (~0.006 at the last steps), and x0 -> eps divides it
        # by sqrt(1 - a) (~0.006 at t = 0 of the cosine schedule): exact to 1e-5
        # wherever that divisor is >= 0.1. The v conversions never divide.
        x0_tolerance = (np.maximum(1e-5, 1e-6 / sqrt_a) if parameterization == "eps" else 1e-5)
        eps_tolerance = (np.maximum(1e-5, 1e-6 / sqrt_1ma) if parameterization == "x0" else 1e-5)
        assert np.all(np.abs(np.asarray(x0_back) - x0) <= x0_tolerance), parameterization
        assert np.all(np.abs(np.asarray(eps_back) - eps) <= eps_tolerance), parameterization
        np.testing.assert_allclose(rebuilt, prediction, atol=1e-4)


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

_loss_weight = jax.jit(diffusion.loss_weight, static_argnames=("parameterization", "weighting"))


def test_min_snr_weights_match_formula():
    schedule = diffusion.make_schedule("cosine", 1000)
    t = jnp.arange(0, 999, 7)
    abar = _np_cosine_alphas_cumprod(1000)[np.asarray(t)]
    snr = abar / (1.0 - abar)
    expected = {"eps": np.minimum(snr, 5.0) / snr, "x0": np.minimum(snr, 5.0),
                "v": np.minimum(snr, 5.0) / (snr + 1.0)}
    for parameterization in PARAMETERIZATIONS:
        weight = _loss_weight(schedule, t, parameterization=parameterization, weighting="min_snr")
        np.testing.assert_allclose(weight, expected[parameterization], rtol=1e-4)
        np.testing.assert_array_equal(
            _loss_weight(schedule, t, parameterization=parameterization, weighting="none"),
            np.ones(t.shape))
    # The last steps of the cosine schedule have SNR ~ 1e-9: the eps weight is 1, not 0/0.
    last = _loss_weight(schedule, jnp.full(t.shape, 999), parameterization="eps",
                        weighting="min_snr")
    np.testing.assert_array_equal(last, 1.0)


def test_min_snr_losses_equal_truncated_snr_times_x0_error():
    """Whatever the parameterisation, min-SNR loss = min(SNR, 5) * |x0 - x0_hat|^2 per example."""
    schedule = diffusion.make_schedule("linear", 1000)
    keys = jax.random.split(jax.random.key(4), 4)
    x0 = jax.random.uniform(keys[0], (32, 5, 5, 1), minval=-1.0, maxval=1.0)
    t = jax.random.randint(keys[1], (32,), 0, 1000)
    x0_hat = x0 + 0.1 * jax.random.normal(keys[2], x0.shape)

    @jax.jit
    def losses(x0, t):
        out = {}
        for parameterization in PARAMETERIZATIONS:
            def model_fn(x_t, t_model, parameterization=parameterization):
                # A model whose x0 estimate is x0_hat, expressed in its own parameterisation.
                eps_hat = diffusion.x0_to_eps(schedule, x_t, t_model, x0_hat)
                return diffusion.training_target(schedule, x0_hat, t_model, eps_hat,
                                                 parameterization)
            out[parameterization] = diffusion.diffusion_loss(
                schedule, model_fn, x0, keys[3], t=t, parameterization=parameterization,
                weighting="min_snr")
        return out

    snr = np.asarray(schedule.snr)[np.asarray(t)]
    reference = np.minimum(snr, 5.0) * np.mean(np.square(np.asarray(x0 - x0_hat)), axis=(1, 2, 3))
    for parameterization, loss in losses(x0, t).items():
        assert loss.shape == (32,)
        np.testing.assert_allclose(loss, reference, rtol=2e-3, err_msg=parameterization)


def test_loss_targets_and_uniform_timesteps():
    num_steps = 10
    schedule = diffusion.make_schedule("linear", num_steps, beta_start=0.01, beta_end=0.2)
    x0 = jax.random.uniform(jax.random.key(5), (4096, 4, 4, 1), minval=-1.0, maxval=1.0)
    zero_model = lambda x_t, t: jnp.zeros_like(x_t)                            # noqa: E731
    # An x0-model that outputs the constant image t, on zero data, has loss t^2:
    # this reads the timesteps the loss drew back out of a jitted computation.
    timestep_model = lambda x_t, t: jnp.broadcast_to(                         # noqa: E731
        t.astype(x_t.dtype)[:, None, None, None], x_t.shape)

    @jax.jit
    def losses(x0, t_fixed):
        rng = jax.random.key(6)
        return (diffusion.diffusion_loss(schedule, zero_model, x0, rng),
                diffusion.diffusion_loss(schedule, zero_model, x0, rng, parameterization="x0"),
                diffusion.diffusion_loss(schedule, timestep_model, jnp.zeros_like(x0), rng,
                                         parameterization="x0"),
                diffusion.diffusion_loss(schedule, timestep_model, jnp.zeros_like(x0), rng,
                                         parameterization="x0", t=t_fixed))

    eps_loss, x0_loss, t_squared, t_fixed_squared = losses(x0, jnp.full((4096,), 3))
    # Predicting zero: the eps loss is the noise power (expectation 1), the x0 loss |x0|^2.
    assert abs(float(eps_loss.mean()) - 1.0) < 5 * np.sqrt(2.0 / (eps_loss.size * 16))
    np.testing.assert_allclose(x0_loss, np.mean(np.square(np.asarray(x0)), axis=(1, 2, 3)),
                               rtol=1e-6)
    drawn = np.rint(np.sqrt(np.asarray(t_squared))).astype(int)
    counts = np.bincount(drawn, minlength=num_steps)
    assert counts.size == num_steps and counts.sum() == 4096
    expected = 4096 / num_steps
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    np.testing.assert_allclose(t_fixed_squared, 9.0)


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------

def _oracle_x0(schedule, x_t, t, points, log_weights):
    """E[x0 | x_t] for data = mixture of point masses `points` (K, H, W, C): (B, H, W, C)."""
    a = schedule.alphas_cumprod[t][:, None]
    flat = x_t.reshape(x_t.shape[0], -1)
    centres = points.reshape(points.shape[0], -1)
    distances = jnp.sum(jnp.square(flat[:, None, :] - jnp.sqrt(a)[:, :, None] * centres[None]), -1)
    responsibilities = jax.nn.softmax(log_weights[None] - distances / (2.0 * (1.0 - a)), axis=-1)
    return (responsibilities @ centres).reshape(x_t.shape)


def _oracle_model(schedule, parameterization, points, weights=None):
    """model_fn predicting the exact posterior-mean quantity for point-mass data."""
    weights = jnp.ones(points.shape[0]) if weights is None else jnp.asarray(weights)
    log_weights = jnp.log(weights / weights.sum())

    def model_fn(x_t, t):
        x0 = _oracle_x0(schedule, x_t, t, points, log_weights)
        eps = diffusion.x0_to_eps(schedule, x_t, t, x0)
        return diffusion.training_target(schedule, x0, t, eps, parameterization)

    return model_fn


def _toy_model(x_t, t):
    """A smooth non-linear stand-in for a network: (B, H, W, C), (B,) -> (B, H, W, C)."""
    scale = (t.astype(jnp.float32) / 100.0)[:, None, None, None]
    return jnp.tanh(x_t) * scale + 0.2 * jnp.mean(x_t, axis=(1, 2, 3), keepdims=True)


def test_ddim_timesteps_evenly_spaced():
    timesteps = diffusion.ddim_timesteps(1000, 50)
    assert timesteps.shape == (50,) and timesteps[0] == 0 and timesteps[-1] == 999
    gaps = np.diff(timesteps)
    assert gaps.min() >= 20 and gaps.max() <= 21
    np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 10), np.arange(10))
    np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 1), [9])


def test_ddim_eta_zero_is_deterministic_given_initial_noise():
    schedule = diffusion.make_schedule("cosine", 100)
    shape = (4, 6, 6, 1)
    sample = jax.jit(partial(diffusion.ddim_sample, schedule, _toy_model, shape=shape,
                             num_steps=20, eta=0.0))
    noise = jax.random.normal(jax.random.key(8), shape)
    first = sample(jax.random.key(0), x_init=noise)
    np.testing.assert_array_equal(first, sample(jax.random.key(1), x_init=noise))
    other = sample(jax.random.key(0), x_init=jax.random.normal(jax.random.key(9), shape))
    assert np.max(np.abs(np.asarray(first - other))) > 1e-3
    # Without x_init the initial noise comes from rng: same key, same samples.
    np.testing.assert_array_equal(sample(jax.random.key(2)), sample(jax.random.key(2)))
    assert np.max(np.abs(np.asarray(sample(jax.random.key(2)) - sample(jax.random.key(3))))) > 1e-3
    # eta > 0 does use rng for every step.
    noisy = jax.jit(partial(diffusion.ddim_sample, schedule, _toy_model, shape=shape,
                            num_steps=20, eta=1.0))
    assert np.max(np.abs(np.asarray(noisy(jax.random.key(0), x_init=noise)
                                    - noisy(jax.random.key(1), x_init=noise)))) > 1e-3


@pytest.mark.parametrize("parameterization, eta", [("eps", 0.0), ("x0", 0.0), ("v", 0.0),
                                                   ("eps", 1.0)])
def test_ddim_with_oracle_recovers_the_data_point(parameterization, eta):
    schedule = diffusion.make_schedule("cosine", 1000)
    target = jax.random.uniform(jax.random.key(10), (1, 8, 8, 1), minval=-0.9, maxval=0.9)
    model_fn = _oracle_model(schedule, parameterization, target)
    samples = jax.jit(partial(diffusion.ddim_sample, schedule, model_fn, shape=(4, 8, 8, 1),
                              num_steps=25, eta=eta, parameterization=parameterization))(
        jax.random.key(11))
    np.testing.assert_allclose(samples, np.broadcast_to(target, samples.shape), atol=1e-4)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_ddpm_with_oracle_concentrates_at_the_data_point(parameterization):
    schedule = diffusion.make_schedule("linear", 1000)
    target = jax.random.uniform(jax.random.key(12), (1, 8, 8, 1), minval=-0.9, maxval=0.9)
    model_fn = _oracle_model(schedule, parameterization, target)
    samples = jax.jit(partial(diffusion.ddpm_sample, schedule, model_fn, shape=(8, 8, 8, 1),
                              parameterization=parameterization))(jax.random.key(13))
    np.testing.assert_allclose(samples, np.broadcast_to(target, samples.shape), atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_reproduce_two_point_mixture_weights(sampler):
    """Every sample lands on one of two points, in proportions 0.3 / 0.7."""
    schedule = diffusion.make_schedule("cosine", 1000)
    points = jnp.stack([jnp.full((4, 4, 1), -0.5), jnp.full((4, 4, 1), 0.5).at[0, 0, 0].set(-0.5)])
    model_fn = _oracle_model(schedule, "eps", points, weights=[0.3, 0.7])
    num_samples = 1024
    if sampler == "ddpm":
        run = partial(diffusion.ddpm_sample, schedule, model_fn, shape=(num_samples, 4, 4, 1))
    else:
        run = partial(diffusion.ddim_sample, schedule, model_fn, shape=(num_samples, 4, 4, 1),
                      num_steps=100, eta=0.0)
    samples = np.asarray(jax.jit(run)(jax.random.key(14))).reshape(num_samples, -1)
    distances = np.linalg.norm(samples[:, None, :] - np.asarray(points).reshape(1, 2, -1), axis=-1)
    assert np.all(distances.min(axis=1) < 1e-3)
    fraction = np.mean(distances.argmin(axis=1) == 1)
    assert abs(fraction - 0.7) < 4 * np.sqrt(0.21 / num_samples), fraction


def test_ddpm_with_gaussian_oracle_matches_data_moments():
    """Data ~ N(mu, sigma^2) per pixel: E[x0 | x_t] is linear; samples have its mean and std."""
    schedule = diffusion.make_schedule("linear", 1000)
    mu, sigma = 0.2, 0.3

    def model_fn(x_t, t):
        a = schedule.alphas_cumprod[t][:, None, None, None]
        x0 = mu + jnp.sqrt(a) * sigma ** 2 / (a * sigma ** 2 + 1.0 - a) * (x_t - jnp.sqrt(a) * mu)
        return diffusion.x0_to_eps(schedule, x_t, t, x0)

    samples = np.asarray(jax.jit(partial(diffusion.ddpm_sample, schedule, model_fn,
                                         shape=(1024, 4, 4, 1), clip_x0=False))(
        jax.random.key(15)), np.float64)
    assert abs(samples.mean() - mu) < 5 * sigma / np.sqrt(samples.size)
    # 1000 discrete steps with the posterior variance leave an O(1/T) bias (~1.5%).
    assert abs(samples.std() / sigma - 1.0) < 0.04


def test_ddim_with_eta_one_on_all_steps_is_ddpm():
    schedule = diffusion.make_schedule("linear", 200, beta_start=5e-4, beta_end=0.1)
    shape = (4, 5, 5, 1)
    rng = jax.random.key(16)
    ddpm = jax.jit(partial(diffusion.ddpm_sample, schedule, _toy_model, shape=shape))(rng)
    ddim = jax.jit(partial(diffusion.ddim_sample, schedule, _toy_model, shape=shape,
                           num_steps=200, eta=1.0))(rng)
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_sharded_over_devices_equals_unsharded(sampler):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    schedule = diffusion.make_schedule("cosine", 50)
    shape = (16, 6, 6, 1)
    if sampler == "ddpm":
        run = partial(diffusion.ddpm_sample, schedule, _toy_model, shape=shape)
    else:
        run = partial(diffusion.ddim_sample, schedule, _toy_model, shape=shape, num_steps=10,
                      eta=0.5)
    rng = jax.random.key(17)
    x_init = jax.random.normal(jax.random.key(18), shape)

    unsharded = jax.jit(run)(rng, x_init=x_init)
    sharded_init = jax.device_put(x_init, batch_sharding)
    sharded = jax.jit(run, out_shardings=batch_sharding)(
        jax.device_put(rng, NamedSharding(mesh, P())), x_init=sharded_init)
    assert sharded.sharding.is_equivalent_to(batch_sharding, len(shape))
    assert len(sharded.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-6)
