"""lensjax.plots: files are written (parents created), axes are labelled, legends carry AUCs."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from lensjax import plots
from lensjax.metrics import roc

CLASSES = ["no_sub", "cdm", "axion"]


@pytest.fixture
def capture_figures(monkeypatch):
    """Record every Figure that plots._save writes, to inspect its axes afterwards."""
    figures = []
    save = plots._save

    def recording_save(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", recording_save)
    return figures


def _probs_labels(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    probs = roc.softmax(rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels])
    return probs, labels


def _assert_png(path: str) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_roc(tmp_path, capture_figures):
    probs, labels = _probs_labels()
    path = tmp_path / "new" / "dir" / "roc.png"
    written = plots.plot_roc(probs, labels, CLASSES, path, title="ResNet-18 val")
    assert written == str(path)
    _assert_png(written)
    (ax,) = capture_figures[-1].axes
    assert ax.get_xlabel() == "false positive rate"
    assert ax.get_ylabel() == "true positive rate"
    assert "ResNet-18 val" in ax.get_title() and "120" in ax.get_title()
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    report = roc.classification_report(probs, labels, CLASSES)
    for name in CLASSES:
        assert f"{name} (AUC = {report['auc_per_class'][name]:.4f})" in legend
    assert any(t.startswith("micro") and f"{report['auc_micro']:.4f}" in t for t in legend)
    assert any(t.startswith("macro") and f"{report['auc_macro']:.4f}" in t for t in legend)


def test_plot_roc_refuses_logits(tmp_path):
    _, labels = _probs_labels()
    with pytest.raises(ValueError, match="not logits"):
        plots.plot_roc(np.random.default_rng(0).normal(size=(120, 3)), labels, CLASSES,
                       tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()


def test_plot_confusion(tmp_path, capture_figures):
    confusion = np.array([[50, 3, 1], [4, 40, 6], [0, 7, 39]])
    written = plots.plot_confusion(confusion, CLASSES, tmp_path / "sub" / "confusion.png",
                                   title="val")
    _assert_png(written)
    ax = capture_figures[-1].axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    annotations = {text.get_text() for text in ax.texts}
    assert {str(v) for v in confusion.ravel()} <= annotations
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert "150" in ax.get_title()
    with pytest.raises(ValueError, match="confusion must be"):
        plots.plot_confusion(confusion[:2], CLASSES, tmp_path / "bad.png")


def test_plot_curves(tmp_path, capture_figures):
    history = {"train_loss": [(s, 1.0 / (s + 1)) for s in range(0, 100, 10)],
               "val_auc_macro": [(0, 0.5), (50, 0.8), (100, 0.9)],
               "learning_rate": [(s, 1e-3) for s in range(0, 100, 25)],
               "empty": []}
    written = plots.plot_curves(history, tmp_path / "curves" / "train.png", title="run 1")
    _assert_png(written)
    visible = [ax for ax in capture_figures[-1].axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in visible] == ["train_loss", "val_auc_macro", "learning_rate"]
    assert all(ax.get_xlabel() == "training step" for ax in visible)
    with pytest.raises(ValueError, match="no points"):
        plots.plot_curves({"loss": []}, tmp_path / "none.png")
