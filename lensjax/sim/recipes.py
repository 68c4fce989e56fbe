"""DeepLense simulation presets: priors -> images, labels and latent parameters.

Two published recipes (see shared/SIMULATION.md in the project notes, and the
README's simulator section):

- `DeepLenseSimRecipe` (Recipe A, lenstronomy-based DeepLenseSim): Models I, II,
  III and the VI.A foundation data, classes no_sub / cdm / axion, raw values.
- `PyLensingRecipe` (Recipe B, PyAutoLens-based PyLensing): classes no / sphere /
  vort, min-max normalised; the `common_test` preset.

Every preset has one entry point::

    images, labels, params = preset.sample(key, batch_size)

images: (B, H, W, 1) float, labels: (B,) int32, params: dict of (B, ...) arrays.
Example i of a call uses the key fold_in(key, start_index + i) and, unless a
class is forced with `label=`, the class (start_index + i) % num_classes. So a
batch does not depend on how it is chunked or sharded, and classes are balanced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.sim import cosmology, domain, instrument, light, profiles

Array = jax.Array
Params = dict[str, Array]


# ----------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------

def _uniform(key: Array, low: float, high: float, dtype, shape=()) -> Array:
    return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)


def _rotate_offsets(radius: Array, angle: Array) -> tuple[Array, Array]:
    return radius * jnp.cos(angle), radius * jnp.sin(angle)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Fields and sampling logic shared by every preset (frozen: hashable, jit-static)."""

    name: str
    class_names: tuple[str, ...]
    num_pix: int
    pixel_scale: float
    dtype: str = "float32"

    def __post_init__(self):
        domain.check_positive_int("num_pix", self.num_pix)
        domain.check_positive("pixel_scale", self.pixel_scale)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    # Subclasses implement `render` and, for noise or normalisation, `observe`.
    def render(self, key: Array, label: Array, static_label: int | None) -> tuple[Array, Params]:
        """The noiseless image (H, W) of one example of class `label`, and its latent parameters."""
        raise NotImplementedError

    def observe(self, key: Array, model: Array, params: Params) -> tuple[Array, Params]:
        """Noise and normalisation of one rendered image; may add entries to params."""
        return model, params

    def simulate_example(self, key: Array, label: Array, static_label: int | None
                         ) -> tuple[Array, Params]:
        """One observed image (H, W) and its latent parameters for class `label`."""
        model, params = self.render(key, label, static_label)
        return self.observe(key, model, params)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return (self.num_pix, self.num_pix, 1)

    @property
    def field_of_view(self) -> float:
        """Side of the image in arcsec."""
        return self.num_pix * self.pixel_scale

    def describe(self) -> str:
        """One line of the preset's defining parameters (for figure titles and logs)."""
        skip = {"name", "class_names", "dtype"}
        parts = [f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if f.name not in skip]
        return f"{self.name}: " + ", ".join(parts)

    def label_index(self, label: int | str) -> int:
        """Class index of a class name or index; ValueError listing the valid ones."""
        if isinstance(label, str):
            if label not in self.class_names:
                raise ValueError(f"unknown class {label!r} for preset {self.name!r}; "
                                 f"valid classes: {', '.join(self.class_names)}")
            return self.class_names.index(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
                0 <= label < self.num_classes):
            raise ValueError(f"label must be a class index in [0, {self.num_classes}) or one of "
                             f"{', '.join(self.class_names)}; got {label!r}")
        return int(label)

    def sample(self, key: Array, batch_size: int, *, label: int | str | None = None,
               start_index: int | Array = 0) -> tuple[Array, Array, Params]:
        """Simulate a batch: images (B, H, W, 1), labels (B,) int32, params {name: (B, ...)}.

        label: force every example to one class (also makes the simulation cheaper,
        since only that class's subhaloes are traced); default: balanced classes.
        start_index: global index of the first example (for chunked generation).
        The class is not part of an example's key: the same key and index with a
        different forced label give the same source, exposure and noise draws, so
        classes can be compared like for like (export folds the class into the key).
        """
        domain.check_positive_int("batch_size", batch_size)
        static_label = None if label is None else self.label_index(label)
        workers = _host_workers(batch_size, key, start_index)
        if workers == 1:
            return _sample(self, key, batch_size, static_label, jnp.asarray(start_index, jnp.int32))
        # XLA:CPU runs one chunked simulation on about one core; split the batch
        # over the host's cores (same examples: example i depends only on its index).
        part = batch_size // workers
        return _gather_on_host(
            lambda w: _sample(self, key, part, static_label,
                              jnp.asarray(start_index + w * part, jnp.int32)), workers, part)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sample(preset: Preset, key: Array, batch_size: int, static_label: int | None,
            start_index: Array) -> tuple[Array, Array, Params]:
    indices = start_index + jnp.arange(batch_size, dtype=jnp.int32)
    if static_label is None:
        labels = indices % preset.num_classes
    else:
        labels = jnp.full((batch_size,), static_label, jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

    if static_label is not None:
        images, params = _simulate_one_class(preset, keys, static_label)
    elif balanced_by_class():
        images, params = _simulate_balanced(preset, keys, labels, start_index)
    else:
        images, params = _simulate_padded(preset, keys, labels)
    return images[..., None], labels.astype(jnp.int32), params


# How a balanced (mixed-class) batch is simulated. True: class by class, each
# example tracing only its own subhaloes (`_simulate_balanced`; 1.5x cheaper for a
# model_ii batch on CPU). False: all examples at once, each tracing every class's
# subhaloes padded and masked (`_simulate_padded`), the layout measured on GPUs,
# where under a sharded jit each device simply simulates its own examples (the
# class-by-class batch is reassembled with a gather that needs an all-reduce
# across devices). "auto": True on CPU, False elsewhere.
BALANCED_BY_CLASS = "auto"


def balanced_by_class() -> bool:
    """Whether balanced batches are simulated class by class (see BALANCED_BY_CLASS)."""
    if BALANCED_BY_CLASS == "auto":
        return jax.default_backend() == "cpu"
    if not isinstance(BALANCED_BY_CLASS, bool):
        raise ValueError(f"BALANCED_BY_CLASS must be 'auto', True or False, got {BALANCED_BY_CLASS!r}")
    return BALANCED_BY_CLASS


def _simulate_padded(preset: Preset, keys: Array, labels: Array) -> tuple[Array, Params]:
    """Mixed classes in one pass: every example traces all classes' subhaloes, masked."""
    def simulate(args):
        return preset.simulate_example(*args, None)

    return jax.lax.map(simulate, (keys, labels), batch_size=_chunk_size(keys.shape[0], preset))


def _simulate_one_class(preset: Preset, keys: Array, static_label: int) -> tuple[Array, Params]:
    """Examples of one class, (B,) keys -> images (B, H, W) and params."""
    label = jnp.int32(static_label)

    def simulate(key):
        return preset.simulate_example(key, label, static_label)

    # On CPU a few examples at a time, so that intermediates stay in cache
    # (a whole-batch pass over each (B, H, W) array is memory-bound there).
    return jax.lax.map(simulate, keys, batch_size=_chunk_size(keys.shape[0], preset))


def _simulate_balanced(preset: Preset, keys: Array, labels: Array, start_index: Array
                       ) -> tuple[Array, Params]:
    """The balanced class cycle (example i has class i mod C), simulated class by class.

    Each class traces only its own subhaloes: batched together, every example would
    trace the padded subhaloes of every class (for model_ii, 2.4x the point-mass
    work). Class c holds the examples at positions first_c + C k of the batch;
    ceil(B / C) of them, rounded up to whole CPU chunks, are simulated per class
    (the surplus is dropped).
    """
    batch_size, num_classes = keys.shape[0], preset.num_classes
    group = -(-batch_size // num_classes)
    if jax.default_backend() == "cpu":
        chunk = min(_cpu_chunk_limit(preset), group)
        group = -(-group // chunk) * chunk
    firsts = (jnp.arange(num_classes, dtype=jnp.int32) - start_index) % num_classes
    outputs = []
    for cls in range(num_classes):
        positions = jnp.minimum(firsts[cls] + num_classes * jnp.arange(group, dtype=jnp.int32),
                                batch_size - 1)
        outputs.append(_simulate_one_class(preset, keys[positions], cls))
    rank = (jnp.arange(batch_size, dtype=jnp.int32) - firsts[labels]) // num_classes
    return jax.tree.map(lambda *per_class: jnp.stack(per_class)[labels, rank], *outputs)


# The noise of example i uses fold_in(key_i, _NOISE_STREAM); its priors use splits of key_i.
_NOISE_STREAM = 0x6E6F6973


# On CPU, images are simulated a few at a time so that every intermediate
# (B, H, W) array stays in cache; accelerators take the whole batch at once.
CPU_CHUNK_SIZE = 4


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(_host_cores(), thread_name_prefix="lensjax-sim")


def _host_workers(batch_size: int, key, start_index) -> int:
    """Threads for an eager CPU call: a divisor of batch_size, each with >= 2 chunks."""
    if (jax.default_backend() != "cpu" or isinstance(key, jax.core.Tracer)
            or isinstance(start_index, jax.core.Tracer)
            or not isinstance(start_index, (int, np.integer))):
        return 1
    limit = min(_host_cores(), batch_size // (2 * CPU_CHUNK_SIZE))
    return max([w for w in range(1, limit + 1) if batch_size % w == 0], default=1)


# XLA:CPU accepts host buffers on this alignment without a copy.
_HOST_ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised host array whose data starts on a _HOST_ALIGNMENT boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _HOST_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _HOST_ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _gather_on_host(simulate_part: Callable[[int], Any], workers: int, part: int) -> Any:
    """Run simulate_part(0 .. workers-1) on the thread pool; one pytree of (workers * part, ...).

    A jnp.concatenate of the parts would copy every image once more on the calling
    thread after the workers finish (15% of a model_i batch on 2 cores). Instead
    each worker copies its part into shared aligned host buffers, in parallel, and
    the buffers become the result without a further copy (jax.device_put aliases
    aligned host memory on CPU; the arrays stay uncommitted, as jit outputs are).
    Leaves numpy cannot hold (e.g. PRNG keys) are concatenated as before.
    """
    buffers: list[np.ndarray | None] = []
    lock = threading.Lock()

    def work(w: int):
        result = simulate_part(w)
        leaves = jax.tree.leaves(result)
        with lock:
            if not buffers:
                buffers.extend(
                    None if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended)
                    else _aligned_empty((workers * part, *leaf.shape[1:]), leaf.dtype)
                    for leaf in leaves)
        for buffer, leaf in zip(buffers, leaves):
            if buffer is not None:
                buffer[w * part:(w + 1) * part] = np.asarray(leaf)
        return result

    parts = list(_thread_pool().map(work, range(workers)))
    leaves = [jnp.concatenate(column) if buffer is None else jax.device_put(buffer)
              for buffer, column in zip(buffers, zip(*map(jax.tree.leaves, parts)))]
    return jax.tree.unflatten(jax.tree.structure(parts[0]), leaves)


# ... and at most this many (sub-)pixels per chunk: beyond about 2^17 elements an
# image-sized XLA:CPU fusion falls out of cache (the unrolled point-mass sum, for
# one, is 4-5x slower per pair at 4 x 300 x 300 than at 4 x 150 x 150).
CPU_CHUNK_PIXELS = 2**17


def _cpu_chunk_limit(preset: Preset) -> int:
    """Most examples per CPU chunk: CPU_CHUNK_SIZE, fewer for large (supersampled) grids."""
    side = preset.num_pix * getattr(preset, "supersampling", 1)
    return max(1, min(CPU_CHUNK_SIZE, CPU_CHUNK_PIXELS // (side * side)))


def _chunk_size(batch_size: int, preset: Preset) -> int:
    """Examples simulated together: a divisor of batch_size (a remainder would compile twice)."""
    if jax.default_backend() != "cpu":
        return batch_size
    limit = min(_cpu_chunk_limit(preset), batch_size)
    return max(d for d in range(1, limit + 1) if batch_size % d == 0)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, instrument.SingleBand):
        return value.name
    if isinstance(value, Preset):
        return value.name
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return str(value)


def _select_masses(label: Array, static_label: int | None,
                   candidates: dict[int, tuple[Array, Array, Array]], pad_to: int
                   ) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    """Point masses to trace, and the same padded to `pad_to` for the params.

    candidates maps class index -> (theta_E (K_c,), x (K_c,), y (K_c,)) for the
    classes with substructure. With a static label only that class is traced
    (no padding cost); with a traced label all are padded to `pad_to` and masked.
    """
    def padded(arrays):
        return tuple(jnp.pad(a, (0, pad_to - a.shape[0])) for a in arrays)

    if static_label is not None:
        if static_label not in candidates:
            dtype = next(iter(candidates.values()))[0].dtype
            empty = tuple(jnp.zeros((0,), dtype) for _ in range(3))
            zeros = tuple(jnp.zeros((pad_to,), dtype) for _ in range(3))
            return empty, zeros
        chosen = candidates[static_label]
        return chosen, padded(chosen)
    total = None
    for cls, arrays in candidates.items():
        masked = tuple(jnp.where(label == cls, a, jnp.zeros_like(a)) for a in padded(arrays))
        total = masked if total is None else tuple(t + m for t, m in zip(total, masked))
    return total, total


def _deflect(x: Array, y: Array, terms: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Source-plane coordinates x - sum(alpha_x), y - sum(alpha_y)."""
    ax = sum(t[0] for t in terms)
    ay = sum(t[1] for t in terms)
    return x - ax, y - ay


def _traces_class(cls: int, label: Array, static_label: int | None) -> bool:
    """Whether a render traces class `cls`'s substructure: always with a traced label."""
    return static_label is None or static_label == cls


def _only_for_class(cls: int, label: Array, static_label: int | None, theta_e: Array) -> Array:
    """theta_E of class `cls`'s substructure, zeroed (no deflection) for other labels."""
    if static_label is not None:
        return theta_e
    return jnp.where(label == cls, theta_e, jnp.zeros_like(theta_e))


def _add_point_masses(terms, x, y, masses):
    theta_e, mx, my = masses
    if theta_e.shape[0]:
        terms.append(profiles.deflection_point_masses(x, y, theta_e.astype(x.dtype),
                                                      mx.astype(x.dtype), my.astype(x.dtype)))


# ----------------------------------------------------------------------------
# Recipe A: DeepLenseSim (Models I, II, III; VI.A foundation)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeepLenseSimRecipe(Preset):
    """DeepLenseSim (lenstronomy) recipe; classes no_sub / cdm / axion, raw pixel values.

    noise: "model_i" (stored Poisson counts, exposure 10^U(3, 3.5) s),
    "single_band" (lenstronomy SingleBand noise of `band`, in e-/s) or "none".
    """

    class_names: tuple[str, ...] = ("no_sub", "cdm", "axion")
    num_pix: int = 150
    pixel_scale: float = 0.05
    psf_fwhm: float = 0.087
    psf_truncation: float = 3.0
    noise: str = "model_i"
    band: instrument.SingleBand | None = None
    background_rms: float = 0.01
    log10_exposure_range: tuple[float, float] = (3.0, 3.5)
    source_amp: float | None = 20.0      # Model I; else computed from source_magnitude
    source_magnitude: float = 20.0
    z_lens: float = 0.5
    z_source: float = 1.0
    main_halo_mass: float = 1e12         # Msun
    lens_e1: float = 0.1
    lens_e2: float = 0.0
    shear_gamma1: float = 0.05
    shear_gamma2: float = 0.0
    source_r_sersic: float = 0.25
    source_n_sersic: float = 1.0
    source_e1: float = -0.1
    source_e2: float = 0.1
    source_center_max: float = 0.35
    num_subhalos: int = 25
    subhalo_mass_range: tuple[float, float] = (1e6, 1e10)
    subhalo_mass_slope: float = -0.9
    subhalo_radius_range: tuple[float, float] = (0.25, 2.0)
    vortex_mass: float = 3e10
    vortex_num_points: int = 100
    log10_axion_mass_range: tuple[float, float] = (-24.0, -22.0)
    exact_poisson: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.noise not in ("model_i", "single_band", "none"):
            raise ValueError(f"noise must be 'model_i', 'single_band' or 'none', got {self.noise!r}")
        if self.noise == "single_band" and self.band is None:
            raise ValueError("noise='single_band' needs a band (e.g. instrument.EUCLID_VIS)")
        if self.source_amp is None and self.band is None:
            raise ValueError("source_amp=None (magnitude-based source) needs a band for the zero point")
        for name in ("psf_fwhm", "psf_truncation", "main_halo_mass", "vortex_mass",
                     "source_r_sersic", "source_n_sersic"):
            domain.check_positive(name, getattr(self, name))
        domain.check_nonnegative("background_rms", self.background_rms)
        domain.check_nonnegative("source_center_max", self.source_center_max)
        domain.check_positive_int("num_subhalos", self.num_subhalos)
        domain.check_positive_int("vortex_num_points", self.vortex_num_points)
        lo, hi = self.subhalo_mass_range
        domain.check_positive("subhalo_mass_range", lo)
        if not hi > lo:
            raise ValueError(f"subhalo_mass_range must be increasing, got {self.subhalo_mass_range}")
        r_lo, r_hi = self.subhalo_radius_range
        domain.check_nonnegative("subhalo_radius_range", r_lo)
        if not r_hi >= r_lo:
            raise ValueError(f"subhalo_radius_range must be increasing, got {self.subhalo_radius_range}")
        if self.source_amp is not None:
            domain.check_nonnegative("source_amp", self.source_amp)

    # -- constants of the preset (host-side, float64) -------------------------
    def _theta_e(self, mass_msun: float) -> float:
        return cosmology.einstein_radius_point_mass(mass_msun, self.z_lens, self.z_source)

    @property
    def main_theta_e(self) -> float:
        """Einstein radius (arcsec) of the main halo mass, by the published formula."""
        return self._theta_e(self.main_halo_mass)

    @property
    def source_amplitude(self) -> float:
        """Sersic amp (per arcsec^2 at R_sersic): fixed, or from magnitude and zero point."""
        if self.source_amp is not None:
            return float(self.source_amp)
        with jax.ensure_compile_time_eval():  # a constant, even when called under jit
            return float(light.sersic_amp_from_magnitude(
                self.source_magnitude, self.band.magnitude_zero_point,
                self.source_r_sersic, self.source_n_sersic))

    @property
    def max_point_masses(self) -> int:
        return max(self.num_subhalos, self.vortex_num_points)

    # -- priors ---------------------------------------------------------------
    def _cdm_subhalos(self, key: Array, dtype) -> tuple[Array, Array, Array, Array]:
        """(theta_E, x, y, mass) of the CDM point-mass subhaloes, each (K,)."""
        k_mass, k_r, k_phi = jax.random.split(key, 3)
        k = self.num_subhalos
        lo, hi = self.subhalo_mass_range
        a = 1.0 + self.subhalo_mass_slope  # pdf ~ m^slope -> inverse CDF with exponent 1/a
        u = jax.random.uniform(k_mass, (k,), jnp.float32)
        mass = (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)
        radius = _uniform(k_r, *self.subhalo_radius_range, dtype, (k,))
        angle = _uniform(k_phi, 0.0, 2.0 * math.pi, dtype, (k,))
        theta_e = (self.main_theta_e * jnp.sqrt(mass / self.main_halo_mass)).astype(dtype)
        x, y = _rotate_offsets(radius, angle)
        return theta_e, x, y, mass.astype(dtype)

    def _vortex(self, key: Array, dtype) -> tuple[Array, Array, Array, Array, Array]:
        """(theta_E of one point, angle, half-length, point mass, axion mass in eV) of the vortex.

        The vortex is `vortex_num_points` equal point masses at
        profiles.line_mass_offsets(half_length) along the direction `angle`.
        """
        k_mass, k_phi = jax.random.split(key)
        log_m = _uniform(k_mass, *self.log10_axion_mass_range, jnp.float32)
        axion_mass = 10.0**log_m
        # 0.06 / (2 m / 1e-22) arcsec: 3" at 1e-24 eV, 0.03" at 1e-22 eV.
        half_length = (0.03 * 10.0 ** (-22.0 - log_m)).astype(dtype)
        angle = _uniform(k_phi, 0.0, 2.0 * math.pi, dtype)
        point_mass = self.vortex_mass / self.vortex_num_points
        theta_e = jnp.asarray(self._theta_e(point_mass), dtype)
        return theta_e, angle, half_length, jnp.asarray(point_mass, dtype), axion_mass.astype(dtype)

    # -- one example ------------------------------------------------------------
    def render(self, key, label, static_label):
        dtype = jnp.dtype(self.dtype)
        k_src, k_cdm, k_vort, k_exp = jax.random.split(key, 4)
        src_x, src_y = _uniform(k_src, -self.source_center_max, self.source_center_max, dtype, (2,))
        cdm_te, cdm_x, cdm_y, cdm_m = self._cdm_subhalos(k_cdm, dtype)
        vort_te, vort_angle, vort_half, vort_m, axion_mass = self._vortex(k_vort, dtype)
        n = self.vortex_num_points
        along = profiles.line_mass_offsets(vort_half, n, dtype)
        vort_points = (jnp.full((n,), vort_te), along * jnp.cos(vort_angle), along * jnp.sin(vort_angle))
        cdm, axion = self.class_names.index("cdm"), self.class_names.index("axion")
        # The masses as lists padded to max_point_masses, for the params only.
        _, padded = _select_masses(label, static_label, {cdm: (cdm_te, cdm_x, cdm_y), axion: vort_points},
                                   self.max_point_masses)
        mass_msun, _ = _select_masses(
            label, None, {cdm: (cdm_m, cdm_m, cdm_m), axion: (jnp.full((n,), vort_m),) * 3},
            self.max_point_masses)

        x, y = instrument.pixel_coordinates(self.num_pix, self.pixel_scale, dtype=dtype)
        # The main lens is the same in every image: evaluate it once, as a constant.
        with jax.ensure_compile_time_eval():
            terms = [
                profiles.deflection_sie(x, y, self.main_theta_e, self.lens_e1, self.lens_e2),
                profiles.deflection_shear(x, y, self.shear_gamma1, self.shear_gamma2),
            ]
        if _traces_class(cdm, label, static_label):
            terms.append(profiles.deflection_point_masses(
                x, y, _only_for_class(cdm, label, static_label, cdm_te), cdm_x, cdm_y))
        if _traces_class(axion, label, static_label):
            # The vortex's masses are a regular comb: summed in closed form beyond the
            # nearest few (profiles.deflection_point_mass_line), not term by term.
            terms.append(profiles.deflection_point_mass_line(
                x, y, _only_for_class(axion, label, static_label, vort_te), 0.0, 0.0,
                vort_angle, vort_half, n))
        bx, by = _deflect(x, y, terms)
        surface = light.sersic_ellipse(bx, by, self.source_amplitude, self.source_r_sersic,
                                       self.source_n_sersic, self.source_e1, self.source_e2,
                                       src_x, src_y)
        model = instrument.convolve_gaussian_psf(surface * self.pixel_scale**2, self.psf_fwhm,
                                                 self.pixel_scale, self.psf_truncation)
        if self.noise == "single_band":
            exposure = jnp.asarray(self.band.total_exposure_time, dtype)
        else:
            exposure = 10.0 ** _uniform(k_exp, *self.log10_exposure_range, dtype)
        is_axion = label == axion
        params = {
            "source_center_x": src_x, "source_center_y": src_y,
            "exposure_time": exposure,
            "axion_mass_ev": jnp.where(is_axion, axion_mass, 0.0),
            "subhalo_theta_e": padded[0], "subhalo_x": padded[1], "subhalo_y": padded[2],
            "subhalo_mass_msun": mass_msun[0],
            "num_point_masses": jnp.sum(padded[0] > 0).astype(jnp.int32),
        }
        return model.astype(dtype), params

    def observe(self, key, model, params):
        k_noise = jax.random.fold_in(key, _NOISE_STREAM)
        if self.noise == "model_i":
            image = instrument.noise_model_i(k_noise, model, params["exposure_time"],
                                             self.background_rms, self.exact_poisson)
        elif self.noise == "single_band":
            image = instrument.noise_single_band(k_noise, model, self.band)
        else:
            image = model
        return image.astype(model.dtype), params


# ----------------------------------------------------------------------------
# Recipe B: PyLensing (classes no / sphere / vort)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PyLensingRecipe(Preset):
    """PyLensing (PyAutoLens) recipe; classes no / sphere / vort, min-max normalised.

    Intensities are per pixel (PyAutoLens's convention), so no pixel-area factor.
    A substructure point mass of mass fraction f of the main lens gets
    theta_E = theta_E_main * sqrt(f / num_subhalos) (mass inside the Einstein
    radius of an SIS and of a point mass both scale as theta_E^2).
    """

    class_names: tuple[str, ...] = ("no", "sphere", "vort")
    num_pix: int = 150
    pixel_scale: float = 0.05
    supersampling: int = 2
    psf_sigma: float = 0.1
    psf_truncation: float = 2.5     # 11 x 11 taps at sigma = 2 pixels
    exposure_time: float = 300.0
    sky_level: float = 0.1
    noise: bool = True
    normalise: bool = True
    lens_light_intensity: float = 1.2
    lens_light_n_sersic: float = 2.5
    lens_light_r_sersic: float = 0.5
    lens_light_q_range: tuple[float, float] = (0.5, 1.0)
    lens_theta_e: float = 1.2
    shear_range: tuple[float, float] = (0.0, 0.3)
    source_n_sersic: float = 1.5
    source_r_sersic: float = 0.5
    source_q_range: tuple[float, float] = (0.7, 1.0)
    source_intensity_range: tuple[float, float] = (0.7, 0.9)
    source_radius_max: float = 1.2
    num_subhalos: int = 25
    subhalo_mass_fraction: float = 0.01
    subhalo_radius_max: float = 1.0
    vortex_length: float = 1.0
    exact_poisson: bool = False

    def __post_init__(self):
        super().__post_init__()
        domain.check_positive_int("supersampling", self.supersampling)
        for name in ("psf_sigma", "psf_truncation", "exposure_time", "lens_theta_e",
                     "lens_light_r_sersic", "lens_light_n_sersic", "source_r_sersic",
                     "source_n_sersic", "vortex_length"):
            domain.check_positive(name, getattr(self, name))
        for name in ("sky_level", "lens_light_intensity", "subhalo_mass_fraction",
                     "source_radius_max", "subhalo_radius_max"):
            domain.check_nonnegative(name, getattr(self, name))
        for name in ("lens_light_q_range", "source_q_range"):
            domain.check_in_range(name, np.asarray(getattr(self, name)), 0.0, 1.0,
                                  low_inclusive=False)
        domain.check_nonnegative("shear_range", np.asarray(self.shear_range))
        domain.check_nonnegative("source_intensity_range", np.asarray(self.source_intensity_range))
        domain.check_positive_int("num_subhalos", self.num_subhalos)

    @property
    def subhalo_theta_e(self) -> float:
        return self.lens_theta_e * math.sqrt(self.subhalo_mass_fraction / self.num_subhalos)

    def render(self, key, label, static_label):
        dtype = jnp.dtype(self.dtype)
        keys = jax.random.split(key, 12)
        u = lambda i, lo, hi, shape=(): _uniform(keys[i], lo, hi, dtype, shape)  # noqa: E731
        two_pi = 2.0 * math.pi
        lens_q, lens_phi = u(0, *self.lens_light_q_range), u(1, 0.0, math.pi)
        shear, shear_angle = u(2, *self.shear_range), u(3, 0.0, math.pi)
        src_q, src_phi = u(4, *self.source_q_range), u(5, 0.0, math.pi)
        src_intensity = u(6, *self.source_intensity_range)
        src_x, src_y = _rotate_offsets(u(7, 0.0, self.source_radius_max), u(8, 0.0, two_pi))
        k = self.num_subhalos
        sub_x, sub_y = _rotate_offsets(u(9, 0.0, self.subhalo_radius_max, (k,)),
                                       u(10, 0.0, two_pi, (k,)))
        along = jnp.linspace(-0.5, 0.5, k, dtype=dtype) * self.vortex_length
        vort_angle = u(11, 0.0, math.pi)
        vort_x, vort_y = along * jnp.cos(vort_angle), along * jnp.sin(vort_angle)
        sub_te = jnp.full((k,), self.subhalo_theta_e, dtype)
        sphere, vort = self.class_names.index("sphere"), self.class_names.index("vort")
        masses, padded = _select_masses(
            label, static_label, {sphere: (sub_te, sub_x, sub_y), vort: (sub_te, vort_x, vort_y)}, k)

        x, y = instrument.pixel_coordinates(self.num_pix, self.pixel_scale, self.supersampling, dtype)
        gamma1, gamma2 = profiles.shear_polar_to_cartesian(shear_angle, shear)
        terms = [profiles.deflection_sis(x, y, self.lens_theta_e),
                 profiles.deflection_shear(x, y, gamma1, gamma2)]
        _add_point_masses(terms, x, y, masses)
        bx, by = _deflect(x, y, terms)
        s_e1, s_e2 = profiles.phi_q_to_ellipticity(src_phi, src_q)
        l_e1, l_e2 = profiles.phi_q_to_ellipticity(lens_phi, lens_q)
        image = (light.sersic_ellipse(bx, by, src_intensity, self.source_r_sersic,
                                      self.source_n_sersic, s_e1, s_e2, src_x, src_y)
                 + light.sersic_ellipse(x, y, self.lens_light_intensity, self.lens_light_r_sersic,
                                        self.lens_light_n_sersic, l_e1, l_e2))
        image = instrument.bin_supersampled(image, self.supersampling)
        image = instrument.convolve_gaussian_psf(
            image, self.psf_sigma * instrument.FWHM_PER_SIGMA, self.pixel_scale, self.psf_truncation)
        params = {
            "source_center_x": src_x, "source_center_y": src_y, "source_intensity": src_intensity,
            "shear": shear, "shear_angle": shear_angle, "lens_light_q": lens_q,
            "subhalo_theta_e": padded[0], "subhalo_x": padded[1], "subhalo_y": padded[2],
            "num_point_masses": jnp.sum(padded[0] > 0).astype(jnp.int32),
        }
        return image.astype(dtype), params

    def observe(self, key, model, params):
        image = model
        if self.noise:
            image = instrument.noise_sky_poisson(jax.random.fold_in(key, _NOISE_STREAM), image,
                                                 self.exposure_time, self.sky_level,
                                                 self.exact_poisson)
        if self.normalise:
            image = instrument.min_max_normalise(image)
        return image.astype(model.dtype), params


# ----------------------------------------------------------------------------
# Derived presets
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SuperResolutionPreset(Preset):
    """VI.B pairs: HR = no-substructure images of `base` in [0, 1]; LR = factor x factor mean pool.

    `sample` returns the HR images; params["lr_image"] holds (B, H/f, W/f, 1).
    """

    name: str = "superres"
    class_names: tuple[str, ...] = ("no",)
    base: Preset = dataclasses.field(default_factory=lambda: PyLensingRecipe(name="common_test"))
    factor: int = 2
    num_pix: int = 150
    pixel_scale: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        domain.check_positive_int("factor", self.factor)
        if self.base.num_pix % self.factor:
            raise ValueError(f"factor={self.factor} must divide the base image size {self.base.num_pix}")

    @property
    def lr_shape(self) -> tuple[int, int, int]:
        n = self.num_pix // self.factor
        return (n, n, 1)

    def render(self, key, label, static_label):
        return self.base.render(key, jnp.zeros_like(label), 0)

    def observe(self, key, model, params):
        hr, params = self.base.observe(key, model, params)
        hr = instrument.min_max_normalise(hr)
        return hr, dict(params, lr_image=instrument.mean_pool(hr, self.factor)[..., None])


@dataclasses.dataclass(frozen=True)
class UnlabelledPreset(Preset):
    """Test IV data: unlabelled images of `base` in [0, 1] (labels still returned)."""

    name: str = "diffusion"
    class_names: tuple[str, ...] = ("no", "sphere", "vort")
    num_pix: int = 150
    pixel_scale: float = 0.05
    base: Preset = dataclasses.field(default_factory=lambda: PyLensingRecipe(name="common_test"))

    def render(self, key, label, static_label):
        return self.base.render(key, label, static_label)

    def observe(self, key, model, params):
        image, params = self.base.observe(key, model, params)
        return instrument.min_max_normalise(image), params


def _model_ii(name: str, **overrides) -> DeepLenseSimRecipe:
    band = overrides.get("band", instrument.EUCLID_VIS)
    # The published Model II/III code computes noise but stores the noiseless image,
    # so noise="none" is the default; noise="single_band" adds it.
    fields = dict(num_pix=64, pixel_scale=band.pixel_scale, psf_fwhm=band.seeing,
                  psf_truncation=5.0, noise="none", band=band, source_amp=None,
                  source_magnitude=20.0)
    fields.update(overrides)
    return DeepLenseSimRecipe(name=name, **fields)


_FACTORIES: dict[str, Callable[..., Preset]] = {
    "common_test": lambda **kw: PyLensingRecipe(name="common_test", **kw),
    "model_i": lambda **kw: DeepLenseSimRecipe(name="model_i", **kw),
    "model_ii": lambda **kw: _model_ii("model_ii", **kw),
    "model_iii": lambda **kw: _model_ii("model_iii", **{"band": instrument.HST_WFC3_F160W, **kw}),
    "foundation": lambda **kw: _model_ii("foundation", **kw),
    "superres": lambda **kw: SuperResolutionPreset(**kw),
    "diffusion": lambda **kw: UnlabelledPreset(**kw),
}

PRESET_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_preset(name: str, **overrides: Any) -> Preset:
    """A preset by name, with field overrides (e.g. pixel_scale=0.04, noise="single_band")."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    try:
        return _FACTORIES[name](**overrides)
    except TypeError as err:
        raise ValueError(f"bad override for preset {name!r}: {err}") from None
