"""lensjax entry point.

    python -m lensjax.main --config configs/common_resnet18.py --workdir runs/x
    python -m lensjax.main --config configs/common_resnet18.py:runlocal=True --workdir runs/x \
        --config.train.steps=100
    python -m lensjax.main --config ... --workdir runs/x --mode=eval [--config.eval.<key>=...]

With --mode=eval the model and data are those of the workdir's config.json; only the
`eval` section is taken from this command line.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from lensjax import hugepages, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (':arg' allowed).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, config.json and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_eval"],
                  "train; eval (report of the best checkpoint); train_eval (both).")
flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (default: auto-detect "
                  "SLURM / JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax() -> None:
    """orbax logs every manager and save at INFO; keep its warnings, drop the rest."""
    handler = logging.get_absl_handler()
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or
                      "orbax" not in record.pathname)


def main(argv):
    del argv
    _quiet_orbax()
    parallel.initialize_distributed(FLAGS.multihost)
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    from lensjax import evaluate, train
    config = FLAGS.config
    logging.info("config:\n%s", config)
    if FLAGS.mode in ("train", "train_eval"):
        final = train.train_and_evaluate(config, FLAGS.workdir)
        logging.info("final training metrics: %s", json.dumps(final))
    if FLAGS.mode in ("eval", "train_eval"):
        # The workdir's config.json describes the trained model; the eval section
        # (sample counts, weights files, ...) comes from this command line.
        trained_config = evaluate.load_config(FLAGS.workdir)
        trained_config.eval = config.eval
        report = evaluate.evaluate_workdir(FLAGS.workdir, config=trained_config)
        print(f"{config.task}, checkpoint step {report['checkpoint']['step']}: {report['headline']}")
        print(f"report: {report['report_path']}")


if __name__ == "__main__":
    hugepages.restart_with_hugepages()
    app.run(main)
