"""Evaluate a trained workdir: restore its best checkpoint, run the task's evaluators,
write report.json and figures next to it (shared/EVALUATION.md).

    python -m lensjax.evaluate --workdir runs/x [--outdir runs/x/report] [--checkpoint latest] \
        [--config.eval.<key>=<value> ...]
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
from pathlib import Path

import jax
import ml_collections

import lensjax
from lensjax import checkpointing, hugepages, parallel, tasks, train


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a lensjax workdir? "
                                "Train first with python -m lensjax.main --config ... --workdir ...")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def restore_workdir(workdir: str | Path, checkpoint: str = "best",
                    config: ml_collections.ConfigDict | None = None
                    ) -> tuple[ml_collections.ConfigDict, train.TrainedModel, dict]:
    """(config, trained model, checkpoint record) of a workdir's "best" or "latest"
    checkpoint, sharded over every device of every process (as training was)."""
    workdir = Path(workdir)
    config = load_config(workdir) if config is None else config
    task = tasks.get_task(config.task)
    mesh = parallel.make_mesh(config.get("num_devices") or None)
    graphdef, abstract_state, _ = train.init_state(config, task, abstract=True)
    shardings = train.state_shardings(abstract_state, mesh,
                                      config.mesh.get("fsdp_min_size") or None)
    target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                   sharding=sharding),
                          abstract_state, shardings)
    manager, step = checkpointing.find_checkpoint(workdir, prefer_best=checkpoint == "best")
    state = checkpointing.restore(manager, target, step)
    record = {"kind": checkpoint, "step": int(step), "path": str(manager.directory)}
    return config, train.TrainedModel(graphdef, state, task, mesh), record


def evaluate_workdir(workdir: str | Path, outdir: str | Path | None = None,
                     checkpoint: str = "best",
                     config: ml_collections.ConfigDict | None = None) -> dict:
    """Restore `checkpoint` ("best" or "latest") of a workdir and write its report.

    Returns the report dict, also written to outdir/report.json (default: workdir/report).
    """
    workdir = Path(workdir)
    outdir = Path(outdir) if outdir is not None else workdir / "report"
    config, trained, record = restore_workdir(workdir, checkpoint, config)
    result = trained.task.evaluate(config, trained, trained.mesh, outdir)
    report = {
        "task": config.task,
        "model": config.model.name,
        "checkpoint": record,
        "config_hash": config_hash(config),
        "lensjax_version": lensjax.__version__,
        **result,
    }
    if jax.process_index() == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["report_path"] = str(outdir / "report.json")
    return report


def _parse_like(text: str, current):
    """`text` as a value of the type of `current` (bool, int, float, str, tuple/list)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected True or False, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)):
        return type(current)(text)
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:  # an unset option: take the text as it is (e.g. a path)
            return text
        raise
    return tuple(value) if isinstance(current, tuple) else value


def config_with_overrides(workdir: str | Path, overrides: list[str]) -> ml_collections.ConfigDict:
    """The workdir's config.json with `--config.<key>=<value>` overrides applied (the
    syntax of lensjax.main), e.g. --config.eval.inception_weights=/data/pt_inception.pth."""
    config = load_config(workdir)
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise SystemExit(f"bad override {item!r}: overrides look like "
                             "--config.eval.batch_size=64")
        key, text = item[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        try:
            for part in parents:
                node = node[part]
            current = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise SystemExit(f"bad override {item!r}: {key} is not a key of the config in "
                             f"{workdir}/config.json") from None
        try:
            node[leaf] = _parse_like(text, current)
        except (ValueError, SyntaxError) as err:
            raise SystemExit(f"bad override {item!r}: {err}") from None
    return config


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        description="Evaluate a lensjax workdir. Any --config.<key>=<value> after the options "
                    "overrides the workdir's config.json (e.g. --config.eval.num_samples=10000).")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--outdir", default=None, help="default: WORKDIR/report")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = config_with_overrides(args.workdir, overrides)
    report = evaluate_workdir(args.workdir, args.outdir, args.checkpoint, config=config)
    print(json.dumps({k: report[k] for k in ("checkpoint", "data")}, indent=2))
    print(f"{report['task']}, checkpoint step {report['checkpoint']['step']}: {report['headline']}")
    print(f"report: {report['report_path']}")
    return 0


if __name__ == "__main__":
    hugepages.restart_with_hugepages()
    sys.exit(main())
