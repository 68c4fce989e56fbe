"""lensjax.metrics.roc against scikit-learn, plus fixed-logit cases worked by hand.

References: sklearn.metrics.roc_curve (with and without drop_intermediate) on
scores with many ties, roc_auc_score for binary, one-vs-rest macro
(multi_class="ovr") and micro (one-hot labels, average="micro") AUC, and
confusion_matrix. Logits and single-class inputs must be refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn.metrics as skm

from lensjax.metrics import roc

CLASSES = ["no_sub", "cdm", "axion"]


def _random_probs(rng: np.random.Generator, n: int, c: int, signal: float = 1.0):
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + signal * np.eye(c)[labels]
    return roc.softmax(logits), labels


def _tied_scores(rng: np.random.Generator, n: int):
    """Scores on a coarse grid (many ties) with positives correlated to them."""
    scores = np.round(rng.uniform(size=n), 1)
    positives = rng.uniform(size=n) < 0.2 + 0.6 * scores
    return scores, positives


# ----------------------------------------------------------------------------
# Binary ROC and AUC
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("drop_intermediate", [False, True])
def test_roc_curve_matches_sklearn_with_ties(seed, drop_intermediate):
    scores, positives = _tied_scores(np.random.default_rng(seed), 300)
    fpr, tpr, thresholds = roc.roc_curve(scores, positives, drop_intermediate=drop_intermediate)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(positives, scores, drop_intermediate=drop_intermediate)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds, ref_thr)
    assert thresholds[0] == np.inf and fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_roc_curve_default_matches_sklearn_default_on_continuous_scores():
    rng = np.random.default_rng(7)
    scores, positives = rng.normal(size=500), rng.uniform(size=500) < 0.4
    for mine, ref in zip(roc.roc_curve(scores, positives), skm.roc_curve(positives, scores)):
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores, positives = _tied_scores(rng, 400)
    assert roc.roc_auc(scores, positives) == pytest.approx(skm.roc_auc_score(positives, scores),
                                                           abs=1e-12)
    fpr, tpr, _ = roc.roc_curve(scores, positives)
    assert roc.roc_auc(scores, positives) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_roc_auc_known_cases():
    positives = np.array([False, False, True, True])
    assert roc.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), positives) == 1.0
    assert roc.roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), positives) == 0.0
    assert roc.roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), positives) == 0.5    # all tied
    # Pairs (pos, neg): 0.35 vs {0.1, 0.4} -> 1 + 0; 0.8 vs both -> 2: AUC 3/4.
    assert roc.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), positives) == 0.75
    # One tie between a positive and a negative counts 1/2: (1 + 0.5 + 2) / 4.
    assert roc.roc_auc(np.array([0.1, 0.4, 0.4, 0.8]), positives) == 0.875


def test_single_class_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="only one class"):
        roc.roc_auc(np.array([0.1, 0.9]), np.array([True, True]))
    with pytest.raises(ValueError, match="only one class"):
        roc.roc_curve(np.array([0.1, 0.9]), np.array([False, False]))
    with pytest.raises(ValueError, match="equal length"):
        roc.roc_auc(np.array([0.1, 0.9, 0.3]), np.array([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        roc.roc_auc(np.array([0.1, np.nan]), np.array([True, False]))


def test_softmax_is_stable_and_normalised():
    probs = roc.softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), -np.inf]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]], atol=1e-15)


# ----------------------------------------------------------------------------
# Multiclass report
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_report_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    probs, labels = _random_probs(rng, 600, 3)
    probs = np.round(probs, 2)                     # ties, as in low-precision outputs
    probs /= probs.sum(axis=1, keepdims=True)
    report = roc.classification_report(probs, labels, CLASSES)
    one_hot = np.eye(3)[labels]

    for c, name in enumerate(CLASSES):
        assert report["auc_per_class"][name] == pytest.approx(
            skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
    assert report["auc_macro"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert report["auc_micro"] == pytest.approx(
        skm.roc_auc_score(one_hot, probs, average="micro"), abs=1e-12)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    np.testing.assert_array_equal(report["confusion_matrix"],
                                  skm.confusion_matrix(labels, probs.argmax(1), labels=[0, 1, 2]))
    assert report["num_samples"] == 600
    assert sum(report["num_samples_per_class"].values()) == 600
    json.dumps(report)                                           # report.json-ready


def test_report_fixed_logits_known_values():
    # Rows: true classes 0, 0, 1, 1, 2, 2. Predictions (argmax): 0, 1, 1, 1, 2, 0.
    logits = np.array([[3.0, 1.0, 0.0],
                       [1.0, 2.0, 0.0],
                       [0.0, 4.0, 1.0],
                       [0.0, 3.0, 1.0],
                       [0.0, 0.0, 5.0],
                       [2.0, 0.0, 1.0]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    report = roc.classification_report(roc.softmax(logits), labels, CLASSES)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # Class 1 (cdm): positives score p1 = 0.94, 0.84, every negative at most 0.67: AUC 1.
    assert report["auc_per_class"]["cdm"] == 1.0
    aucs = [skm.roc_auc_score(labels == c, roc.softmax(logits)[:, c]) for c in range(3)]
    assert report["auc_macro"] == pytest.approx(np.mean(aucs), abs=1e-12)


def test_perfect_classifier():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    report = roc.classification_report(probs, labels, CLASSES)
    assert report["accuracy"] == 1.0 and report["auc_macro"] == 1.0 and report["auc_micro"] == 1.0
    assert report["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_logits_are_refused_with_a_softmax_hint():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3)) * 3
    labels = rng.integers(0, 3, size=50)
    with pytest.raises(ValueError, match="softmax probabilities, not logits"):
        roc.classification_report(logits, labels, CLASSES)
    # Non-negative scores that do not sum to one (e.g. sigmoids) are refused too.
    with pytest.raises(ValueError, match="not logits"):
        roc.classification_report(rng.uniform(size=(50, 3)), labels, CLASSES)
    roc.classification_report(roc.softmax(logits), labels, CLASSES)   # accepted once normalised


def test_report_input_errors():
    probs, labels = _random_probs(np.random.default_rng(1), 30, 3)
    with pytest.raises(ValueError, match="no samples"):
        roc.classification_report(probs, np.zeros(30, dtype=int), CLASSES)
    with pytest.raises(ValueError, match="3 columns but there are 2 classes"):
        roc.classification_report(probs, labels, CLASSES[:2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        roc.classification_report(probs, np.where(labels == 2, 3, labels), CLASSES)
    with pytest.raises(ValueError, match="shape"):
        roc.classification_report(probs, labels[:-1], CLASSES)
