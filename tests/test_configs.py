"""Every configs/*.py loads with runlocal=True and trains 2 real steps."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lensjax import train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_trains_two_steps_with_runlocal(path, tmp_path):
    module = load(path)
    assert "python -m lensjax.main" in (module.__doc__ or ""), "docstring must give the command"
    config = module.get_config("runlocal=True")
    final = train.train_and_evaluate(config, tmp_path)
    assert final["step"] == 2
    assert np.isfinite(final["train_loss"])
    assert (tmp_path / "config.json").is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_rejects_unknown_arg(path):
    with pytest.raises(ValueError, match="unknown config arg"):
        load(path).get_config("runlocal=True,no_such_option=1")
