"""Tasks: one module per task, each a small protocol used by `lensjax.train`.

A task module exposes:
  create_model(config, rngs) -> nnx.Module
  loss_fn(model, batch, rng) -> (loss, aux dict of scalars)
  predict(model, batch) -> dict of per-example arrays (eval mode)
  selection_metrics(config, trained, mesh) -> dict of floats (model selection, never the report set)
  evaluate(config, trained, mesh, outdir) -> report dict {"metrics", "data", "figures",
      "headline"} (writes figures; only process 0 writes files)
where `trained` is a `lensjax.train.TrainedModel`: `trained.predict(batch)` runs the
task's jitted `predict`, `trained.jit(fn)` jits fn(model, *args) for other work.
  AUX_METRICS: names in aux averaged into the training metrics
  SELECTION_METRIC: (name, "max" | "min") that picks the best checkpoint
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("classification", "diffusion", "mae", "superres")


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"lensjax.tasks.{name}")
