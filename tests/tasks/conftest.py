"""Shared set-up for the task tests: configs/*.py loading, one tiny MAE pretraining
run (shared by every test of the session that warm-starts from it), and a fixed
evaluation split served in place of the simulated one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
import pytest

from lensjax import parallel, train
from lensjax.data import pipeline

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _load_config(name: str, arg: str = "runlocal=True") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def load_config() -> Callable[..., ml_collections.ConfigDict]:
    """load_config("mae_classify", "runlocal=True,mode=linear_probe") -> ConfigDict."""
    return _load_config


def fixed_split_iterator(arrays: dict[str, np.ndarray]) -> Callable:
    """A stand-in for pipeline.heldout_iterator that serves `arrays` ((N, ...) per key,
    the same for every split) in whole batches of config.eval.batch_size, with "mask"
    and "index" as the real iterator gives them (padding: zeros, masked out)."""
    num = len(next(iter(arrays.values())))

    def heldout_iterator(config, mesh, split="heldout", limit=None):
        batch_size = config.eval.batch_size
        sharding = parallel.batch_sharding(mesh)
        for start in range(0, num, batch_size):
            index = np.arange(start, start + batch_size, dtype=np.int32)
            batch = {}
            for key, value in arrays.items():
                part = value[start:start + batch_size]
                pad = np.zeros((batch_size - len(part), *value.shape[1:]), value.dtype)
                batch[key] = np.concatenate([part, pad])
            batch["mask"] = index < num
            batch["index"] = index
            yield {k: parallel.global_array_from_host(v, sharding) for k, v in batch.items()}

    return heldout_iterator


@pytest.fixture(scope="session")
def pretrained_mae(tmp_path_factory) -> Path:
    """Workdir of configs/mae_pretrain.py (runlocal) after 2 real training steps on the
    simulated stream (model selection on 8 fixed images, to save a simulator compile)."""
    workdir = tmp_path_factory.mktemp("mae_pretrain")
    config = _load_config("mae_pretrain")
    config.data.selection_examples = 8
    config.eval.batch_size = 8
    config.train.checkpoint_every = 2
    selection = {"image": np.random.default_rng(0).uniform(size=(8, 64, 64, 1)).astype(np.float32),
                 "label": np.zeros(8, np.int32)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "heldout_iterator", fixed_split_iterator(selection))
        final = train.train_and_evaluate(config, workdir)
    assert final["step"] == 2
    return workdir


@pytest.fixture
def serve_split(monkeypatch) -> Callable[[dict], None]:
    """serve_split(arrays): pipeline.heldout_iterator serves these examples instead
    (see `fixed_split_iterator`) for the rest of the test."""
    def install(arrays: dict[str, np.ndarray]) -> None:
        monkeypatch.setattr(pipeline, "heldout_iterator", fixed_split_iterator(arrays))

    return install


def _trained_model(config: ml_collections.ConfigDict, task, params_update=None,
                   num_devices: int | None = None) -> train.TrainedModel:
    """The freshly initialised model of `config` as evaluators see it (sharded state);
    params_update(pure dict of parameters) -> pure dict may change it first."""
    from flax import nnx
    mesh = parallel.make_mesh(num_devices)
    graphdef, state, _ = train.init_state(config, task)
    if params_update is not None:
        pure = params_update(nnx.to_pure_dict(state["params"]))
        nnx.replace_by_pure_dict(state["params"], pure)
    shardings = train.state_shardings(state, mesh, None)
    return train.TrainedModel(graphdef, jax.device_put(state, shardings), task, mesh)


@pytest.fixture(scope="session")
def make_trained() -> Callable[..., train.TrainedModel]:
    """make_trained(config, task, params_update=None, num_devices=None) -> TrainedModel."""
    return _trained_model
