"""The `make demo` classifier: ResNet-18 (width 16, ImageNet stem) on simulated Model II
lenses, 64 x 64 pixels, classes no_sub / cdm / axion, trained for 3,000 steps of 64
images generated on the fly, evaluated on 3,000 held-out simulated images. Sized for
a 2-core CPU. The ImageNet stem (7x7 stride 2 + max pool) makes the network 7x
cheaper than the stride-1 stem at 64 px, and still reaches a held-out macro AUC
above 0.99 (README, "Results").

    python -m lensjax.main --config configs/demo_classifier.py --workdir runs/demo --mode=train_eval
"""

from lensjax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, steps=3000)
    config = configlib.base_config()
    config.task = "classification"
    config.data.preset = "model_ii"
    config.data.heldout_examples = 3000
    config.data.selection_examples = 512
    config.model = dict(name="resnet18", kwargs=dict(width=16, image_size=64, stem="imagenet"))
    config.train.steps = arg.steps
    config.train.batch_size = 64
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 100
    config.train.weight_decay = 1e-4
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    config.eval.batch_size = 200
    if arg.runlocal:
        configlib.apply_runlocal(config)
        config.model.kwargs.width = 8
    return config
