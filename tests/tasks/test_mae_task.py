"""lensjax.tasks.mae and the Test VI.A configs.

Warm starts: a classifier built by configs/mae_classify.py with model_init pointing
at a real (2-step) pretraining run holds exactly the MAE's encoder arrays (read
back from both checkpoints) and a freshly initialised head; the linear probe's
real training steps move the head and leave the encoder bit for bit as
pretrained; another normalisation is refused. Evaluation: per-example masks are
seeded by the example's index, so the selection metric does not depend on the
eval batch size, and the numbers match MAE.reconstruct and a numpy reference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax import checkpointing, configlib, parallel, plots, tasks, train
from lensjax.tasks import mae as mae_task


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": numpy array}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path + "/"))
        else:
            out[path] = np.asarray(value)
    return out


def _start(config, workdir):
    """The train state as train_and_evaluate starts it in an empty `workdir` (the real
    restore order: here a warm start from config.model_init), and where it came from."""
    task = tasks.get_task(config.task)
    mesh = parallel.make_mesh(None)
    graphdef, state, tx = train.init_state(config, task)
    shardings = train.state_shardings(state, mesh, None)
    latest = checkpointing.latest_manager(workdir)
    state, origin = train.restore_or_init(config, workdir, state, shardings, latest)
    return graphdef, state, tx, shardings, mesh, origin


def _mae_encoder(workdir) -> dict[str, np.ndarray]:
    raw, _ = checkpointing.read_raw(workdir, prefer_best=True)
    return _flat(raw["params"]["encoder"])


def test_classifier_warm_start_copies_every_encoder_array_and_keeps_a_fresh_head(
        load_config, pretrained_mae, tmp_path):
    config = load_config("mae_classify", f"runlocal=True,init={pretrained_mae}")
    _, state, *_, origin = _start(config, tmp_path)
    assert origin.startswith(f"warm start from {pretrained_mae}")
    ours = _flat(nnx.to_pure_dict(state["params"]))
    _, fresh_state, _ = train.init_state(config, tasks.get_task(config.task))
    fresh = _flat(nnx.to_pure_dict(fresh_state["params"]))
    source = _mae_encoder(pretrained_mae)

    encoder = {k.removeprefix("encoder/"): v for k, v in ours.items() if k.startswith("encoder/")}
    assert set(encoder) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(encoder[name], value, err_msg=name)
    # The copy is not a coincidence of equal seeds: 2 training steps moved the MAE.
    assert any(not np.array_equal(fresh[f"encoder/{k}"], v) for k, v in source.items())

    head = sorted(k for k in ours if not k.startswith("encoder/"))
    assert head == ["head/bias", "head/kernel"]
    for name in head:
        np.testing.assert_array_equal(ours[name], fresh[name], err_msg=name)


def test_linear_probe_trains_the_head_only(load_config, pretrained_mae, tmp_path):
    config = load_config("mae_classify", f"runlocal=True,mode=linear_probe,init={pretrained_mae}")
    assert config.train.frozen == "^encoder/"
    graphdef, state, tx, shardings, mesh, _ = _start(config, tmp_path)
    task = tasks.get_task(config.task)
    step_fn, _ = train.build_train_step(graphdef, task, tx, config, state, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(16, 64, 64, 1)).astype(np.float32),
             "label": (np.arange(16) % 3).astype(np.int32)}
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    for step in range(3):  # the first step has learning rate 0 (warmup)
        state, metrics = step_fn(state, batch, jax.random.key(step))
    assert np.isfinite(float(metrics.compute()["loss"]))

    params = _flat(nnx.to_pure_dict(state["params"]))
    for name, value in _mae_encoder(pretrained_mae).items():
        np.testing.assert_array_equal(params[f"encoder/{name}"], value, err_msg=name)
    assert np.abs(params["head/kernel"]).max() > 0  # it starts at zero


def test_full_fine_tune_uses_layer_decay_and_trains_the_encoder(load_config):
    config = load_config("mae_classify", "runlocal=True,mode=finetune,layer_decay=0.5")
    assert config.train.layer_decay == 0.5 and not config.train.frozen
    model = tasks.get_task(config.task).create_model(config, nnx.Rngs(0))
    labels, scales = train.parameter_groups(nnx.state(model, nnx.Param), config.train, model)
    depth = model.encoder.depth
    assert scales["layer0"] == pytest.approx(0.5 ** (depth + 1))  # patch embedding
    assert scales[f"layer{depth + 1}"] == 1.0                      # head
    assert "frozen" not in jax.tree.leaves(labels)


def test_fine_tuning_with_another_normalisation_is_refused(load_config, pretrained_mae, tmp_path):
    config = load_config("mae_classify", f"runlocal=True,init={pretrained_mae}")
    config.data.normalization = "standardize"
    with pytest.raises(ValueError, match="scaled by 'minmax'.*feeds 'standardize'"):
        _start(config, tmp_path)


def test_pretraining_and_fine_tuning_take_normalisation_from_one_place(load_config, monkeypatch):
    monkeypatch.setattr(configlib, "FOUNDATION_NORMALIZATION", "standardize")
    for name in ("mae_pretrain", "mae_classify"):
        assert load_config(name).data.normalization == "standardize", name


def test_init_with_an_encoder_of_another_size_is_refused(pretrained_mae):
    with pytest.raises(ValueError, match="encoder"):
        configlib.check_encoder_matches(str(pretrained_mae), configlib.mae_encoder("tiny"))
    configlib.check_encoder_matches(str(pretrained_mae), configlib.mae_encoder("runlocal"))


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def _smooth_images(num: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Rings of random radius and centre in [0, 1]: (num, size, size, 1) float32."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    radius = rng.uniform(0.15, 0.3, (num, 1, 1))
    cx, cy = rng.uniform(-0.05, 0.05, (2, num, 1, 1))
    rings = np.exp(-((np.hypot(x - cx, y - cy) - radius) / 0.03) ** 2)
    return rings[..., None].astype(np.float32)


@pytest.fixture
def mae_eval(load_config, serve_split, make_trained):
    config = load_config("mae_pretrain")
    config.data.selection_examples = config.data.heldout_examples = 20
    images = _smooth_images(20)
    serve_split({"image": images, "label": np.zeros(20, np.int32)})
    return config, images, make_trained(config, mae_task)


def test_masked_mse_does_not_depend_on_the_eval_batch_size(mae_eval):
    config, images, trained = mae_eval
    results = {}
    for batch_size in (8, 16):  # 20 examples: 4 and 12 padded slots
        config.eval.batch_size = batch_size
        values = mae_task.per_example.collect(config, trained, trained.mesh, "selection")
        results[batch_size] = (mae_task.selection_metrics(config, trained, trained.mesh), values)
    (sel8, val8), (sel16, val16) = results[8], results[16]
    np.testing.assert_array_equal(val8["index"], np.arange(20))
    np.testing.assert_array_equal(val16["index"], np.arange(20))
    np.testing.assert_allclose(val8["masked_mse"], val16["masked_mse"], rtol=1e-5)
    assert sel8["masked_mse"] == pytest.approx(sel16["masked_mse"], rel=1e-6)
    assert sel8["masked_mse"] == pytest.approx(np.mean(val8["masked_mse"]), rel=1e-6)

    # Each example's number is MAE.reconstruct of that image alone with its own key ...
    alone = trained.jit(lambda model, image, key: model.reconstruct(image, key)["masked_mse"][0])
    root = jax.random.key(mae_task.EVAL_MASK_SEED)
    for n in (0, 13, 19):
        expected = float(alone(images[n:n + 1], jax.random.fold_in(root, n)))
        assert val8["masked_mse"][n] == pytest.approx(expected, rel=1e-5)
    # ... and the key really depends on the index: the same image, another mask.
    other = float(alone(images[:1], jax.random.fold_in(root, 1)))
    assert not np.isclose(other, val8["masked_mse"][0], rtol=1e-6)


def test_mean_fill_baseline_matches_numpy():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
    mask = (rng.uniform(size=(3, 8, 8, 1)) < 0.7).astype(np.float32)
    got = np.asarray(mae_task.mean_fill_mse(images, mask))
    for b in range(3):
        hidden, seen = images[b][mask[b] > 0], images[b][mask[b] == 0]
        np.testing.assert_allclose(got[b], np.mean((hidden - seen.mean()) ** 2), rtol=1e-5)


def test_evaluate_reports_heldout_numbers_and_a_labelled_panel(mae_eval, tmp_path, monkeypatch):
    config, _, trained = mae_eval
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    report = mae_task.evaluate(config, trained, trained.mesh, tmp_path)
    values = mae_task.per_example.collect(config, trained, trained.mesh, "heldout")

    metrics = report["metrics"]
    assert metrics["num_images"] == 20
    assert metrics["masked_mse"]["mean"] == pytest.approx(np.mean(values["masked_mse"]), rel=1e-6)
    assert metrics["masked_mse"]["std"] == pytest.approx(np.std(values["masked_mse"], ddof=1),
                                                         rel=1e-5)
    assert "20 held-out images" in report["headline"]
    assert (tmp_path / "reconstructions.png").is_file()
    (figure,) = figures
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 4 * mae_task.PANEL_ROWS
    assert {ax.get_xlabel() for ax in image_axes if ax.get_xlabel()} == {"x [arcsec]"}
    assert len(figure.axes) - len(image_axes) == mae_task.PANEL_ROWS  # one colour bar per row
