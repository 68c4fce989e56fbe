"""Matplotlib figures for reports: ROC curves, confusion matrices, training curves.

Figures are built as `matplotlib.figure.Figure` objects and rendered with the
Agg canvas, never through pyplot's global state, so plotting is safe in
threads, on headless machines and beside a running training loop. Every
function writes one file (format from the suffix, PNG by default), creates the
parent directories and returns the path written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lensjax.metrics import roc

PathLike = str | os.PathLike


def _save(fig: Figure, path: PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_roc(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: PathLike,
             title: str = "ROC") -> str:
    """One-vs-rest ROC per class plus micro and macro averages, AUCs in the legend.

    probs (N, C) softmax probabilities, labels (N,) integer classes. The macro
    curve averages the per-class TPRs on a common FPR grid; its legend value is
    the macro AUC of the report (mean of per-class AUCs). Returns `path`.
    """
    report = roc.classification_report(probs, labels, class_names)
    probs = roc.check_probabilities(probs, len(class_names))
    labels = np.asarray(labels).astype(np.int64)
    one_hot = labels[:, None] == np.arange(len(class_names))[None, :]

    fig = Figure(figsize=(6.0, 5.5))
    ax = fig.add_subplot()
    fpr_grid = np.linspace(0.0, 1.0, 501)
    tpr_sum = np.zeros_like(fpr_grid)
    for c, name in enumerate(report["class_names"]):
        fpr, tpr, _ = roc.roc_curve(probs[:, c], one_hot[:, c], drop_intermediate=False)
        tpr_sum += np.interp(fpr_grid, fpr, tpr)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC = {report['auc_per_class'][name]:.4f})")
    fpr, tpr, _ = roc.roc_curve(probs.ravel(), one_hot.ravel(), drop_intermediate=False)
    ax.plot(fpr, tpr, lw=2.0, ls="--", color="black",
            label=f"micro-average (AUC = {report['auc_micro']:.4f})")
    ax.plot(fpr_grid, tpr_sum / len(class_names), lw=2.0, ls=":", color="tab:gray",
            label=f"macro-average (AUC = {report['auc_macro']:.4f})")
    ax.plot([0, 1], [0, 1], lw=1.0, color="lightgray", label="chance (AUC = 0.5)")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title} (N = {report['num_samples']} samples)")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: PathLike,
                   title: str = "Confusion matrix") -> str:
    """Confusion matrix (C, C), rows = true class, columns = predicted, counts annotated."""
    confusion = np.asarray(confusion)
    num_classes = len(class_names)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(f"confusion must be ({num_classes}, {num_classes}) for classes "
                         f"{list(class_names)}, got {confusion.shape}")
    fig = Figure(figsize=(1.2 * num_classes + 2.5, 1.2 * num_classes + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="number of images")
    threshold = confusion.max() / 2.0 if confusion.size else 0.0
    for i in range(num_classes):
        for j in range(num_classes):
            value = confusion[i, j]
            text = f"{value:d}" if np.issubdtype(confusion.dtype, np.integer) else f"{value:.3g}"
            ax.text(j, i, text, ha="center", va="center",
                    color="white" if value > threshold else "black")
    ax.set_xticks(range(num_classes), labels=list(class_names))
    ax.set_yticks(range(num_classes), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} (N = {int(confusion.sum())} samples)"
                 if np.issubdtype(confusion.dtype, np.integer) else title)
    return _save(fig, path)


def plot_curves(history: Mapping[str, Sequence[tuple[float, float]]], path: PathLike,
                title: str = "Training curves") -> str:
    """One panel per metric: history {metric name: [(step, value), ...]} against training step."""
    names = [name for name, points in history.items() if len(points)]
    if not names:
        raise ValueError("history has no points to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        points = np.asarray(history[name], dtype=np.float64).reshape(-1, 2)
        ax.plot(points[:, 0], points[:, 1], marker="." if len(points) < 50 else None, lw=1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)
