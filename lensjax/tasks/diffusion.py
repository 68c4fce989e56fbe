"""Diffusion generation (Specific Test IV): a UNet denoiser trained on lensing images.

Training minimises `lensjax.diffusion.diffusion_loss` on images in [0, 1] mapped to
the model's [-1, 1]; the noise process is set by `config.diffusion` (schedule,
num_steps, parameterization, weighting) and travels with the model
(`DiffusionModel.settings`), so a restored checkpoint samples with the process it
was trained for. The best checkpoint is the one with the lowest held-out denoising
loss on the selection set (`predict`: fixed timesteps, noise seeded by each
example's index, so the number does not depend on batch size or device count).

Evaluation (`evaluate`) generates `config.eval.num_samples` images (default 5,000)
with `config.sample` (sampler "ddim" or "ddpm", steps, eta, seed), sharded over
every device, and compares them with as many images of the held-out split, never
training data: the Jensen-Shannon distance of pixel histograms, the ratio of
radially averaged power spectra, FLD (Frechet distance of the penultimate features
of a lensjax classifier, `config.eval.fld_workdir`) and FID (the FID Inception
network with weights from the local file `config.eval.inception_weights`). Sample
i always uses the key fold_in(key(seed), i): the same images for any batch size,
device count or process count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lensjax import diffusion, models, parallel
from lensjax.data import pipeline
from lensjax.tasks import image_features

Array = jax.Array

AUX_METRICS: tuple[str, ...] = ()
SELECTION_METRIC = ("heldout_loss", "min")

SAMPLERS = ("ddim", "ddpm")
DEFAULT_NUM_SAMPLES = 5000
# Root of the held-out loss noise: example i at timestep t uses fold_in(fold_in(key, i), t).
HELDOUT_NOISE_SEED = 0
GRID_IMAGES = 16


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The noise process a denoiser is trained for (hashable: a static model attribute)."""

    schedule: str = "cosine"
    num_steps: int = 1000
    parameterization: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = diffusion.MIN_SNR_GAMMA
    heldout_timesteps: int = 8      # size of the fixed timestep grid of the held-out loss

    def __post_init__(self):
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(f"config.diffusion.schedule must be one of {diffusion.SCHEDULES}, "
                             f"got {self.schedule!r}")
        if self.parameterization not in diffusion.PARAMETERIZATIONS:
            raise ValueError(f"config.diffusion.parameterization must be one of "
                             f"{diffusion.PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.weighting not in diffusion.WEIGHTINGS:
            raise ValueError(f"config.diffusion.weighting must be one of {diffusion.WEIGHTINGS}, "
                             f"got {self.weighting!r}")
        if self.num_steps < 1 or not 1 <= self.heldout_timesteps <= self.num_steps:
            raise ValueError(f"need num_steps >= 1 and 1 <= heldout_timesteps <= num_steps, got "
                             f"{self.num_steps} and {self.heldout_timesteps}")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn: "ddim" with `steps` and `eta`, or "ddpm" (all T steps)."""

    sampler: str = "ddim"
    steps: int = 100
    eta: float = 0.0

    def check(self, num_train_steps: int) -> "SamplerSettings":
        """Raise ValueError on an unknown sampler or steps/eta out of range; returns self."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "ddim" and not 1 <= self.steps <= num_train_steps:
            raise ValueError(f"DDIM steps must be in [1, {num_train_steps}] (the training "
                             f"schedule's T), got {self.steps}")
        if not self.eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        return self

    def describe(self, num_train_steps: int) -> dict[str, Any]:
        """What a report states about the sampler (DDPM always takes all T steps)."""
        if self.sampler == "ddpm":
            return {"sampler": "ddpm", "steps": num_train_steps, "eta": None,
                    "note": "ancestral sampling with the posterior variance"}
        return {"sampler": "ddim", "steps": self.steps, "eta": self.eta}

    def text(self, num_train_steps: int) -> str:
        """A short label for figures and headlines, e.g. "DDIM, 100 steps, eta = 0"."""
        if self.sampler == "ddpm":
            return f"DDPM, {num_train_steps} steps"
        return f"DDIM, {self.steps} steps, eta = {self.eta:g}"


def diffusion_settings(config: ml_collections.ConfigDict) -> DiffusionSettings:
    """DiffusionSettings from config.diffusion (missing fields take the defaults)."""
    given = dict(config.get("diffusion", {}) or {})
    fields = {f.name for f in dataclasses.fields(DiffusionSettings)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown config.diffusion fields {unknown}; valid: {sorted(fields)}")
    return DiffusionSettings(**given)


def sampler_settings(config: ml_collections.ConfigDict, **overrides: Any) -> SamplerSettings:
    """SamplerSettings from config.sample, with `overrides` (None values ignored)."""
    sample = config.get("sample", {}) or {}
    values = {"sampler": sample.get("sampler", "ddim"), "steps": sample.get("steps", 100),
              "eta": sample.get("eta", 0.0)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerSettings(str(values["sampler"]), int(values["steps"]), float(values["eta"]))


def pixel_scale_arcsec(config: ml_collections.ConfigDict) -> float:
    """Pixel scale of the images in arcsec: that of `config.data.preset`, which for the
    official files is the preset simulating them (diffusion: 0.05"/pix, as Test IV)."""
    return float(pipeline.preset_from_config(config.data).pixel_scale)


# ----------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------

class DiffusionModel(nnx.Module):
    """A denoising network (x_t (B, H, W, 1), t (B,)) -> prediction, with its noise process.

    The settings are static (part of the graph definition): a restored model
    samples and scores with the schedule and parameterisation it was trained for.
    """

    def __init__(self, network: nnx.Module, settings: DiffusionSettings):
        self.network = network
        self.settings = settings

    def schedule(self) -> diffusion.NoiseSchedule:
        """The discrete noise schedule (T,) arrays of the settings."""
        return diffusion.make_schedule(self.settings.schedule, self.settings.num_steps)

    def denoiser(self, rngs: nnx.Rngs | None = None) -> diffusion.ModelFn:
        """model_fn(x_t, t) for lensjax.diffusion; `rngs` feeds dropout in train mode."""
        if rngs is None:
            return lambda x_t, t: self.network(x_t, t)
        return lambda x_t, t: self.network(x_t, t, rngs=rngs)


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiffusionModel:
    """config.model.name (e.g. "unet") with config.model.kwargs, sized for the data."""
    normalization = config.data.get("normalization", "none")
    if normalization == "standardize":
        raise ValueError("the diffusion task maps images in [0, 1] to [-1, 1]; "
                         "config.data.normalization must be 'none' or 'minmax', not 'standardize'")
    kwargs = dict(config.model.get("kwargs", {}) or {})
    kwargs.setdefault("image_size", pipeline.image_shape(config)[0])
    network = models.get_model(config.model.name, rngs=rngs, **kwargs)
    return DiffusionModel(network, diffusion_settings(config))


def loss_fn(model: DiffusionModel, batch: dict, rng: Array) -> tuple[Array, dict]:
    """Mean weighted denoising loss of batch["image"] (B, H, W, 1) in [0, 1]."""
    s = model.settings
    noise_rng, dropout_rng = jax.random.split(rng)
    losses = diffusion.diffusion_loss(
        model.schedule(), model.denoiser(nnx.Rngs(dropout=dropout_rng)),
        diffusion.to_model_space(batch["image"]), noise_rng,
        parameterization=s.parameterization, weighting=s.weighting, min_snr_gamma=s.min_snr_gamma)
    return losses.mean(), {}


def heldout_timestep_grid(num_train_steps: int, count: int) -> np.ndarray:
    """`count` fixed timesteps (count,) int32 at the midpoints of equal strata of [0, T).

    Averaging the loss over them is a stratified estimate of the training objective's
    expectation over uniform t, without its sampling noise.
    """
    return np.floor((np.arange(count) + 0.5) * num_train_steps / count).astype(np.int32)


def heldout_losses(model: DiffusionModel, images: Array, index: Array) -> Array:
    """Per-example denoising loss (B,) of images (B, H, W, 1) in [0, 1] on the fixed grid.

    Example `index[b]` at timestep t draws its noise from
    fold_in(fold_in(key(HELDOUT_NOISE_SEED), index[b]), t), so its loss is the same
    in any batch and on any device.
    """
    s = model.settings
    schedule, denoise = model.schedule(), model.denoiser()
    x0 = diffusion.to_model_space(images)
    base = jax.random.key(HELDOUT_NOISE_SEED)
    example_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)

    def at_timestep(t: Array) -> Array:
        def one(x: Array, key: Array) -> Array:
            return diffusion.diffusion_loss(
                schedule, denoise, x[None], jax.random.fold_in(key, t),
                parameterization=s.parameterization, weighting=s.weighting,
                min_snr_gamma=s.min_snr_gamma, t=jnp.full((1,), t, jnp.int32))[0]
        return jax.vmap(one)(x0, example_keys)

    # One timestep at a time: memory of one forward pass of the batch.
    timesteps = jnp.asarray(heldout_timestep_grid(s.num_steps, s.heldout_timesteps))
    return jax.lax.map(at_timestep, timesteps).mean(axis=0)


def predict(model: DiffusionModel, batch: dict) -> dict:
    """{"loss": (B,)}: the held-out denoising loss of every example (see heldout_losses)."""
    return {"loss": heldout_losses(model, batch["image"], batch["index"])}


def _valid(batch: dict, limit: int | None) -> np.ndarray:
    """Host mask (B,) of the real examples of a held-out batch among the split's first `limit`."""
    mask = parallel.to_host(batch["mask"])
    if limit is not None:
        mask = mask & (parallel.to_host(batch["index"]) < limit)
    return mask


def heldout_loss(config: ml_collections.ConfigDict, trained, mesh: jax.sharding.Mesh,
                 split: str, limit: int | None = None) -> tuple[float, int]:
    """(mean held-out denoising loss, number of images) over the valid examples of a split."""
    total, count = 0.0, 0
    for batch in pipeline.heldout_iterator(config, mesh, split, limit):
        losses = parallel.to_host(trained.predict(batch)["loss"])
        mask = _valid(batch, limit)
        # float64 sums: the mean does not depend on how examples are grouped in batches.
        total += float(np.sum(losses[mask], dtype=np.float64))
        count += int(mask.sum())
    if count == 0:
        raise ValueError(f"the {split!r} split holds no examples")
    return total / count, count


def selection_metrics(config: ml_collections.ConfigDict, trained, mesh) -> dict:
    """Held-out denoising loss on the model-selection set."""
    loss, _ = heldout_loss(config, trained, mesh, "selection")
    return {"heldout_loss": loss}


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------

def sample_images(model: DiffusionModel, indices: Array, seed: Array, *,
                  sampler: SamplerSettings, image_shape: tuple[int, int, int]) -> Array:
    """Samples number `indices` (B,) int32 of the run `seed`: (B, H, W, C) in [0, 1].

    Each sample runs the sampler on its own key fold_in(key(seed), index) (initial
    noise and every stochastic step), batched with vmap: a sample does not depend
    on which batch, device or process computes it.
    """
    s = model.settings
    schedule, denoise = model.schedule(), model.denoiser()
    root = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(indices)
    shape = (1, *image_shape)

    def one(key: Array) -> Array:
        if sampler.sampler == "ddpm":
            x = diffusion.ddpm_sample(schedule, denoise, key, shape,
                                      parameterization=s.parameterization)
        else:
            x = diffusion.ddim_sample(schedule, denoise, key, shape, num_steps=sampler.steps,
                                      eta=sampler.eta, parameterization=s.parameterization)
        return x[0]

    return diffusion.from_model_space(jax.vmap(one)(keys))


def sample_batch_size(requested: int, num: int, mesh: jax.sharding.Mesh) -> int:
    """The global sampling batch: `requested`, but no larger than `num` rounded up to a
    multiple of the device count (a few images need not pay for a large batch)."""
    parallel.check_global_batch(requested, mesh)
    return min(requested, -(-num // mesh.size) * mesh.size)


def generate(trained, num: int, *, sampler: SamplerSettings, image_shape: tuple[int, int, int],
             seed: int = 0, batch_size: int, progress: bool = True
             ) -> Iterator[tuple[int, np.ndarray]]:
    """Samples 0..num-1 in order, as (start, images (b, H, W, C) float32 in [0, 1]) chunks.

    `trained` is a diffusion `train.TrainedModel` (EMA parameters when the run kept
    them); each chunk of `batch_size` (a multiple of the device count) is sharded
    over `trained.mesh`, the last one padded. Every process receives every chunk.
    """
    if num < 1:
        raise ValueError(f"the number of samples must be >= 1, got {num}")
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    mesh = trained.mesh
    parallel.check_global_batch(batch_size, mesh)
    sampler.check(trained.model().settings.num_steps)
    sharding = parallel.batch_sharding(mesh)
    run = trained.jit(functools.partial(sample_images, sampler=sampler,
                                        image_shape=tuple(image_shape)),
                      out_shardings=sharding)
    seed_array = parallel.global_array_from_host(np.asarray(seed, np.int32),
                                                 parallel.replicated(mesh))
    from tqdm.auto import tqdm
    with tqdm(total=num, desc=f"sampling ({sampler.sampler})", unit="image",
              disable=not progress or jax.process_index() > 0) as bar:
        for start in range(0, num, batch_size):
            indices = np.arange(start, start + batch_size, dtype=np.int32)
            images = parallel.to_host(run(parallel.global_array_from_host(indices, sharding),
                                          seed_array))
            count = min(batch_size, num - start)
            bar.update(count)
            yield start, images[:count].astype(np.float32)


def generate_all(trained, num: int, **kwargs: Any) -> np.ndarray:
    """All `num` samples (num, H, W, C) of `generate` in one array."""
    return np.concatenate([images for _, images in generate(trained, num, **kwargs)])


def collect_images(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, split: str,
                   limit: int) -> np.ndarray:
    """The first `limit` images (N, H, W, 1) of a held-out split, in split order (N < limit
    when the split is smaller)."""
    images, indices = [], []
    for batch in pipeline.heldout_iterator(config, mesh, split, limit):
        mask = _valid(batch, limit)
        images.append(parallel.to_host(batch["image"])[mask])
        indices.append(parallel.to_host(batch["index"])[mask])
    order = np.argsort(np.concatenate(indices), kind="stable")
    return np.concatenate(images)[order].astype(np.float32)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def physical_statistics(generated: np.ndarray, real: np.ndarray, pixel_scale: float) -> dict:
    """Pixel-histogram distance and the radially averaged power-spectrum ratio."""
    from lensjax.metrics import lens_stats
    edges, p_generated = lens_stats.pixel_histogram(generated)
    _, p_real = lens_stats.pixel_histogram(real)
    k, ratio = lens_stats.power_spectrum_ratio(generated, real, pixel_scale)
    nyquist = 0.5 / pixel_scale
    usable = (k > 0) & (k <= nyquist) & np.isfinite(ratio) & (ratio > 0)
    return {
        "pixel_histogram": {
            "jensen_shannon_distance_bits": lens_stats.jensen_shannon_distance(p_generated, p_real),
            "bins": int(len(p_real)), "range": [float(edges[0]), float(edges[-1])],
            "edges": edges.tolist(), "generated": p_generated.tolist(), "real": p_real.tolist()},
        "power_spectrum_ratio": {
            "mean_abs_log10_ratio": float(np.mean(np.abs(np.log10(ratio[usable])))),
            "summary_range": "0 < k <= Nyquist",
            "pixel_scale_arcsec": pixel_scale, "nyquist_per_arcsec": nyquist,
            "k_per_arcsec": k.tolist(),
            "ratio": [float(r) if np.isfinite(r) else None for r in ratio]},
    }


def _format(result: dict, key: str = "value") -> str:
    return f"{result[key]:.4g}" if key in result else result["status"].split(":")[0]


def evaluate(config: ml_collections.ConfigDict, trained, mesh: jax.sharding.Mesh,
             outdir: str | Path) -> dict:
    """Generate config.eval.num_samples images, compare with as many held-out images;
    figures samples.png, power_spectrum_ratio.png and pixel_histogram.png in `outdir`."""
    from lensjax import plots
    outdir = Path(outdir)
    num = int(config.eval.get("num_samples", DEFAULT_NUM_SAMPLES))
    settings = trained.model().settings
    sampler = sampler_settings(config).check(settings.num_steps)
    sample_config = config.get("sample", {}) or {}
    seed = int(sample_config.get("seed", 0))
    batch_size = sample_batch_size(int(sample_config.get("batch_size", config.eval.batch_size)),
                                   num, mesh)
    generated = generate_all(trained, num, sampler=sampler, seed=seed, batch_size=batch_size,
                             image_shape=pipeline.image_shape(config))
    real = collect_images(config, mesh, "heldout", num)
    if len(real) < num:
        logging.warning("the held-out split holds %d images, fewer than the %d generated; "
                        "comparing %d generated with %d real", len(real), num, num, len(real))
    loss, loss_count = heldout_loss(config, trained, mesh, "heldout", limit=num)
    scale = pixel_scale_arcsec(config)
    stats = physical_statistics(generated, real, scale)
    metrics = {
        "num_generated": int(len(generated)), "num_real": int(len(real)),
        "sampler": {**sampler.describe(settings.num_steps), "seed": seed,
                    "parameterization": settings.parameterization,
                    "schedule": f"{settings.schedule}, T = {settings.num_steps}",
                    "parameters": "EMA" if trained.use_ema and "ema_params" in trained.state
                    else "raw"},
        "fid": image_features.fid_metric(config, generated, real),
        "fld": image_features.fld_metric(config, generated, real),
        **stats,
        "heldout_denoising_loss": {
            "value": loss, "num_images": loss_count, "weighting": settings.weighting,
            "parameterization": settings.parameterization,
            "timesteps": heldout_timestep_grid(settings.num_steps,
                                               settings.heldout_timesteps).tolist()},
    }
    data = {**pipeline.describe(config, "heldout"), "num_real_used": int(len(real))}
    figures = {}
    if jax.process_index() == 0:
        count = min(GRID_IMAGES, len(generated), len(real))
        figures["samples"] = plots.plot_image_grids(
            {"generated": generated[:count], "held-out (real)": real[:count]},
            outdir / "samples.png", pixel_scale_arcsec=scale,
            title=f"{sampler.text(settings.num_steps)}, seed {seed}")
        ps = stats["power_spectrum_ratio"]
        figures["power_spectrum_ratio"] = plots.plot_power_spectrum_ratio(
            np.asarray(ps["k_per_arcsec"]), np.asarray(ps["ratio"], dtype=np.float64),
            outdir / "power_spectrum_ratio.png", nyquist_per_arcsec=ps["nyquist_per_arcsec"],
            title=f"{len(generated)} generated / {len(real)} held-out images")
        hist = stats["pixel_histogram"]
        figures["pixel_histogram"] = plots.plot_pixel_histograms(
            np.asarray(hist["edges"]), {f"generated (N = {len(generated)})": hist["generated"],
                                        f"held-out (N = {len(real)})": hist["real"]},
            outdir / "pixel_histogram.png",
            title=f"JS distance {hist['jensen_shannon_distance_bits']:.4f} bits")
    headline = (f"FID {_format(metrics['fid'])}, FLD {_format(metrics['fld'])}, pixel-histogram "
                f"JS distance {stats['pixel_histogram']['jensen_shannon_distance_bits']:.4f}, "
                f"mean |log10 P ratio| "
                f"{stats['power_spectrum_ratio']['mean_abs_log10_ratio']:.4f}; {len(generated)} "
                f"generated ({sampler.text(settings.num_steps)}) vs {len(real)} "
                f"held-out images ({data['split']})")
    return {"metrics": metrics, "data": data, "figures": figures, "headline": headline}

