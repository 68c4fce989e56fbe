"""Specific Test IV: a DDPM UNet (eps prediction, cosine schedule, T = 1000, min-SNR
weighting) on 150 x 150 lensing images in [0, 1], with EMA parameters (decay 0.9999)
used for selection, evaluation and sampling. Trains on the `diffusion` preset,
simulated on the fly (held-out and selection images come from disjoint streams), or
on the official `Samples/` folder through TFDS (deeplense_diffusion: a seeded 50%
of the files is held out, so FID has 5,000 real images never trained on).

    # train, then evaluate the best checkpoint (5,000 DDIM samples vs 5,000 held-out images)
    python -m lensjax.main --config configs/ddpm_unet.py --workdir runs/ddpm --mode=train_eval
    # the official data (DIR holds Samples/sample<i>.npy)
    python -m lensjax.main --config configs/ddpm_unet.py --workdir runs/ddpm_official \
        --config.data.source=tfds --config.data.manual_dir=DIR --mode=train_eval
    # with FID and FLD: a local weights file and a lensjax classifier workdir (recorded in
    # the workdir's config.json, so a later --mode=eval computes them too)
    python -m lensjax.main --config configs/ddpm_unet.py --workdir runs/ddpm --mode=train_eval \
        --config.eval.inception_weights=/data/pt_inception-2015-12-05-6726825d.pth \
        --config.eval.fld_workdir=runs/common_resnet18
    # evaluate again (the best checkpoint, the settings in runs/ddpm/config.json), or add
    # FID/FLD to a finished run:
    python -m lensjax.evaluate --workdir runs/ddpm
    python -m lensjax.evaluate --workdir runs/ddpm \
        --config.eval.inception_weights=/data/pt_inception-2015-12-05-6726825d.pth
    # 10,000 samples in the official layout (OUT/Samples/sample<i>.npy) plus a grid
    python -m lensjax.sample --workdir runs/ddpm --num 10000 --sampler ddim --steps 100 \
        --eta 0 --out runs/ddpm/samples
    # CPU smoke run
    python -m lensjax.main --config configs/ddpm_unet.py:runlocal=True --workdir /tmp/ddpm \
        --mode=train_eval

Evaluation reads the workdir's config.json; `--config.eval.<key>=<value>` overrides it.
EMA 0.9999 averages over ~10,000 steps: for runs much shorter than 100,000 steps
lower it (`ema=0.999`).
"""

from lensjax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, steps=100_000, base_width=64, ema=0.9999)
    config = configlib.base_config()
    config.task = "diffusion"
    config.data.preset = "diffusion"
    config.data.tfds_name = "deeplense_diffusion"
    config.data.normalization = "none"   # the images are stored in [0, 1]
    config.data.augment = True           # lensing images have no preferred orientation
    config.data.heldout_examples = 5000
    config.data.selection_examples = 512

    # Feature maps 152, 76, 38, 19 (150 is padded to 152): attention at 19 x 19 only.
    config.model = dict(name="unet", kwargs=dict(
        base_width=arg.base_width, channel_mults=(1, 2, 2, 4), num_res_blocks=2,
        attention_resolutions=(19,), num_heads=4, mid_attention=True, dropout=0.1))
    config.diffusion = dict(schedule="cosine", num_steps=1000, parameterization="eps",
                            weighting="min_snr", min_snr_gamma=5.0, heldout_timesteps=8)

    config.train.steps = arg.steps
    config.train.batch_size = 64
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 1000
    config.train.final_lr_fraction = 1.0   # constant after warmup, as in DDPM
    config.train.weight_decay = 0.0
    config.train.grad_clip_norm = 1.0
    config.train.ema_decay = arg.ema
    config.train.log_every = 100
    config.train.eval_every = 5000
    config.train.checkpoint_every = 5000

    config.sample = dict(sampler="ddim", steps=100, eta=0.0, seed=0, batch_size=256)
    config.eval.batch_size = 32            # held-out loss: 8 timesteps per image
    config.eval.num_samples = 5000
    config.eval.inception_weights = ""     # local pt_inception-2015-12-05-6726825d.pth
    config.eval.fid_batch_size = 50
    config.eval.fld_workdir = ""           # a lensjax classifier workdir (FLD features)
    config.eval.fld_checkpoint = "best"

    if arg.runlocal:
        configlib.apply_runlocal(config)
        # One resolution level: a smoke test of the loop, compiled in a third of the time
        # of two levels; 150 x 150 images are costly on a CPU: one per fake device.
        config.model.kwargs.update(base_width=8, channel_mults=(1,), num_res_blocks=1,
                                   attention_resolutions=(), mid_attention=False, num_groups=4)
        config.train.batch_size = config.eval.batch_size = 8
        config.data.selection_examples, config.data.heldout_examples = 8, 16
        config.diffusion.heldout_timesteps = 2
        config.sample.update(steps=4, batch_size=8)
        config.eval.num_samples = 8
    return config
