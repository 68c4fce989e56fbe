"""lensjax.tasks.superres and configs/mae_superres.py.

On a fixed held-out split of lens-like pairs (HR in [0, 1], LR its 2 x 2 mean
pool), the evaluator's bicubic numbers are recomputed with scikit-image on
`bicubic_upsample` of the same LR images, and the model's PSNR and SSIM with
scikit-image on its own output; an untrained model (bicubic plus a zero
residual) scores exactly as bicubic; padding of the last batch never enters a
mean; the encoder of an MAE run warm-starts the super-resolution model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lensjax import checkpointing, parallel, plots, train
from lensjax.metrics import image_quality
from lensjax.tasks import superres as sr_task
from tests.tasks.test_mae_task import _flat

NUM_HELDOUT = 12  # two batches of 8, the second half padding


def _perturb_output_layer(pure: dict) -> dict:
    """Give the zero-initialised last convolution random weights: output != bicubic."""
    kernel = pure["out"]["kernel"]
    pure["out"]["kernel"] = np.random.default_rng(0).normal(0.0, 0.05, np.shape(kernel)).astype(
        np.float32)
    return pure


@pytest.fixture(scope="module")
def sr_config(load_config):
    config = load_config("mae_superres")
    config.data.heldout_examples = config.data.selection_examples = NUM_HELDOUT
    config.eval.batch_size = 8
    return config


def _smooth_pairs(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lens-like HR images in [0, 1] (a ring and a central peak) (num, 150, 150, 1) and
    their 2 x 2 mean pools (num, 75, 75, 1), as the VI.B pairs are made."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:150, :150] + 0.5) / 150 - 0.5
    radius = rng.uniform(0.12, 0.3, (num, 1, 1))
    width = rng.uniform(0.01, 0.03, (num, 1, 1))
    ring = np.exp(-((np.hypot(x, y) - radius) / width) ** 2) * rng.uniform(0.3, 1.0, (num, 1, 1))
    peak = np.exp(-(x ** 2 + y ** 2) / 0.0004)
    hr = ring + peak + 0.01 * rng.normal(size=(num, 150, 150))
    hr = (hr - hr.min(axis=(1, 2), keepdims=True)) / np.ptp(hr, axis=(1, 2), keepdims=True)
    hr = hr[..., None].astype(np.float32)
    return hr.reshape(num, 75, 2, 75, 2, 1).mean(axis=(2, 4)), hr


def test_evaluator_matches_scikit_image_on_the_same_heldout_pairs(
        sr_config, make_trained, serve_split, tmp_path, monkeypatch):
    lr, hr = _smooth_pairs(NUM_HELDOUT)
    serve_split({"lr": lr, "hr": hr, "label": np.zeros(NUM_HELDOUT, np.int32)})
    trained = make_trained(sr_config, sr_task, _perturb_output_layer)
    figures, panels = [], []
    save, plot_panel = plots._save, plots.plot_superres_panel
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    monkeypatch.setattr(plots, "plot_superres_panel",
                        lambda *args, **kw: panels.append((args, kw)) or plot_panel(*args, **kw))
    report = sr_task.evaluate(sr_config, trained, trained.mesh, tmp_path)
    metrics = report["metrics"]
    assert metrics["num_images"] == NUM_HELDOUT

    bicubic = np.clip(np.asarray(image_quality.bicubic_upsample(lr, 2)), 0.0, 1.0)[..., 0]
    target = hr[..., 0].astype(np.float64)
    psnr = [peak_signal_noise_ratio(t, b, data_range=1.0) for t, b in zip(target, bicubic)]
    ssim = [structural_similarity(b, t, data_range=1.0, win_size=7)
            for t, b in zip(target, bicubic)]
    mse = [np.mean((b - t) ** 2) for t, b in zip(target, bicubic)]
    assert metrics["bicubic"]["psnr"]["mean"] == pytest.approx(np.mean(psnr), abs=1e-3)
    assert metrics["bicubic"]["ssim"]["mean"] == pytest.approx(np.mean(ssim), abs=1e-5)
    assert metrics["bicubic"]["mse"]["mean"] == pytest.approx(np.mean(mse), rel=1e-4)

    # The model's own numbers against scikit-image on the outputs the report shows.
    values = sr_task.per_example.collect(sr_config, trained, trained.mesh, "heldout")
    (args, shown), = panels
    lr_shown, _, sr_shown, hr_shown = args[:4]
    np.testing.assert_array_equal(lr_shown, lr[shown["indices"]])
    np.testing.assert_array_equal(hr_shown, hr[shown["indices"]])
    for row, n in enumerate(shown["indices"]):
        expected = peak_signal_noise_ratio(target[n], sr_shown[row, ..., 0].astype(np.float64),
                                           data_range=1.0)
        assert values["psnr"][n] == pytest.approx(expected, abs=1e-3)
        assert shown["psnr"][row] == pytest.approx(expected, abs=1e-3)
        assert values["ssim"][n] == pytest.approx(structural_similarity(
            sr_shown[row, ..., 0].astype(np.float64), target[n], data_range=1.0, win_size=7),
            abs=1e-5)
    assert metrics["lensjax"]["psnr"]["mean"] == pytest.approx(np.mean(values["psnr"]), rel=1e-6)
    assert metrics["psnr_gain_db"]["mean"] == pytest.approx(
        np.mean(values["psnr"]) - np.mean(psnr), abs=1e-3)
    assert not np.allclose(values["psnr"], values["bicubic_psnr"])  # the model is not bicubic

    written = json.loads(json.dumps(report))  # a report must be JSON
    assert f"{NUM_HELDOUT} held-out images" in written["headline"]
    assert (tmp_path / "superres.png").is_file()
    (figure,) = figures
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 6 * sr_task.PANEL_ROWS
    assert {ax.get_xlabel() for ax in image_axes if ax.get_xlabel()} == {"x [arcsec]"}
    assert len(figure.axes) - len(image_axes) == 2 * sr_task.PANEL_ROWS  # colour bars


def test_untrained_model_scores_exactly_as_bicubic(sr_config, make_trained, serve_split):
    lr, hr = _smooth_pairs(NUM_HELDOUT, seed=1)
    serve_split({"lr": lr, "hr": hr, "label": np.zeros(NUM_HELDOUT, np.int32)})
    trained = make_trained(sr_config, sr_task)
    values = sr_task.per_example.collect(sr_config, trained, trained.mesh, "selection")
    for name in sr_task.SCORES:
        np.testing.assert_allclose(values[name], values[f"bicubic_{name}"], rtol=1e-6)
    selection = sr_task.selection_metrics(sr_config, trained, trained.mesh)
    # Only the 12 valid pairs count, not the 4 zero-padded slots of the last batch.
    assert selection["psnr"] == pytest.approx(np.mean(values["bicubic_psnr"]), rel=1e-6)
    assert len(values["psnr"]) == NUM_HELDOUT


def test_standardized_images_are_refused(sr_config):
    config = sr_config.copy_and_resolve_references()
    config.data.normalization = "standardize"
    with pytest.raises(ValueError, match="data_range"):
        sr_task.create_model(config, nnx.Rngs(0))


def test_superres_warm_starts_from_the_mae_encoder(load_config, pretrained_mae, tmp_path):
    config = load_config("mae_superres", f"runlocal=True,init={pretrained_mae}")
    mesh = parallel.make_mesh(None)
    task = sr_task
    graphdef, state, _ = train.init_state(config, task)
    shardings = train.state_shardings(state, mesh, None)
    latest = checkpointing.latest_manager(tmp_path)
    state, origin = train.restore_or_init(config, tmp_path, state, shardings, latest)
    assert origin.startswith("warm start")
    source, _ = checkpointing.read_raw(pretrained_mae)
    source = _flat(source["params"]["encoder"])
    ours = _flat(nnx.to_pure_dict(state["params"])["encoder"])
    assert set(ours) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
