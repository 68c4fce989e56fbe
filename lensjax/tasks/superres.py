"""Super-resolution (Test VI.B): LR images (75 x 75) -> HR images (150 x 150).

Batches are {"lr": (B, h, w, 1), "hr": (B, H, W, 1)} in [0, 1] (the `superres`
preset or the official pairs). Training minimises the pixel MSE between the
model's output and HR. Evaluation (shared/EVALUATION.md) scores every held-out
image at the HR size with `lensjax.metrics.image_quality`: PSNR, SSIM (single
channel, data_range 1.0, 7 x 7 window, scikit-image conventions) and MSE, for
the model and for bicubic upsampling of the same LR image, averaged over images.

Both outputs are clipped to [0, 1], the data range, before scoring: HR lies in
[0, 1], so clipping can only move a pixel closer to it, any image written out
would be clipped, and SSIM with data_range 1.0 assumes values in that range.
The same rule applies to the bicubic baseline (whose cubic kernel overshoots at
edges), so the comparison is like for like.

Model selection uses the "selection" split (highest mean PSNR), never the
reported held-out split.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lensjax import models, parallel
from lensjax.data import pipeline
from lensjax.metrics import image_quality
from lensjax.tasks import per_example

AUX_METRICS = ()
SELECTION_METRIC = ("psnr", "max")
DATA_RANGE = 1.0
PANEL_ROWS = 3
SCORES = ("psnr", "ssim", "mse")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The registered model config.model.name (LR (B, h, w, C) -> HR (B, H, W, C)) built
    with config.model.kwargs; refuses data scaled outside [0, 1]."""
    normalization = config.data.get("normalization", "none")
    if normalization == "standardize":
        raise ValueError("super-resolution is scored with data_range 1.0 on images in [0, 1]; "
                         "config.data.normalization='standardize' leaves that range. Use 'none' "
                         "(the VI.B pairs are stored in [0, 1]).")
    return models.get_model(config.model.name, rngs=rngs,
                            **dict(config.model.get("kwargs", {}) or {}))


def loss_fn(model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Mean squared error between model(lr) (B, H, W, C) and hr, over pixels and images.

    MSE rather than L1: PSNR, the selection and headline metric, is a decreasing
    function of each image's MSE, so training minimises what is reported. L1, often
    chosen for natural images because it blurs edges less, trades some PSNR for
    that; lensing images are smooth arcs, and the comparison with bicubic is in PSNR.
    """
    del rng
    sr = model(batch["lr"]).astype(jnp.float32)
    return jnp.mean(jnp.square(sr - batch["hr"].astype(jnp.float32))), {}


def upscale_factor(lr: jax.Array, hr: jax.Array) -> int:
    """Integer factor f with hr (B, f*h, f*w, C) and lr (B, h, w, C)."""
    factor = hr.shape[1] // lr.shape[1]
    if (lr.shape[1] * factor, lr.shape[2] * factor) != tuple(hr.shape[1:3]):
        raise ValueError(f"HR {hr.shape} is not an integer upscaling of LR {lr.shape}")
    return factor


def upsampled_pair(model: nnx.Module, lr: jax.Array, hr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(model output, bicubic upsampling) of lr, both (B, H, W, C) clipped to [0, DATA_RANGE]."""
    sr = jnp.clip(model(lr).astype(jnp.float32), 0.0, DATA_RANGE)
    bicubic = jnp.clip(image_quality.bicubic_upsample(lr, upscale_factor(lr, hr)), 0.0, DATA_RANGE)
    return sr, bicubic


def scores(pred: jax.Array, hr: jax.Array) -> dict[str, jax.Array]:
    """Per-image "psnr" (dB), "ssim", "mse" of pred vs hr, (B, H, W, 1) each -> (B,) each."""
    return {"psnr": image_quality.batch_psnr(pred, hr, DATA_RANGE),
            "ssim": image_quality.batch_ssim(pred, hr, DATA_RANGE),
            "mse": image_quality.batch_mse(pred, hr)}


def predict(model: nnx.Module, batch: dict) -> dict:
    """Per-image psnr, ssim, mse of the model and bicubic_psnr, bicubic_ssim, bicubic_mse
    of bicubic upsampling, (B,) each, for a batch {"lr", "hr"}."""
    hr = batch["hr"].astype(jnp.float32)
    sr, bicubic = upsampled_pair(model, batch["lr"], hr)
    out = scores(sr, hr)
    out.update({f"bicubic_{name}": value for name, value in scores(bicubic, hr).items()})
    return out


def selection_metrics(config, trained, mesh) -> dict:
    """Mean PSNR and SSIM of the model over the selection split."""
    values = per_example.collect(config, trained, mesh, "selection")
    return {"psnr": float(np.mean(values["psnr"])), "ssim": float(np.mean(values["ssim"]))}


def summarize_scores(values: dict[str, np.ndarray]) -> dict:
    """Means over images (and std, sem) of the model's and bicubic scores, and the gains."""
    report = {"lensjax": {name: per_example.summarize(values[name]) for name in SCORES},
              "bicubic": {name: per_example.summarize(values[f"bicubic_{name}"])
                          for name in SCORES}}
    report["psnr_gain_db"] = per_example.summarize(values["psnr"] - values["bicubic_psnr"])
    report["ssim_gain"] = per_example.summarize(values["ssim"] - values["bicubic_ssim"])
    report["fraction_images_better_psnr"] = float(np.mean(values["psnr"] > values["bicubic_psnr"]))
    report["num_images"] = int(len(values["psnr"]))
    return report


def panel_examples(config, trained, mesh, rows: int = PANEL_ROWS) -> dict[str, np.ndarray]:
    """Host arrays of the first `rows` held-out pairs: lr, hr, sr, bicubic (clipped as
    scored), their psnr / bicubic_psnr and index."""
    batch = next(pipeline.heldout_iterator(config, mesh, "heldout"))

    def images_and_scores(model, lr, hr):
        sr, bicubic = upsampled_pair(model, lr, hr)
        return {"sr": sr, "bicubic": bicubic, "psnr": scores(sr, hr)["psnr"],
                "bicubic_psnr": scores(bicubic, hr)["psnr"]}

    out = trained.jit(images_and_scores)(batch["lr"], batch["hr"].astype(jnp.float32))
    out.update(lr=batch["lr"], hr=batch["hr"], index=batch["index"])
    valid = parallel.to_host(batch["mask"])
    return {name: parallel.to_host(value)[valid][:rows] for name, value in out.items()}


def evaluate(config, trained, mesh, outdir: str | Path) -> dict:
    """Per-image PSNR / SSIM / MSE averaged over the held-out split beside bicubic, and
    the figure superres.png (LR / bicubic / lensjax / HR / residuals) in `outdir`."""
    from lensjax import plots
    outdir = Path(outdir)
    values = per_example.collect(config, trained, mesh, "heldout")
    metrics = summarize_scores(values)
    metrics["conventions"] = (f"per-image metrics at the HR size, averaged over images; outputs "
                              f"clipped to [0, {DATA_RANGE:g}]; SSIM single channel, data_range "
                              f"{DATA_RANGE:g}, 7x7 uniform window (scikit-image defaults); "
                              "bicubic: jax.image.resize (Keys a=-0.5)")
    data = pipeline.describe(config, "heldout")
    panel = panel_examples(config, trained, mesh)
    figures = {}
    if jax.process_index() == 0:
        pixel_scale = pipeline.pixel_scale(config.data)
        figures["superres"] = str(plots.plot_superres_panel(
            panel["lr"], panel["bicubic"], panel["sr"], panel["hr"], outdir / "superres.png",
            psnr=panel["psnr"], bicubic_psnr=panel["bicubic_psnr"], indices=panel["index"],
            hr_pixel_scale=pixel_scale,
            title=f"{config.model.name}: held-out pairs ({data['split']})"))
    ours, base, gain = metrics["lensjax"], metrics["bicubic"], metrics["psnr_gain_db"]
    headline = (f"PSNR {ours['psnr']['mean']:.2f} dB (bicubic {base['psnr']['mean']:.2f}, gain "
                f"{gain['mean']:+.2f} +- {gain['sem']:.2f} dB), "
                f"SSIM {ours['ssim']['mean']:.4f} (bicubic {base['ssim']['mean']:.4f}), "
                f"MSE {ours['mse']['mean']:.3g} (bicubic {base['mse']['mean']:.3g}) on "
                f"{metrics['num_images']} held-out images ({data['split']})")
    return {"metrics": metrics, "data": data, "figures": figures, "headline": headline}
