"""lensjax.data.pipeline and transforms: the same batches from simulated and official data.

The TFDS path is checked on a tiny official-layout folder written by
lensjax.sim.export: every held-out file is seen exactly once (padding masked),
global batches are sharded over the 8 test devices, the class filter works, and
split.json lists the files; a 2-step training run reads it end to end.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax import parallel, train
from lensjax.configlib import apply_runlocal, base_config
from lensjax.data import pipeline, transforms
from lensjax.sim.export import export_preset


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------

def test_normalize_matches_numpy():
    images = np.random.default_rng(0).gamma(2.0, 50.0, size=(5, 9, 9, 1)).astype(np.float32)
    minmax = np.asarray(transforms.normalize(jnp.asarray(images), "minmax"))
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(minmax, (images - low) / (high - low), rtol=1e-5, atol=1e-6)
    standard = np.asarray(transforms.normalize(jnp.asarray(images), "standardize"))
    np.testing.assert_allclose(standard.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(standard.std(axis=(1, 2, 3)), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(transforms.normalize(jnp.asarray(images), "none")),
                                  images)
    constant = np.ones((1, 4, 4, 1), np.float32)
    assert np.all(np.isfinite(np.asarray(transforms.normalize(jnp.asarray(constant), "minmax"))))
    with pytest.raises(ValueError, match="normalization must be one of"):
        transforms.normalize(jnp.asarray(images), "zscore")


def test_dihedral_augment_gives_the_eight_symmetries_and_keeps_pairs_aligned():
    rng = np.random.default_rng(1)
    hr = rng.normal(size=(64, 6, 6, 1)).astype(np.float32)
    lr = hr.reshape(64, 3, 2, 3, 2, 1).mean(axis=(2, 4))
    out = transforms.apply({"hr": jnp.asarray(hr), "lr": jnp.asarray(lr)}, jax.random.key(3),
                           "none", augment=True)
    seen = set()
    for i in range(64):
        candidates = [np.rot90(hr[i], k) for k in range(4)]
        candidates += [c[:, ::-1] for c in candidates]
        matches = [k for k, c in enumerate(candidates) if np.array_equal(c, np.asarray(out["hr"][i]))]
        assert len(matches) == 1
        seen.add(matches[0])
        # The LR of the transformed HR is the transformed LR: the pair stays a pair.
        pooled = np.asarray(out["hr"][i]).reshape(3, 2, 3, 2, 1).mean(axis=(1, 3))
        np.testing.assert_allclose(np.asarray(out["lr"][i]), pooled, rtol=1e-5, atol=1e-6)
    assert len(seen) == 8


# ----------------------------------------------------------------------------
# Simulated stream
# ----------------------------------------------------------------------------

def _sim_config(**data):
    config = base_config()
    apply_runlocal(config)
    config.data.preset = "model_ii"
    config.data.update(data)
    return config


def test_sim_heldout_has_mask_index_and_forced_label():
    config = _sim_config(label="axion", heldout_examples=20, normalization="minmax")
    mesh = parallel.make_mesh()
    batches = list(pipeline.heldout_iterator(config, mesh, "heldout"))
    assert len(batches) == 2  # 20 examples in batches of 16
    mask = np.concatenate([parallel.to_host(b["mask"]) for b in batches])
    index = np.concatenate([parallel.to_host(b["index"]) for b in batches])
    assert mask.sum() == 20 and not mask[20:].any()
    np.testing.assert_array_equal(index, np.arange(32))
    labels = np.concatenate([parallel.to_host(b["label"]) for b in batches])
    assert set(labels.tolist()) == {2}
    images = parallel.to_host(batches[0]["image"])
    assert images.min() == 0.0 and images.max() == 1.0
    assert batches[0]["image"].sharding.spec[0] == parallel.DATA_AXIS


def test_selection_heldout_and_train_streams_differ():
    config = _sim_config()
    mesh = parallel.make_mesh()
    first = {split: parallel.to_host(next(iter(pipeline.heldout_iterator(config, mesh, split)))["image"])
             for split in ("heldout", "selection")}
    train_batch = parallel.to_host(next(pipeline.train_iterator(config, mesh))["image"])
    assert not np.allclose(first["heldout"], first["selection"])
    assert not np.allclose(first["heldout"], train_batch)


@pytest.mark.parametrize("normalization", ["none", "minmax"])
def test_one_device_stream_equals_the_eight_device_stream(normalization):
    """The stream's batches do not depend on the device count: one device and 8
    devices (each simulating its own shard) give the same train batches (balanced
    classes, augmentation on), step by step."""
    config = _sim_config(normalization=normalization, augment=True)
    one = pipeline.train_iterator(config, parallel.make_mesh(1), start_step=3)
    eight = pipeline.train_iterator(config, parallel.make_mesh(), start_step=3)
    for _ in range(2):
        a, b = next(one), next(eight)
        assert a["image"].sharding.mesh.size == 1 and b["image"].sharding.mesh.size == 8
        np.testing.assert_array_equal(parallel.to_host(a["label"]), parallel.to_host(b["label"]))
        np.testing.assert_allclose(parallel.to_host(a["image"]), parallel.to_host(b["image"]),
                                   rtol=1e-6, atol=1e-6)


def test_superres_stream_gives_pairs():
    config = _sim_config()
    config.data.preset = "superres"
    batch = next(pipeline.train_iterator(config, parallel.make_mesh()))
    assert batch["hr"].shape == (16, 150, 150, 1) and batch["lr"].shape == (16, 75, 75, 1)
    hr, lr = parallel.to_host(batch["hr"]), parallel.to_host(batch["lr"])
    pooled = hr.reshape(16, 75, 2, 75, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(lr, pooled, atol=1e-6)  # augmentation kept each pair aligned


# ----------------------------------------------------------------------------
# Official layout through TFDS
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def common_test_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "manual"
    export_preset("common_test", out, 12, 5, batch_size=12, progress=False, val_per_class=3)
    return out


def _tfds_config(manual_dir, tmp_path, **data):
    config = base_config()
    apply_runlocal(config)
    config.data.source = "tfds"
    config.data.tfds_name = "deeplense_common_test"
    config.data.manual_dir = str(manual_dir)
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.update(data)
    return config


def test_tfds_heldout_sees_every_val_file_once(common_test_dir, tmp_path):
    config = _tfds_config(common_test_dir, tmp_path)
    mesh = parallel.make_mesh()
    batches = list(pipeline.heldout_iterator(config, mesh, "heldout"))
    assert len(batches) == 1  # 9 val files in one batch of 16
    mask = parallel.to_host(batches[0]["mask"])
    assert mask.sum() == 9
    images = parallel.to_host(batches[0]["image"])[mask]
    labels = parallel.to_host(batches[0]["label"])[mask]
    names = ("no", "sphere", "vort")
    on_disk = {(names.index(p.parent.name), np.load(p)[0].astype(np.float32).tobytes())
               for p in (common_test_dir / "dataset" / "val").rglob("*.npy")}
    seen = {(int(l), np.ascontiguousarray(im[..., 0]).tobytes()) for l, im in zip(labels, images)}
    assert seen == on_disk


def test_tfds_train_batches_class_filter_and_split_json(common_test_dir, tmp_path):
    config = _tfds_config(common_test_dir, tmp_path, label="vort")
    mesh = parallel.make_mesh()
    batch = next(pipeline.train_iterator(config, mesh))
    assert batch["image"].shape == (16, 150, 150, 1)
    assert set(parallel.to_host(batch["label"]).tolist()) == {2}
    path = pipeline.record_split(config, tmp_path / "work")
    record = json.loads(path.read_text())["deeplense_common_test"]
    assert record["counts"]["val"] == 9
    assert record["counts"]["train"] + record["counts"]["selection"] == 36
    assert not set(record["files"]["train"]) & set(record["files"]["selection"])


def test_tfds_source_trains_two_steps(common_test_dir, tmp_path):
    config = _tfds_config(common_test_dir, tmp_path)
    config.task = "classification"
    config.model = dict(name="resnet18", kwargs=dict(width=4, image_size=150))
    final = train.train_and_evaluate(config, tmp_path / "work")
    assert final["step"] == 2 and np.isfinite(final["train_loss"])
    split = json.loads((tmp_path / "work" / "split.json").read_text())
    assert "deeplense_common_test" in split


def test_missing_manual_dir_names_the_fix(tmp_path):
    config = _tfds_config("", tmp_path)
    config.data.data_dir = ""
    with pytest.raises(ValueError, match="manual_dir"):
        next(pipeline.train_iterator(config, parallel.make_mesh()))


# ----------------------------------------------------------------------------
# Background prefetch
# ----------------------------------------------------------------------------

def _prefetch_threads() -> int:
    import threading
    return sum(t.name == pipeline.PREFETCH_THREAD for t in threading.enumerate())


def test_prefetch_keeps_order_and_ends_with_the_source():
    assert list(pipeline.prefetch_in_background(iter(range(50)), size=2)) == list(range(50))
    with pytest.raises(ValueError, match="prefetch size"):
        pipeline.prefetch_in_background(iter(range(3)), size=0)


def test_prefetch_raises_the_sources_error_at_its_place():
    def source():
        yield 0
        yield 1
        raise OSError("corrupt batch file")

    batches = pipeline.prefetch_in_background(source(), size=2)
    assert next(batches) == 0 and next(batches) == 1
    with pytest.raises(OSError, match="corrupt batch file"):
        next(batches)


def test_prefetch_thread_stops_when_the_consumer_closes():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    batches = pipeline.prefetch_in_background(endless(), size=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    before = _prefetch_threads()
    batches.close()  # returns once its thread has ended
    assert _prefetch_threads() == before - 1
    assert len(produced) <= 3 + 2 + 1  # consumed, queued, and at most one in hand


@pytest.mark.parametrize("devices", [1, 8])
def test_train_stream_is_prefetched_on_one_device_and_equals_direct_batches(devices):
    config = _sim_config()
    mesh = parallel.make_mesh(devices)
    before = _prefetch_threads()
    batches = pipeline.train_iterator(config, mesh, start_step=2)
    direct = pipeline._sim_stream(config, mesh, config.train.batch_size, "train")
    for step in (2, 3, 4):
        a, b = next(batches), direct.batch(step)
        np.testing.assert_array_equal(parallel.to_host(a["label"]), parallel.to_host(b["label"]))
        np.testing.assert_array_equal(parallel.to_host(a["image"]), parallel.to_host(b["image"]))
    # A second launching thread only where no collectives can be reordered.
    assert _prefetch_threads() == before + (devices == 1)
    batches.close()
