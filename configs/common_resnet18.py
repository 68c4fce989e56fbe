"""Common Test I: ResNet-18 on simulated no / sphere / vort lenses (150 x 150).

    python -m lensjax.main --config configs/common_resnet18.py --workdir runs/common_resnet18
    python -m lensjax.main --config configs/common_resnet18.py:runlocal=True --workdir /tmp/x
    # the official data (manual download into DIR = the folder holding dataset/):
    python -m lensjax.main --config configs/common_resnet18.py --workdir runs/ct_official \
        --config.data.source=tfds --config.data.manual_dir=DIR
"""

from lensjax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, width=64)
    config = configlib.base_config()
    config.task = "classification"
    config.data.preset = "common_test"
    config.data.tfds_name = "deeplense_common_test"
    config.model = dict(name="resnet18", kwargs=dict(width=arg.width, image_size=150, stem="auto"))
    config.train.steps = 20_000
    config.train.batch_size = 128
    if arg.runlocal:
        configlib.apply_runlocal(config)
        config.model.kwargs.width = 8
    return config
