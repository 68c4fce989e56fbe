"""Per-example evaluation shared by the tasks that score images one by one (mae, superres):
gather a task's `predict` outputs over a split, and summarise them over images."""

from __future__ import annotations

import numpy as np

from lensjax import parallel
from lensjax.data import pipeline


def collect(config, trained, mesh, split: str) -> dict[str, np.ndarray]:
    """Every output of `trained.predict` and the example "index", each (N,) on the host,
    over the N valid examples of `split` ("selection" or "heldout"); padding dropped."""
    parts: dict[str, list] = {}
    for batch in pipeline.heldout_iterator(config, mesh, split):
        out = dict(trained.predict(batch), index=batch["index"])
        valid = parallel.to_host(batch["mask"])
        for name, value in out.items():
            parts.setdefault(name, []).append(parallel.to_host(value)[valid])
    return {name: np.concatenate(values) for name, values in parts.items()}


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (ddof 1) and standard error of the mean of (N,) values."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no values to summarise (empty split?)")
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": spread,
            "sem": spread / float(np.sqrt(values.size))}
