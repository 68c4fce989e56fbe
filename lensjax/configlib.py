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


# ----------------------------------------------------------------------------
# Test VI: the MAE foundation model and the configs that fine-tune it
# ----------------------------------------------------------------------------

# How VI.A images are scaled, in pretraining and in every config that fine-tunes the
# pretrained encoder (lensjax.train refuses a warm start whose normalisation differs).
# The foundation images are raw (e-/s, orders of magnitude apart between images);
# min-max brings each to [0, 1], the scale of the VI.B super-resolution pairs.
FOUNDATION_NORMALIZATION = "minmax"

# Encoder sizes shared by pretraining and fine-tuning (a warm start copies parameters
# by path and shape, so both sides must name the same size). Patch 8 divides the
# 64 px VI.A images (an 8 x 8 grid); the 75 px super-resolution input is padded to 80.
MAE_ENCODERS: dict[str, dict] = {
    "S": dict(variant="S", patch_size=8),                                   # ViT-S/8, GPU
    "small": dict(variant="S", width=192, depth=6, num_heads=3, patch_size=8),
    "tiny": dict(variant="S", width=64, depth=2, num_heads=2, patch_size=8),  # CPU studies
    "runlocal": dict(variant="S", width=32, depth=1, num_heads=2, patch_size=8),  # tests
}
# Model kwargs that fix the shapes of the encoder's parameters.
ENCODER_KEYS = ("variant", "patch_size", "width", "depth", "num_heads", "mlp_dim", "in_channels")


def mae_encoder(name: str) -> dict:
    """Encoder kwargs (variant, patch_size, width, ...) of a named size in `MAE_ENCODERS`."""
    if name not in MAE_ENCODERS:
        raise ValueError(f"unknown encoder size {name!r}; valid: {', '.join(MAE_ENCODERS)}")
    return dict(MAE_ENCODERS[name])


def foundation_data(config: ml_collections.ConfigDict, label: str = "") -> None:
    """Point config.data at the VI.A data: the `foundation` preset (64 px, no_sub / cdm /
    axion, simulated on the fly) or, with --config.data.source=tfds, the official folder
    (deeplense_foundation); normalised with `FOUNDATION_NORMALIZATION`. label: keep one
    class only (pretraining uses "no_sub")."""
    config.data.source = "sim"
    config.data.preset = "foundation"
    config.data.tfds_name = "deeplense_foundation"
    config.data.normalization = FOUNDATION_NORMALIZATION
    config.data.label = label


def superres_data(config: ml_collections.ConfigDict) -> None:
    """Point config.data at the VI.B pairs: the `superres` preset (LR 75 px, HR 150 px,
    simulated on the fly) or, with --config.data.source=tfds, the official folder
    (deeplense_superres). Both are stored in [0, 1] with LR = 2 x 2 mean pool of HR,
    so no transform is applied: a per-image rescaling of LR alone would break the
    pair (and the bicubic baseline). `stored_normalization` records that the stored
    images are already min-max scaled, i.e. on the scale of `FOUNDATION_NORMALIZATION`
    (see `lensjax.data.transforms.effective_normalization`).
    """
    config.data.source = "sim"
    config.data.preset = "superres"
    config.data.tfds_name = "deeplense_superres"
    config.data.normalization = "none"
    config.data.stored_normalization = "minmax"
    config.data.label = ""


def check_encoder_matches(init_workdir: str, encoder: dict) -> None:
    """Raise ValueError unless the model of `init_workdir` (its config.json) has an encoder
    of exactly the size `encoder` describes; a warm start would otherwise copy only
    the arrays whose shapes happen to agree (e.g. the first blocks of a deeper model)."""
    import json
    from pathlib import Path

    from lensjax.models.vit import resolve_size

    path = Path(init_workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"init={init_workdir}: {path} not found; pretrain first "
                                "(configs/mae_pretrain.py) or point init at its workdir")
    theirs = json.loads(path.read_text()).get("model", {}).get("kwargs", {})

    def size(kwargs: dict):
        picked = {k: kwargs[k] for k in ENCODER_KEYS if k in kwargs and k != "in_channels"}
        return resolve_size(**picked), int(kwargs.get("in_channels", 1))

    if size(theirs) != size(encoder):
        raise ValueError(f"init={init_workdir} has encoder {size(theirs)} but this config builds "
                         f"{size(encoder)}; pass the pretraining run's encoder=... size")
