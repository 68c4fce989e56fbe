"""Gaussian diffusion maths as pure functions: schedules, forward process, losses, samplers.

    schedule = make_schedule("cosine", 1000)
    loss = diffusion_loss(schedule, model_fn, to_model_space(images), rng,
                          parameterization="eps", weighting="min_snr")      # (B,)
    x = ddim_sample(schedule, model_fn, rng, (16, 150, 150, 1), num_steps=100,
                    parameterization="eps")
    images = from_model_space(x)                                            # in [0, 1]

Conventions
-----------
Time is discrete: index ``t`` in ``[0, T)``. ``alphas_cumprod[t]`` (written ``a``
below) is the product of ``1 - betas[s]`` for ``s <= t``, so index 0 is the
first noising step (``x_1`` in Ho et al. 2020) and index ``T - 1`` the last;
"going back one step" from index 0 reaches clean data (``a_prev = 1``).

    x_t = sqrt(a) x0 + sqrt(1 - a) eps,      SNR(t) = a / (1 - a)

A network predicts one of three quantities (``parameterization``):
"eps" (the noise), "x0" (the clean image), or "v" = sqrt(a) eps - sqrt(1 - a) x0
(Salimans & Ho 2022). ``model_fn(x_t, t) -> prediction`` takes ``x_t`` (B, ...)
and integer timesteps ``t`` (B,) and returns an array shaped like ``x_t``.

Images in [0, 1] are mapped to [-1, 1] for the model (`to_model_space`); the
samplers clip their running estimate of x0 to [-1, 1] by default, so
`from_model_space` of a sample is a valid image.

Everything here is jittable; samplers run their reverse loop with
``jax.lax.scan`` and take the number of steps from static shapes/ints, so a
caller can ``jax.jit`` them with the model closed over (or passed through
``functools.partial``) and shard the batch with ``NamedSharding``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr")

# Nichol & Dhariwal (2021): offset s keeps beta_0 from being vanishingly small,
# and the clip stops the last betas (where a -> 0) from reaching 1.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999
# Hang et al. (2023): the truncation value of the SNR in min-SNR weighting.
MIN_SNR_GAMMA = 5.0


class NoiseSchedule(NamedTuple):
    """A discrete noise schedule; every field is a float32 array of shape (T,).

    Derived terms are computed in float64 before the cast, since e.g.
    ``1 - alphas_cumprod`` loses most of its digits in float32 near t = 0.
    """

    betas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array           # a at t - 1; 1 at t = 0
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    snr: Array                           # a / (1 - a)
    posterior_variance: Array            # variance of q(x_{t-1} | x_t, x0); 0 at t = 0
    posterior_mean_coef_x0: Array        # mean of q(x_{t-1} | x_t, x0) = coef_x0 x0 + coef_xt x_t
    posterior_mean_coef_xt: Array

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------

def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020) betas, evenly spaced from beta_start to beta_end: (T,) float64.

    The defaults are the values for T = 1000; for much smaller T the last
    ``alphas_cumprod`` stays far from 0 (x_T is not pure noise) unless the
    betas are scaled up by 1000 / T.
    """
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_alphas_cumprod(num_steps: int, s: float = COSINE_OFFSET) -> np.ndarray:
    """Closed form of the cosine schedule, f(i) / f(0) for i = 0..T: (T + 1,) float64.

    f(i) = cos(((i / T + s) / (1 + s)) * pi / 2) ** 2; entry i + 1 is
    alphas_cumprod at index i before the beta clip.
    """
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1.0 + s) * (math.pi / 2.0)) ** 2
    return f / f[0]


def cosine_betas(num_steps: int, s: float = COSINE_OFFSET,
                 max_beta: float = COSINE_MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal (2021) betas 1 - abar(i + 1) / abar(i), clipped at max_beta: (T,)."""
    abar = cosine_alphas_cumprod(num_steps, s)
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, max_beta)


def schedule_from_betas(betas: np.ndarray) -> NoiseSchedule:
    """All schedule terms from betas (T,) in (0, 1)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0.0) & (betas < 1.0)):
        raise ValueError("every beta must lie in (0, 1)")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus_abar = -np.expm1(np.cumsum(np.log1p(-betas)))    # 1 - abar without cancellation
    one_minus_abar_prev = np.concatenate([[0.0], one_minus_abar[:-1]])
    fields = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
        snr=abar / one_minus_abar,
        posterior_variance=betas * one_minus_abar_prev / one_minus_abar,
        posterior_mean_coef_x0=betas * np.sqrt(abar_prev) / one_minus_abar,
        posterior_mean_coef_xt=one_minus_abar_prev * np.sqrt(alphas) / one_minus_abar,
    )
    return NoiseSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in fields.items()})


def make_schedule(kind: str, num_steps: int, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = COSINE_OFFSET) -> NoiseSchedule:
    """The "linear" or "cosine" schedule with T = num_steps steps (beta_* apply to "linear")."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {kind!r}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if kind == "linear":
        return schedule_from_betas(linear_betas(num_steps, beta_start, beta_end))
    return schedule_from_betas(cosine_betas(num_steps, cosine_s))


# ----------------------------------------------------------------------------
# Data space
# ----------------------------------------------------------------------------

def to_model_space(images: Array) -> Array:
    """Images in [0, 1] -> the model's range [-1, 1] (same shape)."""
    return 2.0 * images - 1.0


def from_model_space(x: Array) -> Array:
    """Model-space arrays -> images clipped to [0, 1] (same shape)."""
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------

def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, "
                         f"got {parameterization!r}")


def _at(coefficients: Array, t: Array, ndim: int) -> Array:
    """coefficients[t] for t (B,), shaped (B, 1, ..., 1) to broadcast against an ndim-array."""
    values = coefficients[jnp.asarray(t, jnp.int32)]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(schedule: NoiseSchedule, x0: Array, t: Array, noise: Array) -> Array:
    """Sample of q(x_t | x0): x0, noise (B, ...), t (B,) int -> x_t (B, ...)."""
    return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def training_target(schedule: NoiseSchedule, x0: Array, t: Array, noise: Array,
                    parameterization: str) -> Array:
    """What a model of `parameterization` should output for (x0, t, noise): (B, ...)."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def prediction_to_x0(schedule: NoiseSchedule, x_t: Array, t: Array, prediction: Array,
                     parameterization: str) -> Array:
    """Estimate of x0 implied by a model prediction at (x_t, t): (B, ...)."""
    _check_parameterization(parameterization)
    sqrt_a = _at(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    sqrt_1ma = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if parameterization == "eps":
        return (x_t - sqrt_1ma * prediction) / sqrt_a
    if parameterization == "x0":
        return prediction
    # sqrt(a)^2 + sqrt(1 - a)^2 = 1 turns the v definition into this inverse.
    return sqrt_a * x_t - sqrt_1ma * prediction


def prediction_to_eps(schedule: NoiseSchedule, x_t: Array, t: Array, prediction: Array,
                      parameterization: str) -> Array:
    """Estimate of the noise implied by a model prediction at (x_t, t): (B, ...)."""
    _check_parameterization(parameterization)
    sqrt_a = _at(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    sqrt_1ma = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if parameterization == "eps":
        return prediction
    if parameterization == "x0":
        return (x_t - sqrt_a * prediction) / sqrt_1ma
    return sqrt_1ma * x_t + sqrt_a * prediction


def x0_to_eps(schedule: NoiseSchedule, x_t: Array, t: Array, x0: Array) -> Array:
    """The noise that takes x0 to x_t at step t: (B, ...)."""
    return prediction_to_eps(schedule, x_t, t, x0, "x0")


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

def loss_weight(schedule: NoiseSchedule, t: Array, *, parameterization: str, weighting: str,
                min_snr_gamma: float = MIN_SNR_GAMMA) -> Array:
    """Per-example weight (B,) of the squared error on the predicted quantity.

    "min_snr" makes every parameterisation's weighted loss equal
    min(SNR, gamma) * |x0 - x0_hat|^2 (Hang et al. 2023): the squared error in
    eps is SNR times that in x0, and in v it is (SNR + 1) times, so the weights
    are min(SNR, gamma) / SNR, min(SNR, gamma) and min(SNR, gamma) / (SNR + 1).
    """
    _check_parameterization(parameterization)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    snr = schedule.snr[jnp.asarray(t, jnp.int32)]
    if weighting == "none":
        return jnp.ones_like(snr)
    if parameterization == "eps":
        # min(SNR, gamma) / SNR written so that SNR -> 0 gives 1, not 0/0.
        return jnp.minimum(1.0, min_snr_gamma / snr)
    if parameterization == "x0":
        return jnp.minimum(snr, min_snr_gamma)
    return jnp.minimum(snr, min_snr_gamma) / (snr + 1.0)


def diffusion_loss(schedule: NoiseSchedule, model_fn: ModelFn, x0: Array, rng: Array, *,
                   parameterization: str = "eps", weighting: str = "none",
                   min_snr_gamma: float = MIN_SNR_GAMMA, t: Array | None = None) -> Array:
    """Weighted mean squared error per example (B,) for clean data x0 (B, ...) in model space.

    t ~ uniform{0, ..., T - 1} per example unless `t` (B,) is given (e.g. fixed
    timesteps for a low-variance validation loss); noise ~ N(0, I) from `rng`.
    """
    t_rng, noise_rng = jax.random.split(rng)
    batch = x0.shape[0]
    if t is None:
        t = jax.random.randint(t_rng, (batch,), 0, schedule.num_steps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    prediction = model_fn(x_t, t).astype(jnp.float32)
    target = training_target(schedule, x0, t, noise, parameterization)
    squared_error = jnp.mean(jnp.square(prediction - target).reshape(batch, -1), axis=-1)
    return loss_weight(schedule, t, parameterization=parameterization, weighting=weighting,
                       min_snr_gamma=min_snr_gamma) * squared_error


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------

def _x0_and_eps(schedule: NoiseSchedule, model_fn: ModelFn, x_t: Array, t: Array,
                parameterization: str, clip_x0: bool) -> tuple[Array, Array]:
    """The model's (x0, eps) estimates at (x_t, t); eps is recomputed from a clipped x0."""
    prediction = model_fn(x_t, t).astype(jnp.float32)
    x0 = prediction_to_x0(schedule, x_t, t, prediction, parameterization)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        return x0, x0_to_eps(schedule, x_t, t, x0)
    return x0, prediction_to_eps(schedule, x_t, t, prediction, parameterization)


def _initial_noise(rng: Array, shape: tuple[int, ...], x_init: Array | None) -> Array:
    if x_init is None:
        return jax.random.normal(rng, shape, dtype=jnp.float32)
    if tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {x_init.shape}, expected {tuple(shape)}")
    return x_init.astype(jnp.float32)


def ddpm_sample(schedule: NoiseSchedule, model_fn: ModelFn, rng: Array, shape: tuple[int, ...],
                *, parameterization: str = "eps", clip_x0: bool = True,
                x_init: Array | None = None) -> Array:
    """Ancestral sampling (Ho et al. 2020) through all T steps: -> samples `shape` in model space.

    Each step draws x_{t-1} from q(x_{t-1} | x_t, x0 = model estimate), i.e. the
    reverse variance is the posterior variance beta_tilde ("fixed small"); the
    last step (t = 0) returns the x0 estimate itself. `x_init` (shape) replaces
    the initial N(0, I) draw.
    """
    _check_parameterization(parameterization)
    init_rng, step_rng = jax.random.split(rng)
    x = _initial_noise(init_rng, shape, x_init)
    timesteps = jnp.arange(schedule.num_steps - 1, -1, -1, dtype=jnp.int32)
    step_rngs = jax.random.split(step_rng, schedule.num_steps)

    def step(x_t: Array, inputs: tuple[Array, Array]) -> tuple[Array, None]:
        t, key = inputs
        t_batch = jnp.full((shape[0],), t, dtype=jnp.int32)
        x0, _ = _x0_and_eps(schedule, model_fn, x_t, t_batch, parameterization, clip_x0)
        mean = (_at(schedule.posterior_mean_coef_x0, t_batch, x_t.ndim) * x0
                + _at(schedule.posterior_mean_coef_xt, t_batch, x_t.ndim) * x_t)
        std = jnp.sqrt(_at(schedule.posterior_variance, t_batch, x_t.ndim))
        # posterior_variance is 0 at t = 0, so the last step adds no noise.
        return mean + std * jax.random.normal(key, x_t.shape, dtype=x_t.dtype), None

    x, _ = jax.lax.scan(step, x, (timesteps, step_rngs))
    return x


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced increasing sub-sequence of [0, T) from 0 to T - 1: (num_steps,) int32.

    Both ends are included so sampling starts at the schedule's noisiest step
    (where the initial N(0, I) draw matches x_T best) and ends at step 0.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_train_steps - 1], dtype=np.int32)
    timesteps = np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(np.int32)
    assert np.all(np.diff(timesteps) > 0), timesteps   # distinct because num_steps <= T
    return timesteps


def ddim_sample(schedule: NoiseSchedule, model_fn: ModelFn, rng: Array, shape: tuple[int, ...],
                *, num_steps: int, eta: float = 0.0, parameterization: str = "eps",
                clip_x0: bool = True, x_init: Array | None = None) -> Array:
    """DDIM sampling (Song et al. 2021) on `ddim_timesteps`: -> samples `shape` in model space.

    eta = 0 is deterministic given the initial noise (`x_init`, or drawn from
    `rng`); eta = 1 matches DDPM's ancestral variance on the sub-sequence.
    `num_steps` must be a Python int (it fixes the loop length).
    """
    _check_parameterization(parameterization)
    timesteps = ddim_timesteps(schedule.num_steps, num_steps)
    # a (and 1 - a, kept accurate near a = 1) at the step each update lands on;
    # going below index 0 lands on clean data (a = 1).
    one_minus_abar = schedule.sqrt_one_minus_alphas_cumprod ** 2
    abar_prev = jnp.concatenate([jnp.ones((1,), jnp.float32),
                                 schedule.alphas_cumprod[timesteps[:-1]]])
    one_minus_abar_prev = jnp.concatenate([jnp.zeros((1,), jnp.float32),
                                           one_minus_abar[timesteps[:-1]]])
    init_rng, step_rng = jax.random.split(rng)
    x = _initial_noise(init_rng, shape, x_init)
    step_rngs = jax.random.split(step_rng, num_steps)

    def step(x_t: Array, inputs: tuple[Array, ...]) -> tuple[Array, None]:
        t, a_prev, one_minus_a_prev, key = inputs
        t_batch = jnp.full((shape[0],), t, dtype=jnp.int32)
        x0, eps = _x0_and_eps(schedule, model_fn, x_t, t_batch, parameterization, clip_x0)
        a, one_minus_a = schedule.alphas_cumprod[t], one_minus_abar[t]
        sigma = eta * jnp.sqrt(one_minus_a_prev / one_minus_a * (1.0 - a / a_prev))
        direction = jnp.sqrt(jnp.maximum(one_minus_a_prev - sigma ** 2, 0.0)) * eps
        noise = jax.random.normal(key, x_t.shape, dtype=x_t.dtype)
        return jnp.sqrt(a_prev) * x0 + direction + sigma * noise, None

    x, _ = jax.lax.scan(step, x, (jnp.asarray(timesteps[::-1]), abar_prev[::-1],
                                  one_minus_abar_prev[::-1], step_rngs))
    return x
