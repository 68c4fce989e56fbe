"""lensjax.tasks.diffusion, lensjax.sample and configs/ddpm_unet.py.

One runlocal DDPM run (2 real steps, 150 x 150) and one runlocal classifier run
serve the end-to-end tests: the sampler CLI writes the official Samples/ layout
on 8 devices, the evaluation report states its sample counts and sampler and
marks FID skipped without weights, and its generated set is the CLI's files 1..N.
Sampling on 8 devices in one padded batch equals sampling on 1 device in smaller
batches; the held-out denoising loss does not depend on the evaluation batch size
and, for an x0-predicting network that outputs 0, equals mean((2x - 1)^2) exactly;
FLD is 0 for a set against itself and > 0 against another set.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from lensjax import evaluate, parallel, plots, sample, train
from lensjax.data import pipeline
from lensjax.metrics import fid, lens_stats
from lensjax.tasks import diffusion as task
from lensjax.tasks import image_features

NUM_CLI_SAMPLES = 10


@pytest.fixture(scope="module")
def ddpm_workdir(load_config, tmp_path_factory):
    """configs/ddpm_unet.py (runlocal: 150 x 150, 8 images per step) after 2 real steps."""
    workdir = tmp_path_factory.mktemp("ddpm")
    config = load_config("ddpm_unet")
    config.train.checkpoint_every = 2
    final = train.train_and_evaluate(config, workdir)
    assert final["step"] == 2 and np.isfinite(final["train_loss"])
    assert np.isfinite(final["selection_heldout_loss"])
    return workdir


@pytest.fixture(scope="module")
def classifier_workdir(load_config, tmp_path_factory):
    """configs/common_resnet18.py (runlocal) on the diffusion preset's images and labels
    (the DDPM run's data streams, already compiled) with a one-block ViT instead of the
    ResNet (cheaper to compile; it accepts only 150 x 150 inputs), after 2 real steps."""
    workdir = tmp_path_factory.mktemp("classifier")
    config = load_config("common_resnet18")
    config.data.preset = "diffusion"
    config.model = dict(name="vit", kwargs=dict(image_size=150, patch_size=10, width=32, depth=1,
                                                num_heads=2))
    config.train.batch_size = config.eval.batch_size = 8
    config.data.selection_examples = 8
    config.train.checkpoint_every = 2
    assert train.train_and_evaluate(config, workdir)["step"] == 2
    return workdir


@pytest.fixture(scope="module")
def cli_samples(ddpm_workdir, tmp_path_factory):
    """OUT of `python -m lensjax.sample` for 10 images (config sampler: DDIM 4 steps)."""
    out = tmp_path_factory.mktemp("samples") / "out"
    assert sample.main(["--workdir", str(ddpm_workdir), "--num", str(NUM_CLI_SAMPLES),
                        "--out", str(out), "--no-progress"]) == 0
    return out


def small_config(load_config, **diffusion):
    """The runlocal DDPM config on 64 x 64 images (the model_ii preset, min-max scaled)."""
    config = load_config("ddpm_unet")
    config.data.preset = "model_ii"
    config.data.normalization = "minmax"
    config.train.ema_decay = 0.0  # evaluate the parameters the tests set, not an EMA copy
    config.diffusion.update(diffusion)
    return config


def _perturbed(pure: dict) -> dict:
    """Random weights everywhere: the freshly built UNet is the zero function."""
    rng = np.random.default_rng(0)
    return _map_leaves(lambda x: x + rng.normal(0.0, 0.05, np.shape(x)).astype(np.float32), pure)


def _map_leaves(fn, tree):
    if isinstance(tree, dict):
        return {k: _map_leaves(fn, v) for k, v in tree.items()}
    return fn(np.asarray(tree))


# ----------------------------------------------------------------------------
# Sampler CLI and evaluation report (end to end)
# ----------------------------------------------------------------------------

def test_sample_cli_writes_the_official_layout_on_8_devices(cli_samples, ddpm_workdir):
    files = sorted((cli_samples / "Samples").iterdir())
    assert [p.name for p in files] == sorted(f"sample{i}.npy"
                                             for i in range(1, NUM_CLI_SAMPLES + 1))
    images = np.stack([np.load(p) for p in files])
    assert images.dtype == np.float32 and images.shape == (NUM_CLI_SAMPLES, 1, 150, 150)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert len({image.tobytes() for image in images}) == NUM_CLI_SAMPLES  # distinct draws
    assert (cli_samples / "samples_grid.png").stat().st_size > 10_000
    manifest = json.loads((cli_samples / sample.MANIFEST_NAME).read_text())
    assert manifest["sampler"]["sampler"] == "ddim" and manifest["sampler"]["steps"] == 4
    assert manifest["sampler"]["parameters"] == "EMA"
    assert manifest["checkpoint"]["step"] == 2


def test_sample_cli_refuses_bad_requests(cli_samples, ddpm_workdir, classifier_workdir, tmp_path,
                                         capsys):
    base = ["--workdir", str(ddpm_workdir), "--no-progress"]
    assert sample.main([*base, "--num", "2", "--out", str(cli_samples)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sample.main([*base, "--num", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--num must be >= 1" in capsys.readouterr().err
    assert sample.main(["--workdir", str(classifier_workdir), "--num", "2",
                        "--out", str(tmp_path / "b")]) == 2
    assert "not a diffusion run" in capsys.readouterr().err
    assert sample.main(["--workdir", str(tmp_path / "nothing"), "--num", "2",
                        "--out", str(tmp_path / "c")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "Samples").exists()


def test_evaluate_report_counts_sampler_fid_skipped_and_fld(ddpm_workdir, classifier_workdir,
                                                            cli_samples, serve_split, tmp_path):
    real = _lens_like(12, size=150, seed=7)         # the held-out split; 8 of them are used
    serve_split({"image": real, "label": np.zeros(12, np.int32)})
    config = evaluate.load_config(ddpm_workdir)
    config.eval.fld_workdir = str(classifier_workdir)
    report = evaluate.evaluate_workdir(ddpm_workdir, tmp_path / "report", config=config)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["headline"] == report["headline"]
    metrics = written["metrics"]
    num = config.eval.num_samples
    assert metrics["num_generated"] == num and metrics["num_real"] == num
    assert written["data"]["num_real_used"] == num and "heldout" in written["data"]["split"]
    assert {k: metrics["sampler"][k] for k in ("sampler", "steps", "eta", "seed")} == {
        "sampler": "ddim", "steps": 4, "eta": 0.0, "seed": 0}
    assert metrics["fid"]["status"].startswith("skipped: no weights file given")
    assert "FID skipped" in written["headline"]
    assert metrics["fld"]["value"] > 0 and metrics["fld"]["num_real"] == num
    assert written["checkpoint"]["step"] == 2
    for name in ("samples", "power_spectrum_ratio", "pixel_histogram"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 10_000

    # The evaluated images are the CLI's files 1..num (same seed and sampler).
    files = np.stack([np.load(cli_samples / "Samples" / f"sample{i}.npy")[0]
                      for i in range(1, num + 1)])
    _, expected = lens_stats.pixel_histogram(files)
    np.testing.assert_allclose(metrics["pixel_histogram"]["generated"], expected, atol=1e-12)
    _, expected_real = lens_stats.pixel_histogram(real[:num])
    np.testing.assert_allclose(metrics["pixel_histogram"]["real"], expected_real, atol=1e-12)
    assert metrics["pixel_histogram"]["jensen_shannon_distance_bits"] == pytest.approx(
        lens_stats.pixel_histogram_distance(files, real[:num]))
    k, ratio = lens_stats.power_spectrum_ratio(files, real[:num], 0.05)
    np.testing.assert_allclose(metrics["power_spectrum_ratio"]["k_per_arcsec"], k)
    np.testing.assert_allclose(metrics["power_spectrum_ratio"]["ratio"], ratio, rtol=1e-6)


# ----------------------------------------------------------------------------
# Sampling and held-out loss
# ----------------------------------------------------------------------------

def test_sampling_on_8_devices_equals_1_device_in_other_batches(load_config, make_trained):
    config = small_config(load_config)
    settings = task.sampler_settings(config, sampler="ddim", steps=3, eta=0.5)
    samples = {}
    for devices, batch in ((1, 3), (8, 8)):
        trained = make_trained(config, task, _perturbed, num_devices=devices)
        samples[devices] = task.generate_all(trained, 6, sampler=settings, image_shape=(64, 64, 1),
                                             seed=3, batch_size=batch, progress=False)
    assert samples[8].shape == (6, 64, 64, 1)
    assert np.ptp(samples[8]) > 0.1  # not a constant image
    np.testing.assert_allclose(samples[8], samples[1], atol=2e-5)
    assert not np.allclose(samples[8][0], samples[8][1])


def _lens_like(num: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Rings with a central peak, min-max scaled to [0, 1]: (num, size, size, 1) float32."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    radius = rng.uniform(0.1, 0.3, (num, 1, 1))
    ring = np.exp(-((np.hypot(x, y) - radius) / 0.03) ** 2) * rng.uniform(0.3, 1.0, (num, 1, 1))
    image = ring + np.exp(-(x ** 2 + y ** 2) / 0.002) + 0.02 * rng.normal(size=(num, size, size))
    image = (image - image.min(axis=(1, 2), keepdims=True)) / np.ptp(image, axis=(1, 2),
                                                                     keepdims=True)
    return image[..., None].astype(np.float32)


def _losses_by_index(config, trained) -> np.ndarray:
    losses, indices = [], []
    for batch in pipeline.heldout_iterator(config, trained.mesh, "heldout"):
        mask = parallel.to_host(batch["mask"])
        losses.append(parallel.to_host(trained.predict(batch)["loss"])[mask])
        indices.append(parallel.to_host(batch["index"])[mask])
    return np.concatenate(losses)[np.argsort(np.concatenate(indices))]


def test_heldout_loss_does_not_depend_on_batch_size(load_config, make_trained, serve_split):
    images = _lens_like(12)
    serve_split({"image": images, "label": np.zeros(12, np.int32)})
    config = small_config(load_config)
    trained = make_trained(config, task, _perturbed)
    per_example, means = [], []
    for batch_size in (8, 16):
        config.eval.batch_size = batch_size
        per_example.append(_losses_by_index(config, trained))
        means.append(task.heldout_loss(config, trained, trained.mesh, "heldout"))
    assert per_example[0].shape == (12,) and np.all(per_example[0] > 0)
    np.testing.assert_allclose(per_example[1], per_example[0], rtol=1e-5)
    assert means[0][1] == means[1][1] == 12  # padding never counts
    assert means[1][0] == pytest.approx(means[0][0], rel=1e-6)
    assert means[0][0] == pytest.approx(per_example[0].astype(np.float64).mean(), rel=1e-6)


def test_heldout_loss_of_a_zero_x0_predictor_is_the_image_power(load_config, make_trained,
                                                               serve_split):
    """The fresh UNet outputs 0; as an x0 predictor without weighting its loss at every
    timestep is mean((x0 - 0)^2) with x0 = 2 x - 1, whatever the noise."""
    images = _lens_like(5, seed=1)
    serve_split({"image": images, "label": np.zeros(5, np.int32)})
    config = small_config(load_config, parameterization="x0", weighting="none")
    trained = make_trained(config, task)
    expected = np.mean((2.0 * images.astype(np.float64) - 1.0) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(_losses_by_index(config, trained), expected, rtol=1e-5)
    assert task.selection_metrics(config, trained, trained.mesh)["heldout_loss"] == pytest.approx(
        expected.mean(), rel=1e-5)


def test_heldout_timestep_grid_is_stratified():
    np.testing.assert_array_equal(task.heldout_timestep_grid(1000, 4), [125, 375, 625, 875])
    grid = task.heldout_timestep_grid(10, 10)
    np.testing.assert_array_equal(grid, np.arange(10))


# ----------------------------------------------------------------------------
# FLD and FID
# ----------------------------------------------------------------------------

def test_fld_is_zero_for_a_set_against_itself_and_positive_otherwise(classifier_workdir):
    encoder = image_features.LensingEncoder(classifier_workdir)
    assert encoder.image_size == 150
    images = _lens_like(10, size=64)                     # resized to the classifier's 150 px
    features = encoder(images, batch_size=8)
    assert features.shape == (10, 32) and np.all(np.isfinite(features))
    np.testing.assert_allclose(encoder(images, batch_size=16), features, rtol=1e-5, atol=1e-6)
    scale = np.trace(np.cov(features, rowvar=False))
    assert fid.fid_from_features(features, features) <= 1e-9 * scale
    other = encoder(_lens_like(10, size=64, seed=5) ** 3, batch_size=8)
    assert fid.fid_from_features(features, other) > 1e-3 * scale


def test_fid_metric_is_skipped_without_weights_and_refuses_a_missing_file(tmp_path):
    config = ml_collections.ConfigDict({"eval": {"inception_weights": ""}})
    images = _lens_like(2, size=32)
    assert image_features.fid_metric(config, images, images)["status"].startswith(
        "skipped: no weights file given")
    config.eval.inception_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        image_features.fid_metric(config, images, images)


def test_diffusion_figures_have_labelled_axes_with_units(monkeypatch, tmp_path):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    images = _lens_like(3, size=32)
    plots.plot_image_grids({"generated": images, "held-out": images[:2]}, tmp_path / "g.png",
                           pixel_scale_arcsec=0.05)
    k, ratio = lens_stats.power_spectrum_ratio(images, images[::-1] ** 2, 0.05)
    plots.plot_power_spectrum_ratio(k, ratio, tmp_path / "p.png", nyquist_per_arcsec=10.0)
    edges, p = lens_stats.pixel_histogram(images)
    plots.plot_pixel_histograms(edges, {"a": p, "b": p[::-1]}, tmp_path / "h.png")
    assert len(figures) == 3
    image_axes = [ax for ax in figures[0].get_axes() if ax.get_images()]
    assert len(image_axes) == 5 and all(ax.get_images()[0].get_extent()[1] == pytest.approx(0.8)
                                        for ax in image_axes)
    assert {ax.get_xlabel() for ax in image_axes} >= {"x [arcsec]"}
    assert figures[1].axes[0].get_xlabel() == "angular frequency k [1/arcsec]"
    assert "P_generated" in figures[1].axes[0].get_ylabel()
    assert "intensity" in figures[2].axes[0].get_xlabel()
    assert figures[2].axes[0].get_ylabel() == "fraction of pixels"
    for name in ("g", "p", "h"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
