"""The training core: sharded == single-device step, exact resume after a hard kill,
NaN stops without saving, evaluation report, restore order."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from lensjax import checkpointing, evaluate, parallel, tasks, train, writers
from lensjax.data import pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "common_resnet18.py"


def tiny_config(**train_overrides):
    sys.path.insert(0, str(REPO / "configs"))
    import common_resnet18
    config = common_resnet18.get_config("runlocal=True")
    config.data.preset = "model_ii"  # 64 px: the cheapest preset
    config.model.kwargs.image_size = 64
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


NO_TENSORFLOW = """
import sys
# As on a GPU image without TensorFlow: importing it raises ModuleNotFoundError and
# importlib.util.find_spec finds nothing.
for _name in ("tensorflow", "tensorflow_datasets", "tensorboard"):
    sys.modules[_name] = None
"""


@pytest.mark.parametrize("tensorflow", ["absent", "installed"])
def test_training_and_benchmarks_import_without_tensorflow(tensorflow):
    """Only the training loop's metric writers (clu's, which import TensorFlow) and the
    DeepLense TFDS builders need TensorFlow: the models, the diffusion maths, the step,
    the entry points' modules and the train-step benchmark import where it is absent,
    and where it is installed they leave it unimported (it takes seconds to load)."""
    code = (NO_TENSORFLOW if tensorflow == "absent" else "import sys\n") + (
        "sys.path.insert(0, 'experiments/benchmarks')\n"
        "import lensjax.models, lensjax.diffusion\n"
        "import lensjax.train, lensjax.main, lensjax.evaluate, lensjax.sample, bench_train\n"
        "from lensjax import tasks\n"
        "[tasks.get_task(name) for name in tasks.TASKS]\n"
        "loaded = [m for m in ('tensorflow', 'tensorflow_datasets', 'tensorboard')\n"
        "          if sys.modules.get(m) is not None]\n"
        "assert not loaded, f'imported {loaded}'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_without_tensorflow_writes_metrics_jsonl(tmp_path):
    """`python -m lensjax.main` trains where TensorFlow is absent (some GPU images):
    the metrics go to workdir/metrics.jsonl and the log instead of TensorBoard."""
    argv = ["lensjax.main", f"--config={CONFIG}:runlocal=True", f"--workdir={tmp_path}",
            "--config.data.preset=model_ii", "--config.model.kwargs.image_size=64",
            "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2"]
    code = NO_TENSORFLOW + f"import runpy\nsys.argv = {argv!r}\nrunpy.run_module('lensjax.main', run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "TensorFlow is not installed" in result.stderr
    rows = writers.read_metrics(tmp_path / writers.METRICS_FILE)
    train_rows = [row for row in rows if "train_loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) for row in train_rows)
    selection = [row for row in rows if any(k.startswith("selection_") for k in row)]
    assert [row["step"] for row in selection] == [2]
    assert any("steps_per_sec" in row and row["steps_per_sec"] > 0 for row in rows)
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert checkpointing.find_checkpoint(tmp_path, prefer_best=False)[1] == 2


def test_tensorflow_is_kept_off_accelerators(monkeypatch):
    """TensorFlow (imported for clu's writers and TFDS) gets no GPU; hiding them after
    TensorFlow initialised its devices (RuntimeError) is not an error."""
    import tensorflow as tf
    calls = []

    def set_visible_devices(devices, device_type):
        calls.append((list(devices), device_type))
        if len(calls) == 2:
            raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", set_visible_devices)
    parallel.hide_accelerators_from_tensorflow()
    parallel.hide_accelerators_from_tensorflow()
    assert calls == [([], "GPU"), ([], "GPU")]


def _params(state):
    return {"/".join(map(str, path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def test_sharded_step_matches_single_device_step():
    """One step of the real step function on 1 and on 8 devices.

    With plain SGD the parameter change is lr * gradient, so this compares the
    gradients (Adam's first update, lr * g / (|g| + 1e-8), would turn reduction-
    order rounding of near-zero gradients into visible differences).
    """
    config = tiny_config()
    task = tasks.get_task(config.task)
    tx = optax.sgd(0.1)
    results = []
    for num_devices in (1, 8):
        mesh = parallel.make_mesh(num_devices)
        graphdef, state, _ = train.init_state(config, task, tx)
        initial = _params(state)
        step_fn, shardings = train.build_train_step(graphdef, task, tx, config, state, mesh)
        state = jax.device_put(state, shardings)
        batches = pipeline.train_iterator(config, mesh)
        losses = []
        state, m = step_fn(state, next(batches), jax.random.key(0))
        losses.append(float(m.compute()["loss"]))
        results.append((_params(state), losses))
    (p1, loss1), (p8, loss8) = results
    np.testing.assert_allclose(loss8[0], loss1[0], rtol=1e-6)  # same batch, same params
    # Float32 sums over 16 x 64 x 64 pixels in another order (per device, then
    # across devices) differ in the last bits, and cancellation in BatchNorm's
    # backward pass amplifies that: compare the whole update, in norm.
    diff = sum(np.sum((p8[k] - p1[k]) ** 2) for k in p1)
    update = sum(np.sum((p1[k] - initial[k]) ** 2) for k in p1)
    assert np.sqrt(diff / update) < 2e-2


def test_fsdp_shards_params_and_optimizer_state_and_matches_replicated_step():
    """With config.mesh.fsdp_min_size, large parameters and their optimiser state
    (here SGD momentum, shaped like the parameters) live split over the 8 devices,
    and one step gives the update of the replicated layout."""
    config = tiny_config()
    task = tasks.get_task(config.task)
    tx = optax.sgd(0.1, momentum=0.9)
    mesh = parallel.make_mesh(8)
    results = {}
    for fsdp_min_size in (0, 1024):
        config.mesh.fsdp_min_size = fsdp_min_size
        graphdef, state, _ = train.init_state(config, task, tx)
        initial = _params(state)
        step_fn, shardings = train.build_train_step(graphdef, task, tx, config, state, mesh)
        state = jax.device_put(state, shardings)
        state, _ = step_fn(state, next(pipeline.train_iterator(config, mesh)), jax.random.key(0))
        results[fsdp_min_size] = (_params(state), state)
    params_fsdp, state_fsdp = results[1024]
    sharded = [leaf for leaf in jax.tree.leaves(state_fsdp["params"]) if leaf.size >= 1024]
    momenta = [leaf for leaf in jax.tree.leaves(state_fsdp["opt_state"]) if leaf.size >= 1024]
    assert sharded and len(momenta) == len(sharded)
    for leaf in sharded + momenta:
        assert parallel.DATA_AXIS in leaf.sharding.spec, leaf.shape
        assert leaf.addressable_shards[0].data.size == leaf.size // 8
    params_rep = results[0][0]
    assert all(parallel.DATA_AXIS not in leaf.sharding.spec
               for leaf in jax.tree.leaves(results[0][1]["opt_state"]))
    diff = sum(np.sum((params_fsdp[k] - params_rep[k]) ** 2) for k in initial)
    update = sum(np.sum((params_rep[k] - initial[k]) ** 2) for k in initial)
    assert np.sqrt(diff / update) < 2e-2


def _run_main(workdir, *flags, env=None, check=True):
    cmd = [sys.executable, "-m", "lensjax.main", f"--config={CONFIG}:runlocal=True",
           f"--workdir={workdir}", "--config.data.preset=model_ii",
           "--config.model.kwargs.image_size=64", *flags]
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _latest_params(workdir):
    manager, step = checkpointing.find_checkpoint(workdir, prefer_best=False)
    return step, manager.restore(step)["params"]


def test_hard_kill_and_resume_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    steps = ["--config.train.steps=4", "--config.train.eval_every=100"]
    _run_main(straight, *steps)
    result = _run_main(killed, *steps, env={"LENSJAX_TEST_KILL_AFTER_STEP": "2"}, check=False)
    assert result.returncode == -9, result.stderr[-2000:]
    assert _latest_params(killed)[0] == 2
    _run_main(killed, *steps)  # resumes from step 2
    step_a, params_a = _latest_params(straight)
    step_b, params_b = _latest_params(killed)
    assert step_a == step_b == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params_a, params_b)
    report = evaluate.evaluate_workdir(killed)
    assert report["checkpoint"]["step"] == 4
    written = json.loads((killed / "report" / "report.json").read_text())
    assert written["data"]["num_examples"] == 32
    assert 0.0 <= written["metrics"]["auc_macro"] <= 1.0
    assert (killed / "report" / "roc.png").is_file()
    assert (killed / "report" / "confusion.png").is_file()
    assert json.loads((killed / "config.json").read_text())["train"]["steps"] == 4


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(steps=6, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0,
                         checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train_and_evaluate(config, tmp_path)
    manager, step = checkpointing.find_checkpoint(tmp_path, prefer_best=False)
    params = manager.restore(step)["params"]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_model_init_warm_starts_parameters(tmp_path):
    source = tmp_path / "source"
    train.train_and_evaluate(tiny_config(), source)
    config = tiny_config(steps=1)
    config.model_init = str(source)
    config.train.learning_rate = 0.0
    target = tmp_path / "target"
    train.train_and_evaluate(config, target)
    _, src = _latest_params(source)
    _, dst = _latest_params(target)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b)), src, dst)


def test_bad_batch_size_names_the_fix():
    config = tiny_config(batch_size=12)
    with pytest.raises(ValueError, match="multiple of 8"):
        train.train_and_evaluate(config, "/tmp/unused-lensjax-workdir")


def test_evaluate_overrides_use_the_training_syntax(tmp_path):
    train.write_config(tiny_config(), tmp_path)
    config = evaluate.config_with_overrides(tmp_path, ["--config.eval.batch_size=8",
                                                       "--config.data.heldout_examples=64"])
    assert config.eval.batch_size == 8 and config.data.heldout_examples == 64
    assert config.train.steps == tiny_config().train.steps
    with pytest.raises(SystemExit, match="bad override"):
        evaluate.config_with_overrides(tmp_path, ["--config.eval.no_such_key=1"])
    with pytest.raises(FileNotFoundError, match="lensjax workdir"):
        evaluate.config_with_overrides(tmp_path / "missing", [])


def test_the_loop_freezes_its_setup_objects_and_releases_them_after(tmp_path, monkeypatch):
    """Full garbage collections skip the objects alive after the first step; the
    freeze ends with the run, even when the run raises."""
    seen = []
    original = train.LongLivedObjectsFrozen.freeze

    def freeze(self):
        original(self)
        seen.append(gc.get_freeze_count())
    monkeypatch.setattr(train.LongLivedObjectsFrozen, "freeze", freeze)
    assert gc.get_freeze_count() == 0
    train.train_and_evaluate(tiny_config(steps=3, eval_every=100), tmp_path / "run")
    assert len(seen) == 1 and seen[0] > 10_000, seen   # jax, flax and the compiled step
    assert gc.get_freeze_count() == 0
    with pytest.raises(FloatingPointError):
        train.train_and_evaluate(tiny_config(steps=4, learning_rate=1e30, grad_clip_norm=0.0,
                                             warmup_steps=0, log_every=2), tmp_path / "nan")
    assert len(seen) == 2 and gc.get_freeze_count() == 0


def _tracked(obj) -> bool:
    """Whether the garbage collector still walks `obj` (frozen objects are not listed)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_hides_live_objects_and_an_earlier_freeze_is_left_as_it_was():
    with train.LongLivedObjectsFrozen() as frozen:
        kept = [object()]
        frozen.freeze()
        assert not _tracked(kept)
    assert _tracked(kept) and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with train.LongLivedObjectsFrozen() as frozen:
            kept = [object()]   # made after the earlier freeze
            frozen.freeze()     # leaves the earlier freeze to its owner: does nothing
            assert _tracked(kept)
        assert gc.get_freeze_count() > 0   # the earlier freeze stands
    finally:
        gc.unfreeze()
