"""Test VI.B: super-resolution 75 x 75 -> 150 x 150 with the MAE encoder.

vit_superres (lensjax.models.superres): output = bicubic(LR) + a learned residual
from the ViT encoder (size `encoder`, as in configs/mae_pretrain.py; patch 8, so
the 75 px LR input is padded to 80, a 10 x 10 grid) and a convolutional
upsampling decoder. Pairs: the `superres` preset simulated on the fly, or the
official VI.B folder (deeplense_superres), both stored in [0, 1] and used as
stored (configlib.superres_data). The encoder starts from a pretraining run with
--config.model_init=WORKDIR (the decoder is new) or from random weights. The
report gives per-image PSNR, SSIM (data_range 1.0, single channel) and MSE at
150 x 150 on the held-out split beside bicubic upsampling of the same images,
and an LR / bicubic / lensjax / HR panel with residual maps.

    python -m lensjax.main --config configs/mae_pretrain.py --workdir runs/mae_pretrain --mode=train_eval
    python -m lensjax.main --config configs/mae_superres.py --workdir runs/mae_superres \
        --mode=train_eval --config.model_init=runs/mae_pretrain
    # the same budget from random weights:
    python -m lensjax.main --config configs/mae_superres.py --workdir runs/superres_scratch --mode=train_eval
    # init=WORKDIR: model_init plus a check of the pretraining run's encoder size:
    python -m lensjax.main --config configs/mae_superres.py:encoder=tiny,init=runs/mae_pretrain_tiny \
        --workdir runs/mae_superres_tiny --mode=train_eval
    # the official VI.B pairs (DIR holds Dataset/{HR,LR}/):
    python -m lensjax.main --config configs/mae_superres.py --workdir runs/mae_superres_official \
        --mode=train_eval --config.model_init=runs/mae_pretrain \
        --config.data.source=tfds --config.data.manual_dir=DIR
    # a 2-step smoke run:
    python -m lensjax.main --config configs/mae_superres.py:runlocal=True --workdir /tmp/sr --mode=train_eval
"""

from lensjax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, encoder="S", init="", steps=5000,
                              layer_decay=0.75)
    config = configlib.base_config()
    config.task = "superres"
    configlib.superres_data(config)
    config.data.heldout_examples = 1000
    config.data.selection_examples = 256
    encoder = configlib.mae_encoder("runlocal" if arg.runlocal else arg.encoder)
    config.model = dict(name="vit_superres", kwargs=dict(
        lr_size=75, scale=2, decoder_features=64, pad_mode="edge", **encoder))
    config.model_init = arg.init
    if arg.init:
        configlib.check_encoder_matches(arg.init, encoder)
    config.train.steps = arg.steps
    config.train.batch_size = 64
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 250
    config.train.weight_decay = 0.05
    config.train.layer_decay = arg.layer_decay
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.eval.batch_size = 64
    if arg.runlocal:
        configlib.apply_runlocal(config)
        config.model.kwargs.decoder_features = 8
    return config
