"""Shared pieces of `configs/*.py`: the `arg` parser and the training defaults."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'runlocal=True,variant=S/8' -> ConfigDict, values typed like `defaults`."""
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config arg item {item!r} is not key=value (in {arg!r})")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid: {', '.join(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key} must be True or False, got {value!r}")
            parsed[key] = value.lower() in ("true", "1")
        else:
            parsed[key] = type(default)(value)
    return parsed


def base_config(seed: int = 0) -> ml_collections.ConfigDict:
    """Defaults every experiment shares; experiment files override what differs."""
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.num_devices = 0  # 0: every device
    config.resume = ""      # another workdir to continue from
    config.model_init = ""  # another workdir to warm-start parameters from

    config.data = ml_collections.ConfigDict()
    config.data.source = "sim"
    config.data.preset = "common_test"
    config.data.preset_overrides = ml_collections.ConfigDict()
    config.data.label = ""            # force one class, e.g. "no_sub" (MAE pretraining)
    config.data.normalization = "none"  # none | minmax | standardize (data/transforms.py)
    config.data.augment = True          # random dihedral transform of training images
    config.data.params_keys = ()        # simulator latent parameters to add to batches
    config.data.heldout_examples = 5000
    config.data.selection_examples = 1000
    config.data.tfds_name = "deeplense_common_test"
    config.data.manual_dir = ""
    config.data.split_seed = 0
    config.data.data_dir = ""
    config.data.shuffle_buffer = 10_000

    config.train = ml_collections.ConfigDict()
    config.train.steps = 10_000
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 500
    config.train.final_lr_fraction = 0.0
    config.train.weight_decay = 0.05
    config.train.grad_clip_norm = 1.0
    config.train.ema_decay = 0.0
    config.train.frozen = ""            # regex on parameter paths kept fixed (linear probe)
    config.train.layer_decay = 0.0      # layer-wise LR decay (needs model.layer_ids); 0: off
    config.train.log_every = 100
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256

    config.mesh = ml_collections.ConfigDict()
    config.mesh.fsdp_min_size = 0  # 0: replicate every parameter
    return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrink a config so it trains a few steps on a 2-core CPU (tests use this)."""
    config.train.steps = 2
    config.train.batch_size = 16
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 1
    config.eval.batch_size = 16
    config.data.heldout_examples = 32
    config.data.selection_examples = 16
