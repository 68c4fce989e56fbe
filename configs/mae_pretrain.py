"""Test VI.A: masked-autoencoder pretraining (the lensjax foundation model).

A ViT encoder (size `encoder`, from lensjax.configlib.MAE_ENCODERS; ViT-S/8 by
default) and a light decoder learn to reconstruct 75% of the 8 x 8 px patches of
64 x 64 no_sub lenses from the other 25%. Images: the `foundation` preset
simulated on the fly, or the official VI.A folder (deeplense_foundation, no_sub
class only), min-max normalised by configlib.FOUNDATION_NORMALIZATION, the one
setting that the fine-tuning configs (mae_classify.py, mae_superres.py) share.
The report gives the masked-patch MSE on held-out images (masks fixed per
image) beside a mean-fill baseline, and reconstruction panels.

    python -m lensjax.main --config configs/mae_pretrain.py --workdir runs/mae_pretrain --mode=train_eval
    # the official VI.A data (DIR holds Dataset/{no_sub,cdm,axion}/):
    python -m lensjax.main --config configs/mae_pretrain.py --workdir runs/mae_pretrain_official \
        --mode=train_eval --config.data.source=tfds --config.data.manual_dir=DIR
    # a CPU-sized encoder (then fine-tune with the same encoder=tiny):
    python -m lensjax.main --config configs/mae_pretrain.py:encoder=tiny,steps=3000 \
        --workdir runs/mae_pretrain_tiny --mode=train_eval
    # a 2-step smoke run:
    python -m lensjax.main --config configs/mae_pretrain.py:runlocal=True --workdir /tmp/mae --mode=train_eval
"""

from lensjax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, encoder="S", steps=50_000)
    config = configlib.base_config()
    config.task = "mae"
    configlib.foundation_data(config, label="no_sub")
    config.data.heldout_examples = 2000
    config.data.selection_examples = 512
    encoder = configlib.mae_encoder("runlocal" if arg.runlocal else arg.encoder)
    config.model = dict(name="mae", kwargs=dict(
        image_size=64, mask_ratio=0.75, norm_pix_loss=False, decoder_width=128, decoder_depth=2,
        decoder_heads=4, **encoder))
    config.train.steps = arg.steps
    config.train.batch_size = 256
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 2000
    config.train.weight_decay = 0.05
    config.train.log_every = 100
    config.train.eval_every = 2500
    config.train.checkpoint_every = 2500
    config.eval.batch_size = 256
    if arg.runlocal:
        configlib.apply_runlocal(config)
        config.model.kwargs.update(decoder_width=16, decoder_depth=1, decoder_heads=2)
    return config
