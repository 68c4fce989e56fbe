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


# ----------------------------------------------------------------------------
# Image panels (MAE reconstructions, super-resolution)
# ----------------------------------------------------------------------------

def _image_rows(images, name: str) -> np.ndarray:
    """(R, H, W) or (R, H, W, 1) -> (R, H, W) float64."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (R, H, W) or (R, H, W, 1), "
                         f"got {np.shape(images)}")
    return x


def _extent(height: int, width: int, pixel_scale: float | None) -> tuple[list[float], str]:
    """imshow extent (origin lower) and axis unit: centred arcsec, or pixels if no scale."""
    if pixel_scale is None:
        return [0.0, float(width), 0.0, float(height)], "pixel"
    half_w, half_h = width * pixel_scale / 2.0, height * pixel_scale / 2.0
    return [-half_w, half_w, -half_h, half_h], "arcsec"


def _label_image_axes(axes: np.ndarray, unit: str) -> None:
    for ax in axes.ravel():
        ax.set_xlabel(f"x [{unit}]")
        ax.set_ylabel(f"y [{unit}]")
        ax.label_outer()


def plot_mae_reconstructions(inputs: np.ndarray, mask: np.ndarray, reconstructions: np.ndarray,
                             path: PathLike, *, masked_mse: Sequence[float] | None = None,
                             indices: Sequence[int] | None = None, pixel_scale: float | None = None,
                             intensity_label: str = "normalised intensity",
                             title: str = "MAE reconstructions") -> str:
    """Rows = images; columns input / masked input / reconstruction / visible + reconstructed.

    inputs, mask (1 = masked pixel), reconstructions: (R, H, W) or (R, H, W, 1).
    Masked pixels are drawn grey in the masked input. Each row has one colour scale
    (the input's range) and its colour bar. masked_mse (R,): the per-image error
    over masked pixels, in the titles; indices (R,): positions in the held-out split.
    pixel_scale: arcsec per pixel (axes in arcsec), or None (axes in pixels).
    """
    inputs = _image_rows(inputs, "inputs")
    mask = _image_rows(mask, "mask") > 0.5
    reconstructions = _image_rows(reconstructions, "reconstructions")
    if not inputs.shape == mask.shape == reconstructions.shape:
        raise ValueError(f"shapes differ: inputs {inputs.shape}, mask {mask.shape}, "
                         f"reconstructions {reconstructions.shape}")
    rows, height, width = inputs.shape
    extent, unit = _extent(height, width, pixel_scale)
    from matplotlib import colormaps
    cmap = colormaps["inferno"].with_extremes(bad="0.6")
    columns = ("input", "masked input (grey: hidden)", "reconstruction",
               "visible + reconstructed")
    fig = Figure(figsize=(2.6 * len(columns) + 1.2, 2.5 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False, sharex=True, sharey=True)
    for r in range(rows):
        panels = (inputs[r], np.ma.masked_array(inputs[r], mask[r]), reconstructions[r],
                  np.where(mask[r], reconstructions[r], inputs[r]))
        low, high = float(inputs[r].min()), float(inputs[r].max())
        for c, (panel, name) in enumerate(zip(panels, columns)):
            shown = axes[r, c].imshow(panel, origin="lower", extent=extent, cmap=cmap,
                                      vmin=low, vmax=high, interpolation="nearest")
            label = name
            if c == 0 and indices is not None:
                label = f"{name} (#{int(indices[r])})"
            if c == 2 and masked_mse is not None:
                label = f"{name}\nmasked MSE {float(masked_mse[r]):.3g}"
            axes[r, c].set_title(label, fontsize="small")
        fig.colorbar(shown, ax=list(axes[r]), shrink=0.9, label=intensity_label)
    _label_image_axes(axes, unit)
    fig.suptitle(title)
    return _save(fig, path)


def plot_superres_panel(lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray,
                        path: PathLike, *, psnr: Sequence[float] | None = None,
                        bicubic_psnr: Sequence[float] | None = None,
                        indices: Sequence[int] | None = None, hr_pixel_scale: float | None = None,
                        title: str = "Super-resolution") -> str:
    """Rows = images; columns LR / bicubic / lensjax / HR / bicubic - HR / lensjax - HR.

    lr (R, h, w[, 1]); bicubic, sr, hr (R, H, W[, 1]). LR and HR cover the same
    field, so every panel shares the axes: arcsec with `hr_pixel_scale` (arcsec per
    HR pixel), else HR pixels. Per row: one colour scale for the four images (the
    HR range), one symmetric scale for the two residuals, each with a colour bar;
    psnr / bicubic_psnr (R,) in dB in the titles.
    """
    lr, bicubic = _image_rows(lr, "lr"), _image_rows(bicubic, "bicubic")
    sr, hr = _image_rows(sr, "sr"), _image_rows(hr, "hr")
    if not bicubic.shape == sr.shape == hr.shape or lr.shape[0] != hr.shape[0]:
        raise ValueError(f"shapes do not match: lr {lr.shape}, bicubic {bicubic.shape}, "
                         f"sr {sr.shape}, hr {hr.shape}")
    rows, height, width = hr.shape
    extent, unit = _extent(height, width, hr_pixel_scale)
    fig = Figure(figsize=(2.4 * 6 + 2.0, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 6, squeeze=False, sharex=True, sharey=True)
    for r in range(rows):
        low, high = float(hr[r].min()), float(hr[r].max())
        residuals = (bicubic[r] - hr[r], sr[r] - hr[r])
        bound = max(float(np.abs(np.stack(residuals)).max()), 1e-12)
        titles = [f"LR {lr.shape[2]}x{lr.shape[1]}", "bicubic", "lensjax", f"HR {width}x{height}",
                  "bicubic - HR", "lensjax - HR"]
        if indices is not None:
            titles[0] += f" (#{int(indices[r])})"
        if bicubic_psnr is not None:
            titles[1] += f"\nPSNR {float(bicubic_psnr[r]):.2f} dB"
        if psnr is not None:
            titles[2] += f"\nPSNR {float(psnr[r]):.2f} dB"
        for c, image in enumerate((lr[r], bicubic[r], sr[r], hr[r])):
            shown = axes[r, c].imshow(image, origin="lower", extent=extent, cmap="inferno",
                                      vmin=low, vmax=high, interpolation="nearest")
        fig.colorbar(shown, ax=list(axes[r, :4]), shrink=0.9, label="intensity")
        for c, image in enumerate(residuals, start=4):
            diff = axes[r, c].imshow(image, origin="lower", extent=extent, cmap="RdBu_r",
                                     vmin=-bound, vmax=bound, interpolation="nearest")
        fig.colorbar(diff, ax=list(axes[r, 4:]), shrink=0.9, label="residual (intensity)")
        for c, text in enumerate(titles):
            axes[r, c].set_title(text, fontsize="small")
    _label_image_axes(axes, unit)
    fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Diffusion: sample grids, power-spectrum ratios, pixel histograms
# ----------------------------------------------------------------------------

def plot_image_grids(sets: Mapping[str, np.ndarray], path: PathLike, *,
                     pixel_scale_arcsec: float | None = None, columns: int = 4,
                     intensity_label: str = "intensity (normalised to [0, 1])",
                     title: str = "Samples") -> str:
    """One block of panels per named image set, side by side (e.g. generated | held-out).

    sets: {label: images (N, H, W) or (N, H, W, 1)}, every image on one colour
    scale [0, 1] so that intensities compare across sets; `columns` panels per row.
    pixel_scale_arcsec: axes in arcsec (centred), or None for pixels.
    """
    if not sets:
        raise ValueError("no image sets to plot")
    blocks = {label: _image_rows(images, f"images of {label!r}") for label, images in sets.items()}
    most = max(len(images) for images in blocks.values())
    if most == 0:
        raise ValueError("every image set is empty")
    columns = max(1, min(columns, most))
    rows = math.ceil(most / columns)
    fig = Figure(figsize=(2.0 * columns * len(blocks) + 1.5, 2.0 * rows + 0.9),
                 layout="constrained")
    subfigures = np.atleast_1d(fig.subfigures(1, len(blocks), wspace=0.04))
    shown = None
    for subfigure, (label, images) in zip(subfigures, blocks.items()):
        extent, unit = _extent(images.shape[1], images.shape[2], pixel_scale_arcsec)
        axes = subfigure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
        for i, ax in enumerate(axes.ravel()):
            if i < len(images):
                shown = ax.imshow(images[i], origin="lower", extent=extent, cmap="inferno",
                                  vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.set_visible(False)
        _label_image_axes(axes, unit)
        subfigure.suptitle(f"{label} ({len(images)} images)")
    fig.colorbar(shown, ax=list(subfigures[-1].axes), shrink=0.8, label=intensity_label)
    fig.suptitle(title)
    return _save(fig, path)


def plot_power_spectrum_ratio(k: np.ndarray, ratio: np.ndarray, path: PathLike, *,
                              nyquist_per_arcsec: float | None = None,
                              title: str = "Power-spectrum ratio") -> str:
    """Ratio P_generated(k) / P_real(k) (K,) of radially averaged power spectra against
    the angular frequency k (K,) in 1/arcsec; 1 means equal power at that scale."""
    k = np.asarray(k, dtype=np.float64)
    ratio = np.asarray(ratio, dtype=np.float64)
    if k.shape != ratio.shape or k.ndim != 1:
        raise ValueError(f"k and ratio must be 1-D of equal length, got {k.shape} and {ratio.shape}")
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    shown = np.isfinite(ratio) & (ratio > 0)
    ax.plot(k[shown], ratio[shown], marker=".", lw=1.2, label="generated / held-out")
    ax.axhline(1.0, color="black", lw=1.0, ls="--", label="equal power")
    if nyquist_per_arcsec is not None:
        ax.axvline(nyquist_per_arcsec, color="tab:gray", lw=1.0, ls=":",
                   label=f"Nyquist ({nyquist_per_arcsec:g} / arcsec)")
    ax.set_yscale("log")
    ax.set_xlabel("angular frequency k [1/arcsec]")
    ax.set_ylabel("P_generated(k) / P_held-out(k)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_pixel_histograms(edges: np.ndarray, histograms: Mapping[str, Sequence[float]],
                          path: PathLike, *,
                          intensity_label: str = "pixel intensity (normalised to [0, 1])",
                          title: str = "Pixel-intensity histograms") -> str:
    """Step plot of pixel-intensity probabilities {label: (bins,)} over shared edges (bins + 1,)."""
    edges = np.asarray(edges, dtype=np.float64)
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for label, probabilities in histograms.items():
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(edges) - 1,):
            raise ValueError(f"histogram {label!r} has shape {probabilities.shape}, expected "
                             f"({len(edges) - 1},) for {len(edges)} edges")
        ax.stairs(probabilities, edges, label=label, lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel(intensity_label)
    ax.set_ylabel("fraction of pixels")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
