"""Masked-autoencoder pretraining (Test VI.A): the lensjax foundation model.

Training minimises the MAE loss (`lensjax.models.mae`: MSE on masked patches) with
a fresh random masking per step drawn from the step's key. Evaluation measures the
same quantity on images the model never saw, with masks that do not depend on the
batch: example n of a split is masked with `fold_in(key(EVAL_MASK_SEED), n)`
(`batch["index"]`), so the reported masked-patch MSE is the same whatever the eval
batch size or device count. Beside it, the error of the trivial inpainting that
fills every masked pixel with the mean of the image's visible pixels, as a scale.

Model selection uses the "selection" split (lowest masked MSE), never the reported
held-out split. Errors are in units of the normalised intensity
(config.data.normalization) squared.
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
from lensjax.tasks import per_example

AUX_METRICS = ()
SELECTION_METRIC = ("masked_mse", "min")
# Root of the per-example evaluation masks (any fixed value; recorded in reports).
EVAL_MASK_SEED = 20210601
PANEL_ROWS = 4


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The registered model config.model.name (an MAE) built with config.model.kwargs."""
    return models.get_model(config.model.name, rngs=rngs,
                            **dict(config.model.get("kwargs", {}) or {}))


def loss_fn(model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """MAE loss of a batch {"image": (B, H, W, C)}, masks drawn from the step key `rng`."""
    return model(batch["image"], rng).loss, {}


def reconstruct_examples(model: nnx.Module, images: jax.Array, index: jax.Array) -> dict:
    """`MAE.reconstruct` with example n masked by fold_in(key(EVAL_MASK_SEED), index[n]).

    images (B, H, W, C), index (B,) int -> the dict of `MAE.reconstruct`: images
    (B, H, W, C) "masked_input", "reconstruction", "pasted", "mask", and
    "masked_mse" (B,). Each example is masked and reconstructed on its own (vmap),
    so its result does not depend on the other examples of the batch.
    """
    root = jax.random.key(EVAL_MASK_SEED)

    def one(image, n):
        out = model.reconstruct(image[None], jax.random.fold_in(root, n))
        return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(images, index)


def mean_fill_mse(images: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """MSE over masked pixels when each is filled with the mean of the image's visible
    pixels: images, pixel_mask (1 = masked) (B, H, W, C) -> (B,) float32."""
    images = images.astype(jnp.float32)
    axes = tuple(range(1, images.ndim))
    visible = 1.0 - pixel_mask
    fill = jnp.sum(images * visible, axes, keepdims=True) / jnp.maximum(
        jnp.sum(visible, axes, keepdims=True), 1.0)
    return jnp.sum(jnp.square(images - fill) * pixel_mask, axes) / jnp.maximum(
        jnp.sum(pixel_mask, axes), 1.0)


def predict(model: nnx.Module, batch: dict) -> dict:
    """Per-example masked-patch MSE (B,) and the mean-fill baseline (B,) of a held-out
    batch {"image", "index"} (masks seeded by "index")."""
    out = reconstruct_examples(model, batch["image"], batch["index"])
    return {"masked_mse": out["masked_mse"],
            "mean_fill_mse": mean_fill_mse(batch["image"], out["mask"])}


def selection_metrics(config, trained, mesh) -> dict:
    """Mean masked-patch MSE (and the mean-fill baseline) over the selection split."""
    values = per_example.collect(config, trained, mesh, "selection")
    return {"masked_mse": float(np.mean(values["masked_mse"])),
            "mean_fill_mse": float(np.mean(values["mean_fill_mse"]))}


def panel_examples(config, trained, mesh, rows: int = PANEL_ROWS) -> dict[str, np.ndarray]:
    """Host arrays of the first `rows` held-out examples: "image" and the outputs of
    `reconstruct_examples` (the same masks as the reported numbers)."""
    batch = next(pipeline.heldout_iterator(config, mesh, "heldout"))
    out = trained.jit(reconstruct_examples)(batch["image"], batch["index"])
    valid = parallel.to_host(batch["mask"])
    host = {name: parallel.to_host(value)[valid][:rows] for name, value in out.items()}
    host["image"] = parallel.to_host(batch["image"])[valid][:rows]
    host["index"] = parallel.to_host(batch["index"])[valid][:rows]
    return host


def evaluate(config, trained, mesh, outdir: str | Path) -> dict:
    """Masked-patch MSE over the held-out split (mean, std, sem, N) beside the mean-fill
    baseline, and the figure reconstructions.png in `outdir`."""
    from lensjax import plots
    outdir = Path(outdir)
    values = per_example.collect(config, trained, mesh, "heldout")
    model = trained.model()
    metrics = {
        "masked_mse": per_example.summarize(values["masked_mse"]),
        "mean_fill_mse": per_example.summarize(values["mean_fill_mse"]),
        "num_images": int(len(values["masked_mse"])),
        "mask_ratio": float(model.mask_ratio),
        "patch_size": int(model.patch_size),
        "norm_pix_loss": bool(model.norm_pix_loss),
        "mask_seed": f"example n: fold_in(key({EVAL_MASK_SEED}), n)",
        "units": f"squared intensity after data.normalization="
                 f"{config.data.get('normalization', 'none')!r}",
    }
    data = pipeline.describe(config, "heldout")
    panel = panel_examples(config, trained, mesh)
    figures = {}
    if jax.process_index() == 0:
        pixel_scale = pipeline.pixel_scale(config.data)
        figures["reconstructions"] = str(plots.plot_mae_reconstructions(
            panel["image"], panel["mask"], panel["reconstruction"], outdir / "reconstructions.png",
            masked_mse=panel["masked_mse"], indices=panel["index"], pixel_scale=pixel_scale,
            intensity_label=f"intensity ({config.data.get('normalization', 'none')})",
            title=f"MAE, mask ratio {model.mask_ratio:g}: held-out images ({data['split']})"))
    mse, fill = metrics["masked_mse"], metrics["mean_fill_mse"]
    headline = (f"masked-patch MSE {mse['mean']:.4g} +- {mse['sem']:.2g} (std {mse['std']:.3g}) "
                f"vs mean-fill {fill['mean']:.4g} on {metrics['num_images']} held-out images "
                f"({data['split']}), mask ratio {model.mask_ratio:g}")
    return {"metrics": metrics, "data": data, "figures": figures, "headline": headline}
