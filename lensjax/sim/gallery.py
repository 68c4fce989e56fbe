"""A quick-look gallery of a preset: a few simulated images per class, in arcsec.

    python -m lensjax.sim.gallery --preset model_i --out runs/gallery_model_i.png --per-class 4
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lensjax.sim.recipes import (PRESET_NAMES, DeepLenseSimRecipe, Preset, PyLensingRecipe,
                                 SuperResolutionPreset, UnlabelledPreset, get_preset)

_PANEL_INCHES = 2.1


def _flux_label(preset: Preset) -> str:
    """Colour-bar label: what a pixel value means for this preset."""
    if isinstance(preset, (SuperResolutionPreset, UnlabelledPreset)):
        return "normalised flux"
    if isinstance(preset, PyLensingRecipe):
        return "normalised flux" if preset.normalise else "flux [counts/s per pixel]"
    if isinstance(preset, DeepLenseSimRecipe) and preset.noise == "model_i":
        return "counts per pixel"
    return "flux [e-/s per pixel]"


def _rows(preset: Preset, key: jax.Array, per_class: int
          ) -> list[tuple[str, np.ndarray, list[str], float]]:
    """(row label, images (K, h, w), panel titles, pixel scale) for each row of the gallery."""
    if isinstance(preset, SuperResolutionPreset):
        hr, _, params = preset.sample(key, per_class)
        hr, lr = jax.device_get((hr[..., 0], params["lr_image"][..., 0]))
        titles = [f"#{j + 1}" for j in range(per_class)]
        return [("HR", hr, titles, preset.pixel_scale),
                (f"LR ({preset.factor}x{preset.factor} mean pool)", lr, titles,
                 preset.pixel_scale * preset.factor)]
    if isinstance(preset, UnlabelledPreset):
        images, _, _ = preset.sample(key, per_class)
        return [("unlabelled", np.asarray(images[..., 0]), [f"#{j + 1}" for j in range(per_class)],
                 preset.pixel_scale)]
    rows = []
    for c, name in enumerate(preset.class_names):
        images, _, params = preset.sample(jax.random.fold_in(key, c), per_class, label=c)
        images, params = jax.device_get((images[..., 0], params))
        if name == "axion" and "axion_mass_ev" in params:
            titles = [f"$m_a$ = {m:.2g} eV" for m in params["axion_mass_ev"]]
        else:
            titles = [f"{name} #{j + 1}" for j in range(per_class)]
        rows.append((name, images, titles, preset.pixel_scale))
    return rows


def plot_gallery(preset: Preset | str, key: jax.Array, per_class: int = 4) -> Figure:
    """Figure with one row per class (HR and LR rows for superres), per_class images per row.

    Axes are sky coordinates in arcsec; each row has a labelled colour bar; the suptitle is
    the preset's describe() line, wrapped.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    rows = _rows(preset, key, int(per_class))
    flux_label = _flux_label(preset)
    normalised = flux_label == "normalised flux"

    width = _PANEL_INCHES * per_class + 1.4
    title = textwrap.fill(preset.describe(), width=int(width * 15))
    title_inches = 0.16 * (title.count("\n") + 1) + 0.2
    fig = Figure(figsize=(width, _PANEL_INCHES * len(rows) + title_inches), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), per_class, squeeze=False, sharex=True, sharey=True)
    for r, (row_label, images, titles, pixel_scale) in enumerate(rows):
        half = images.shape[-1] * pixel_scale / 2.0
        extent = (-half, half, -half, half)
        vmin, vmax = (0.0, 1.0) if normalised else (float(images.min()), float(images.max()))
        for j, ax in enumerate(axes[r]):
            # y grows with the row index (instrument.pixel_coordinates), hence origin="lower".
            im = ax.imshow(images[j], origin="lower", extent=extent, cmap="inferno",
                           vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(titles[j], fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("x [arcsec]", fontsize=8)
        axes[r, 0].set_ylabel(f"{row_label}\ny [arcsec]", fontsize=8)
        bar = fig.colorbar(im, ax=list(axes[r]), shrink=0.9, pad=0.02)
        bar.set_label(flux_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=7)
    return fig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lensjax.sim.gallery",
                                     description="Plot a gallery of simulated images of a preset.")
    parser.add_argument("--preset", required=True, help="one of: " + ", ".join(PRESET_NAMES))
    parser.add_argument("--out", required=True, help="output image (e.g. gallery.png)")
    parser.add_argument("--per-class", type=int, default=4, help="images per row")
    parser.add_argument("--seed", type=int, default=0, help="root seed in [0, 2**32)")
    parser.add_argument("--dpi", type=int, default=120)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**32:  # jax.random.key silently wraps larger seeds
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    try:
        fig = plot_gallery(args.preset, jax.random.key(args.seed), args.per_class)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
