"""lensjax.sim.gallery draws labelled, arcsec-scaled galleries of every kind of preset."""

import jax
import pytest
from matplotlib.figure import Figure

from lensjax.sim import gallery, get_preset


def _image_axes(fig: Figure):
    """Axes holding images (not colour bars), and the (rows, cols) of their grid."""
    axes = [ax for ax in fig.axes if ax.images and ax.get_subplotspec() is not None]
    grid = axes[0].get_subplotspec().get_gridspec()
    return axes, (grid.nrows, grid.ncols)


def _colour_bars(fig: Figure):
    return [ax for ax in fig.axes if ax not in _image_axes(fig)[0]]


# per_class matches the batch sizes of test_export.py, so a joint run compiles nothing new.
@pytest.mark.parametrize("name, rows, per_class", [("model_iii", ["no_sub", "cdm", "axion"], 2),
                                                   ("superres", ["HR", "LR"], 3),
                                                   ("diffusion", ["unlabelled"], 3)])
def test_gallery_rows_axes_colour_bars_and_title(name, rows, per_class):
    fig = gallery.plot_gallery(name, jax.random.key(0), per_class)
    axes, shape = _image_axes(fig)
    assert shape == (len(rows), per_class) and len(axes) == len(rows) * per_class
    left = [ax for ax in axes if ax.get_subplotspec().colspan.start == 0]
    for row, ax in zip(rows, sorted(left, key=lambda a: a.get_subplotspec().rowspan.start)):
        assert ax.get_ylabel().startswith(row) and "arcsec" in ax.get_ylabel()
    bottom = [ax for ax in axes if ax.get_subplotspec().rowspan.start == len(rows) - 1]
    assert all("arcsec" in ax.get_xlabel() for ax in bottom)
    # The image extent is the field of view, in arcsec.
    half = get_preset(name).field_of_view / 2
    for ax in axes:
        assert ax.images[0].get_extent() == pytest.approx([-half, half, -half, half])
    bars = _colour_bars(fig)
    assert len(bars) == len(rows)
    assert all(bar.get_ylabel() for bar in bars)
    assert name in fig.get_suptitle()
    if name == "model_iii":   # axion panels carry the axion mass
        axion = [ax for ax in axes if ax.get_subplotspec().rowspan.start == 2]
        assert all("eV" in ax.get_title() for ax in axion)


def test_gallery_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "nested" / "dir" / "gallery.png"
    rc = gallery.main(["--preset", "model_iii", "--out", str(out), "--per-class", "2",
                       "--seed", "1", "--dpi", "40"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gallery_rejects_bad_arguments(tmp_path, capsys):
    assert gallery.main(["--preset", "nope", "--out", str(tmp_path / "g.png")]) == 2
    assert "valid presets" in capsys.readouterr().err
    with pytest.raises(ValueError, match="per_class"):
        gallery.plot_gallery("model_iii", jax.random.key(0), 0)
    with pytest.raises(SystemExit):
        gallery.main(["--preset", "model_iii", "--out", str(tmp_path / "g.png"), "--seed", "-1"])
    assert not (tmp_path / "g.png").exists()
