"""Test VI.A: no_sub / cdm / axion classification with the MAE encoder.

A ViT classifier (mean-pooled encoder tokens -> linear head) on 64 x 64 lenses of
the `foundation` preset (or the official VI.A folder), with exactly the encoder
size and normalisation of configs/mae_pretrain.py (both come from
lensjax.configlib). mode=finetune trains everything with layer-wise learning-rate
decay (config.train.layer_decay); mode=linear_probe freezes the encoder
(config.train.frozen = "^encoder/") and trains the head only. The encoder starts
from a pretraining run with --config.model_init=WORKDIR (every `encoder/...`
array is copied; the head is new; a different data.normalization is refused), or
from random weights when model_init is empty. The report is that of the
classification task: per-class and macro/micro ROC-AUC, accuracy, ROC curves and
confusion matrix on held-out images.

    python -m lensjax.main --config configs/mae_pretrain.py --workdir runs/mae_pretrain --mode=train_eval
    python -m lensjax.main --config configs/mae_classify.py --workdir runs/mae_finetune \
        --mode=train_eval --config.model_init=runs/mae_pretrain
    python -m lensjax.main --config configs/mae_classify.py:mode=linear_probe --workdir runs/mae_linear_probe \
        --mode=train_eval --config.model_init=runs/mae_pretrain
    # the same budget from random weights (the baseline of the pretraining gain):
    python -m lensjax.main --config configs/mae_classify.py --workdir runs/vit_scratch --mode=train_eval
    # init=WORKDIR sets model_init and also checks, when the config is built, that the
    # pretraining run's encoder has this size (pass its encoder=..., e.g. encoder=tiny):
    python -m lensjax.main --config configs/mae_classify.py:encoder=tiny,init=runs/mae_pretrain_tiny \
        --workdir runs/mae_finetune_tiny --mode=train_eval
    # the official VI.A data: add --config.data.source=tfds --config.data.manual_dir=DIR
    # a 2-step smoke run:
    python -m lensjax.main --config configs/mae_classify.py:runlocal=True --workdir /tmp/cls --mode=train_eval
"""

from lensjax import configlib

MODES = ("finetune", "linear_probe")


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, encoder="S", mode="finetune", init="",
                              steps=5000, layer_decay=0.75)
    if arg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {arg.mode!r}")
    config = configlib.base_config()
    config.task = "classification"
    configlib.foundation_data(config)
    config.data.heldout_examples = 3000
    config.data.selection_examples = 600
    encoder = configlib.mae_encoder("runlocal" if arg.runlocal else arg.encoder)
    config.model = dict(name="vit", kwargs=dict(image_size=64, pool="mean", **encoder))
    config.model_init = arg.init
    if arg.init:
        configlib.check_encoder_matches(arg.init, encoder)
    config.train.steps = arg.steps
    config.train.batch_size = 256
    config.train.warmup_steps = 250
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.eval.batch_size = 200
    if arg.mode == "finetune":
        config.train.learning_rate = 1e-3
        config.train.layer_decay = arg.layer_decay
        config.train.weight_decay = 0.05
    else:
        # Only the head trains: a convex problem on fixed features, so a larger step
        # and no weight decay (as in MAE's linear probing).
        config.train.frozen = "^encoder/"
        config.train.learning_rate = 1e-2
        config.train.weight_decay = 0.0
    if arg.runlocal:
        configlib.apply_runlocal(config)
    return config
