"""Substructure classification (Common Test I, VI.A fine-tuning, Models I-III).

Softmax cross-entropy on class labels; evaluation by softmax probabilities:
per-class one-vs-rest ROC-AUC, macro and micro AUC, accuracy, confusion matrix
(shared/EVALUATION.md). Model selection uses the "selection" set, never the
reported held-out set.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lensjax import models, parallel
from lensjax.data import pipeline

AUX_METRICS = ("accuracy",)
SELECTION_METRIC = ("macro_auc", "max")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    num_classes = len(pipeline.class_names(config))
    return models.get_model(config.model.name, num_classes=num_classes, rngs=rngs,
                            **dict(config.model.get("kwargs", {}) or {}))


def loss_fn(model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Mean softmax cross-entropy (with optional label smoothing via batch config-free default)."""
    logits = model(batch["image"]).astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return loss, {"accuracy": accuracy}


def predict(model: nnx.Module, batch: dict) -> dict:
    """Softmax probabilities (B, C) in float32."""
    logits = model(batch["image"]).astype(jnp.float32)
    return {"probs": jax.nn.softmax(logits, axis=-1)}


def collect(config, trained, mesh, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C) and labels (N,) of every valid example of a split."""
    probs, labels = [], []
    for batch in pipeline.heldout_iterator(config, mesh, split):
        out = trained.predict(batch)
        mask = parallel.to_host(batch["mask"])
        probs.append(parallel.to_host(out["probs"])[mask])
        labels.append(parallel.to_host(batch["label"])[mask])
    return np.concatenate(probs), np.concatenate(labels)


def selection_metrics(config, trained, mesh) -> dict:
    """Macro AUC and accuracy on the model-selection set."""
    from lensjax.metrics import roc
    probs, labels = collect(config, trained, mesh, "selection")
    report = roc.classification_report(probs, labels, pipeline.class_names(config))
    return {"macro_auc": float(report["auc_macro"]), "accuracy": float(report["accuracy"])}


def evaluate(config, trained, mesh, outdir: str | Path) -> dict:
    """Metrics on the held-out set and figures roc.png, confusion.png in `outdir`."""
    from lensjax import plots
    from lensjax.metrics import roc
    outdir = Path(outdir)
    names = list(pipeline.class_names(config))
    probs, labels = collect(config, trained, mesh, "heldout")
    report = roc.classification_report(probs, labels, names)
    data = pipeline.describe(config, "heldout")
    source = config.data.preset if config.data.source == "sim" else config.data.tfds_name
    title = f"{config.model.name} on {source} ({config.data.source})"
    figures = {}
    if jax.process_index() == 0:
        figures["roc"] = str(plots.plot_roc(probs, labels, names, outdir / "roc.png",
                                            title=f"ROC, held-out set: {title}"))
        figures["confusion"] = str(plots.plot_confusion(
            np.asarray(report["confusion_matrix"]), names, outdir / "confusion.png",
            title=f"Confusion matrix ({len(labels)} held-out images)"))
    headline = (f"macro ROC-AUC {report['auc_macro']:.4f}, micro {report['auc_micro']:.4f}, "
                f"accuracy {report['accuracy']:.4f} on {len(labels)} held-out images "
                f"({data['split']})")
    return {"metrics": _jsonable(report), "data": data, "figures": figures, "headline": headline}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
