"""Presets: shapes, dtypes, value ranges, class balance, latent parameters, determinism.

Determinism is the contract the data pipeline relies on: example i of a call
depends only on (key, start_index + i), so chunked, forced-label and sharded
generation reproduce the plain unsharded batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lensjax.sim import PRESET_NAMES, get_preset, instrument, recipes

BATCH = 6  # two examples per class for the three-class presets


@pytest.fixture(scope="module")
def batches():
    """One balanced batch per preset, drawn once (compiling is the slow part)."""
    key = jax.random.key(7)
    return {name: jax.device_get(get_preset(name).sample(key, BATCH)) for name in PRESET_NAMES}


EXPECTED_PIXELS = {"common_test": 150, "model_i": 150, "model_ii": 64, "model_iii": 64,
                   "foundation": 64, "superres": 150, "diffusion": 150}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_shapes_dtypes_and_finiteness(batches, name):
    images, labels, params = batches[name]
    n = EXPECTED_PIXELS[name]
    assert images.shape == (BATCH, n, n, 1)
    assert images.dtype == np.float32
    assert labels.shape == (BATCH,) and labels.dtype == np.int32
    assert np.all(np.isfinite(images))
    for key, value in params.items():
        assert value.shape[0] == BATCH, key
        assert np.all(np.isfinite(value)), key


@pytest.mark.parametrize("name", ["common_test", "superres", "diffusion"])
def test_normalised_presets_span_unit_interval(batches, name):
    images = batches[name][0]
    np.testing.assert_allclose(images.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(images.max(axis=(1, 2, 3)), 1.0, atol=1e-6)


def test_model_i_images_are_poisson_counts(batches):
    images = batches["model_i"][0]
    assert np.all(images >= 0)
    np.testing.assert_array_equal(images, np.round(images))
    # A lensed arc is present: the brightest pixels far exceed the background.
    assert np.all(images.max(axis=(1, 2, 3)) > 10 * np.median(images, axis=(1, 2, 3)) + 10)


@pytest.mark.parametrize("name", ["model_ii", "model_iii", "foundation"])
def test_noiseless_model_ii_images_are_nonnegative_fluxes(batches, name):
    images = batches[name][0]
    assert np.all(images >= 0)
    assert np.all(images.max(axis=(1, 2, 3)) > 0)


@pytest.mark.parametrize("name", ["common_test", "model_i", "foundation"])
def test_classes_are_balanced_and_cycle(batches, name):
    labels = batches[name][1]
    np.testing.assert_array_equal(labels, np.arange(BATCH) % 3)
    big = get_preset(name).sample(jax.random.key(0), 9, start_index=5)[1]
    np.testing.assert_array_equal(np.bincount(np.asarray(big), minlength=3), [3, 3, 3])
    np.testing.assert_array_equal(big, (5 + np.arange(9)) % 3)


def test_deeplense_latent_parameters(batches):
    _, labels, params = batches["model_i"]
    preset = get_preset("model_i")
    num = params["num_point_masses"]
    np.testing.assert_array_equal(num, np.choose(labels, [0, preset.num_subhalos,
                                                          preset.vortex_num_points]))
    axion = labels == 2
    mass = params["axion_mass_ev"]
    assert np.all((mass[axion] >= 1e-24) & (mass[axion] <= 1e-22))
    np.testing.assert_array_equal(mass[~axion], 0.0)
    assert params["subhalo_theta_e"].shape == (BATCH, preset.max_point_masses)
    cdm_masses = params["subhalo_mass_msun"][labels == 1][:, :preset.num_subhalos]
    assert np.all((cdm_masses >= 1e6 * 0.999) & (cdm_masses <= 1e10 * 1.001))
    # theta_E of a subhalo follows the sqrt(M) scaling of the published formula.
    cdm_theta = params["subhalo_theta_e"][labels == 1][:, :preset.num_subhalos]
    np.testing.assert_allclose(cdm_theta, preset.main_theta_e * np.sqrt(cdm_masses / 1e12),
                               rtol=1e-4)
    radius = np.hypot(params["subhalo_x"], params["subhalo_y"])[labels == 1][:, :preset.num_subhalos]
    assert np.all((radius >= 0.25 - 1e-5) & (radius <= 2.0 + 1e-5))
    src = np.stack([params["source_center_x"], params["source_center_y"]])
    assert np.all(np.abs(src) <= 0.35)
    exposure = params["exposure_time"]
    assert np.all((exposure >= 10**3 * 0.999) & (exposure <= 10**3.5 * 1.001))


def test_vortex_half_length_follows_axion_mass(batches):
    _, labels, params = batches["model_i"]
    axion = labels == 2
    x, y = params["subhalo_x"][axion], params["subhalo_y"][axion]
    half_length = np.hypot(x, y).max(axis=1)
    expected = 0.06 / (2 * params["axion_mass_ev"][axion] / 1e-22)
    np.testing.assert_allclose(half_length, expected, rtol=1e-4)


def test_same_key_same_batch_other_key_other_batch(batches):
    preset = get_preset("model_i")
    again = preset.sample(jax.random.key(7), BATCH)
    np.testing.assert_array_equal(np.asarray(again[0]), batches["model_i"][0])
    other = preset.sample(jax.random.key(8), BATCH)
    assert not np.allclose(np.asarray(other[0]), batches["model_i"][0])


def test_chunked_generation_equals_one_batch(batches):
    preset = get_preset("common_test")
    key = jax.random.key(7)
    parts = [preset.sample(key, 2, start_index=s)[0] for s in (0, 2, 4)]
    np.testing.assert_allclose(np.concatenate(parts), batches["common_test"][0], atol=1e-6)


def test_forced_label_reproduces_the_balanced_examples(batches):
    """label='cdm' traces only the CDM subhaloes, yet gives the same images."""
    preset = get_preset("model_ii")
    images, labels, _ = batches["model_ii"]
    cdm = preset.sample(jax.random.key(7), 2, label="cdm", start_index=1)
    np.testing.assert_array_equal(np.asarray(cdm[1]), [1, 1])
    np.testing.assert_allclose(np.asarray(cdm[0])[0], images[1], rtol=1e-5,
                               atol=1e-6 * images[1].max())


# Distinct batch sizes per layout: the layout is read when `sample` is traced.
@pytest.mark.parametrize("by_class, preset_name, start_index, batch", [
    (True, "model_ii", 5, 7), (True, "common_test", 0, 9), (False, "model_ii", 4, 5)])
def test_balanced_batch_equals_its_examples_simulated_one_class_at_a_time(
        by_class, preset_name, start_index, batch, monkeypatch):
    """Every example of a balanced batch equals the same index drawn with its class
    forced, whether the batch is simulated class by class (each class tracing only
    its own subhaloes) or all at once with padded subhaloes, for start indices and
    batch sizes that do not line up with the class cycle."""
    monkeypatch.setattr(recipes, "BALANCED_BY_CLASS", by_class)
    assert recipes.balanced_by_class() is by_class
    preset = get_preset(preset_name)
    key = jax.random.key(11)
    images, labels, params = preset.sample(key, batch, start_index=start_index)
    expected_labels = (start_index + np.arange(batch)) % preset.num_classes
    np.testing.assert_array_equal(np.asarray(labels), expected_labels)
    for i in range(batch):
        one, one_label, one_params = preset.sample(key, 1, label=int(expected_labels[i]),
                                                   start_index=start_index + i)
        assert int(one_label[0]) == expected_labels[i]
        np.testing.assert_allclose(np.asarray(images[i]), np.asarray(one[0]), rtol=1e-6,
                                   atol=1e-6 * float(np.abs(one[0]).max()), err_msg=f"example {i}")
        for name, value in params.items():
            np.testing.assert_allclose(np.asarray(value[i]), np.asarray(one_params[name][0]),
                                       rtol=1e-6, err_msg=f"{name} of example {i}")


@pytest.mark.parametrize("noise", [False, True])
def test_sharded_over_eight_devices_equals_unsharded(noise):
    """Un-normalised common_test images, so that one Poisson count is 1 / exposure_time."""
    assert jax.device_count() == 8
    preset = get_preset("common_test", noise=noise, normalise=False)
    key = jax.random.key(7)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("data"))
    batch = 16
    reference = np.asarray(preset.sample(key, batch)[0])
    # (1) The whole call jitted with a sharded output.
    sharded = jax.jit(lambda k: preset.sample(k, batch)[0], out_shardings=sharding)(key)
    assert sharded.sharding.is_equivalent_to(sharding, sharded.ndim)
    # (2) Each device draws only its own examples (what the input pipeline does).
    per_device = batch // 8
    shards = [jax.device_put(preset.sample(key, per_device, start_index=i * per_device)[0], d)
              for i, d in enumerate(mesh.devices.flat)]
    assembled = jax.make_array_from_single_device_arrays(reference.shape, sharding, shards)
    for result in (np.asarray(sharded), np.asarray(assembled)):
        diff = np.abs(result - reference)
        if not noise:
            np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-7)
            continue
        # Float rounding differs between compilations and can push a rare draw
        # across a Poisson CDF step: at most one count, in < 1e-4 of the pixels.
        flipped = diff > 1e-5 / preset.exposure_time
        assert flipped.mean() < 1e-4
        np.testing.assert_allclose(diff[flipped], 1.0 / preset.exposure_time, rtol=1e-3)


def test_superres_lr_is_mean_pool_of_hr(batches):
    hr, _, params = batches["superres"]
    lr = params["lr_image"]
    assert lr.shape == (BATCH, 75, 75, 1)
    expected = hr[..., 0].reshape(BATCH, 75, 2, 75, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(lr[..., 0], expected, atol=1e-6)


def test_common_test_substructure_changes_the_image_only_slightly():
    """Same key, forced classes: subhaloes perturb the arc; they do not replace it."""
    preset = get_preset("common_test", noise=False)
    key = jax.random.key(3)
    no = np.asarray(preset.sample(key, 1, label="no")[0])
    sphere = np.asarray(preset.sample(key, 1, label="sphere")[0])
    diff = np.abs(no - sphere).max()
    assert 1e-4 < diff < 0.5


def test_float64_preset():
    """dtype='float64' computes in double precision (random draws differ from float32)."""
    with jax.enable_x64(True):
        images, labels, params = get_preset("model_ii", dtype="float64").sample(
            jax.random.key(0), 3)
        assert images.dtype == jnp.float64
        assert params["source_center_x"].dtype == jnp.float64
    assert np.all(np.isfinite(np.asarray(images))) and np.all(np.asarray(images) >= 0)
    np.testing.assert_array_equal(np.asarray(labels), [0, 1, 2])


def test_noise_none_model_i_equals_psf_convolved_model():
    """Without noise, Model I is the noiseless image: compare with a direct build."""
    preset = get_preset("model_i", noise="none")
    images, _, params = preset.sample(jax.random.key(1), 1, label="no_sub")
    from lensjax.sim import light, profiles
    x, y = instrument.pixel_coordinates(150, 0.05)
    ax1, ay1 = profiles.deflection_sie(x, y, preset.main_theta_e, 0.1, 0.0)
    ax2, ay2 = profiles.deflection_shear(x, y, 0.05, 0.0)
    surface = light.sersic_ellipse(x - ax1 - ax2, y - ay1 - ay2, 20.0, 0.25, 1.0, -0.1, 0.1,
                                   params["source_center_x"][0], params["source_center_y"][0])
    expected = instrument.convolve_gaussian_psf(surface * 0.05**2, 0.087, 0.05, 3.0)
    np.testing.assert_allclose(np.asarray(images[0, ..., 0]), np.asarray(expected), rtol=1e-4,
                               atol=1e-5 * float(expected.max()))


def test_bad_overrides_and_labels_raise():
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("model_iv")
    with pytest.raises(ValueError, match="bad override"):
        get_preset("model_i", no_such_field=1)
    with pytest.raises(ValueError, match="num_pix"):
        get_preset("model_i", num_pix=0)
    with pytest.raises(ValueError, match="valid classes"):
        get_preset("model_i").sample(jax.random.key(0), 2, label="vort")
    with pytest.raises(ValueError, match="batch_size"):
        get_preset("model_i").sample(jax.random.key(0), 0)


def test_eager_batch_split_over_host_threads_equals_one_program(monkeypatch):
    """An eager CPU call split over two threads (parts copied into shared host
    buffers) gives the batch of one jitted program, as uncommitted arrays."""
    monkeypatch.setattr(recipes, "_host_cores", lambda: 2)
    preset = get_preset("model_ii")
    key, batch = jax.random.key(3), 16
    assert recipes._host_workers(batch, key, 0) == 2
    images, labels, params = preset.sample(key, batch)
    ref_images, ref_labels, ref_params = jax.jit(lambda k: preset.sample(k, batch))(key)
    for got in (images, labels, *params.values()):
        assert not got.committed
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(ref_labels))
    np.testing.assert_allclose(np.asarray(images), np.asarray(ref_images), rtol=1e-5,
                               atol=1e-6 * float(np.abs(ref_images).max()))
    for name, value in params.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref_params[name]), rtol=1e-5,
                                   err_msg=name)


def test_gather_on_host_keeps_part_order_dtypes_and_key_leaves():
    def part(w):
        return {"x": jnp.full((3, 2), w, jnp.bfloat16), "n": jnp.arange(3, dtype=jnp.int32) + 3 * w,
                "key": jax.random.split(jax.random.key(w), 3)}

    out = recipes._gather_on_host(part, workers=2, part=3)
    assert out["x"].dtype == jnp.bfloat16 and out["x"].shape == (6, 2)
    np.testing.assert_array_equal(np.asarray(out["x"], np.float32)[:, 0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out["n"]), np.arange(6))
    np.testing.assert_array_equal(
        jax.random.key_data(out["key"]),
        np.concatenate([jax.random.key_data(part(w)["key"]) for w in range(2)]))
