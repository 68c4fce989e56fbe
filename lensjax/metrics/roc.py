"""ROC curves, ROC-AUC and the classification report, in plain numpy.

Conventions follow scikit-learn (the reference the tests compare against):
tied scores form one threshold (one diagonal step of the ROC curve), the curve
starts at (0, 0) with threshold +inf, AUC is the trapezoid area, which equals the
Mann-Whitney statistic with ties counted as 1/2. Multiclass AUC is one-vs-rest:
macro = mean of the per-class AUCs (`roc_auc_score(..., multi_class="ovr")`),
micro = one AUC over the flattened one-hot labels and probabilities
(`roc_auc_score(one_hot, probs, average="micro")`).

AUCs and curves are computed from softmax *probabilities*: `classification_report`
refuses logits, because "micro AUC" on raw logits mixes scores that are not on a
common scale (a known mistake in public DeepLense code; see EVALUATION.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Rows of a probability matrix must sum to 1 within this (float32/bfloat16
# softmax round-off stays far below it; logits essentially never satisfy it).
PROB_SUM_ATOL = 1e-3
PROB_RANGE_ATOL = 1e-6


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of `logits` along `axis` (float64 numpy)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _check_binary_inputs(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives)
    if scores.ndim != 1 or positives.ndim != 1 or scores.shape != positives.shape:
        raise ValueError(f"scores and positives must be 1-D of equal length, got shapes "
                         f"{scores.shape} and {positives.shape}")
    if positives.dtype != bool:
        if not np.all((positives == 0) | (positives == 1)):
            raise ValueError("positives must be boolean (or 0/1)")
        positives = positives.astype(bool)
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    num_pos = int(positives.sum())
    if num_pos == 0 or num_pos == positives.size:
        raise ValueError(f"ROC is undefined with only one class present "
                         f"({num_pos} positives among {positives.size} samples)")
    return scores, positives


def roc_curve(scores: np.ndarray, positives: np.ndarray, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of scores (N,) against boolean positives (N,) -> (fpr, tpr, thresholds), each (K,).

    thresholds decrease from +inf (the (0, 0) point); sample i counts as predicted
    positive at threshold t when scores[i] >= t, so tied scores enter together.
    `drop_intermediate` removes points lying inside straight runs of the curve,
    as sklearn.metrics.roc_curve does by default (the area is unchanged).
    """
    scores, positives = _check_binary_inputs(scores, positives)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_pos = positives[order]
    # Last index of each run of equal scores: one ROC point per distinct threshold.
    run_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    true_pos = np.cumsum(sorted_pos, dtype=np.int64)[run_ends]
    false_pos = (run_ends + 1) - true_pos
    thresholds = sorted_scores[run_ends]
    if drop_intermediate and run_ends.size > 2:
        # A point is redundant when both counts change by the same step before
        # and after it (it sits on a straight segment between its neighbours).
        interior_kink = (np.diff(false_pos, 2) != 0) | (np.diff(true_pos, 2) != 0)
        keep = np.concatenate([[True], interior_kink, [True]])
        true_pos, false_pos, thresholds = true_pos[keep], false_pos[keep], thresholds[keep]
    true_pos = np.concatenate([[0], true_pos])
    false_pos = np.concatenate([[0], false_pos])
    thresholds = np.concatenate([[np.inf], thresholds])
    return false_pos / false_pos[-1], true_pos / true_pos[-1], thresholds


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values (N,), ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Rank of a group of equal values = (first rank + last rank) / 2.
    last_rank = np.cumsum(counts)
    mean_rank = last_rank - (counts - 1) / 2.0
    return mean_rank[inverse]


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC of scores (N,) vs boolean positives (N,); ties count 1/2.

    Raises ValueError when only one class is present.
    """
    scores, positives = _check_binary_inputs(scores, positives)
    num_pos = int(positives.sum())
    num_neg = positives.size - num_pos
    # Mann-Whitney U from average ranks == trapezoid area of the tie-aware ROC.
    rank_sum = float(np.sum(_average_ranks(scores)[positives]))
    u_stat = rank_sum - num_pos * (num_pos + 1) / 2.0
    return u_stat / (num_pos * num_neg)


def check_probabilities(probs: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Validate probs (N, C) as softmax probabilities; returns them as float64."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {num_classes} classes")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinite values")
    row_sums = probs.sum(axis=1)
    if (probs.min(initial=0.0) < -PROB_RANGE_ATOL or probs.max(initial=0.0) > 1 + PROB_RANGE_ATOL
            or not np.allclose(row_sums, 1.0, rtol=0.0, atol=PROB_SUM_ATOL)):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(
            "probs are not probabilities (entries in [0, 1], rows summing to 1; "
            f"range [{probs.min():.4g}, {probs.max():.4g}], row {worst} sums to {row_sums[worst]:.6g}). "
            "Pass softmax probabilities, not logits: e.g. lensjax.metrics.roc.softmax(logits). "
            "AUC on raw logits is not comparable across classes.")
    return probs


def _check_labels(labels: np.ndarray, num_samples: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (C, C) with rows = true class, columns = predicted class."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(probs: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class one-vs-rest AUC, macro/micro AUC, accuracy, confusion matrix (JSON-ready).

    probs (N, C) softmax probabilities, labels (N,) integer classes, C class names.
    Returns {"num_samples", "num_samples_per_class", "class_names", "accuracy",
    "auc_per_class" {name: auc}, "auc_macro", "auc_micro", "confusion_matrix"
    (C x C list, rows = true, columns = predicted)}. Every class must occur in
    labels (its AUC is undefined otherwise).
    """
    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {class_names}")
    probs = check_probabilities(probs, num_classes)
    labels = _check_labels(labels, probs.shape[0], num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    missing = [name for name, count in zip(class_names, counts) if count == 0]
    if missing:
        raise ValueError(f"classes {missing} have no samples in labels; their one-vs-rest AUC "
                         "is undefined (evaluate on a set containing every class)")
    one_hot = labels[:, None] == np.arange(num_classes)[None, :]
    per_class = {name: roc_auc(probs[:, c], one_hot[:, c]) for c, name in enumerate(class_names)}
    predictions = np.argmax(probs, axis=1)
    return {
        "num_samples": int(probs.shape[0]),
        "num_samples_per_class": {name: int(n) for name, n in zip(class_names, counts)},
        "class_names": class_names,
        "accuracy": float(np.mean(predictions == labels)),
        "auc_per_class": per_class,
        "auc_macro": float(np.mean(list(per_class.values()))),
        "auc_micro": roc_auc(probs.ravel(), one_hot.ravel()),
        "confusion_matrix": confusion_matrix(predictions, labels, num_classes).tolist(),
    }
