"""Draw samples from a trained diffusion workdir and write them in the official Test IV layout.

    python -m lensjax.sample --workdir runs/ddpm --num 10000 --sampler ddim --steps 100 \
        --eta 0 --out runs/ddpm/samples [--seed 0] [--checkpoint best|latest] [--batch-size 256]

Writes OUT/Samples/sample<i>.npy for i = 1..N, each float32 (1, H, W) in [0, 1] as
the official files are stored (so `deeplense_diffusion` reads them back), the grid
OUT/samples_grid.png of the first 64, and OUT/lensjax_samples.json (checkpoint,
sampler, seed). Sampling is sharded over every device of every process (the
model's EMA parameters when the run kept them); sample i uses the key
fold_in(key(seed), i - 1), so the files do not depend on --batch-size or on the
number of devices. Several processes: every process samples its shard of each
batch, the batch is gathered, and only process 0 writes files.
Sampler settings default to the workdir's config.sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from lensjax import hugepages

MANIFEST_NAME = "lensjax_samples.json"
SAMPLES_DIR = "Samples"
GRID_NAME = "samples_grid.png"
GRID_IMAGES = 64


def sample_path(out_dir: str | os.PathLike, number: int) -> Path:
    """OUT/Samples/sample<number>.npy (numbers count from 1, as in the official data)."""
    return Path(out_dir) / SAMPLES_DIR / f"sample{number}.npy"


def write_samples(images: np.ndarray, out_dir: str | os.PathLike, first_number: int) -> list[Path]:
    """Write images (B, H, W[, 1]) as sample<first_number>.npy ... in OUT/Samples/.

    Each file holds float32 (1, H, W) clipped to [0, 1]; it is written to a hidden
    temporary and renamed, so an interrupted run leaves no half-written file.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"images must be (B, H, W) or (B, H, W, 1), got shape {images.shape}")
    if first_number < 1:
        raise ValueError(f"sample numbers start at 1, got {first_number}")
    folder = Path(out_dir) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, image in enumerate(images):
        path = sample_path(out_dir, first_number + offset)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.clip(image, 0.0, 1.0)[None])
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a path that is a file, or a non-empty directory unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"--out {out_dir} is not empty; pass --force to write into it "
                              "(its Samples/sample<i>.npy files are replaced)")


def remove_stale_samples(out_dir: Path, num: int) -> int:
    """Delete OUT/Samples/sample<i>.npy with i > num (left by a larger earlier run); count."""
    removed = 0
    for path in (out_dir / SAMPLES_DIR).glob("sample*.npy"):
        number = path.stem.removeprefix("sample")
        if number.isdigit() and int(number) > num:
            path.unlink()
            removed += 1
    return removed


def sample_workdir(workdir: str | os.PathLike, num: int, out_dir: str | os.PathLike, *,
                   sampler: str | None = None, steps: int | None = None,
                   eta: float | None = None, seed: int = 0, checkpoint: str = "best",
                   batch_size: int | None = None, force: bool = False,
                   progress: bool = True) -> dict:
    """Sample `num` images of a diffusion workdir into `out_dir`; returns the manifest.

    sampler/steps/eta: None takes the workdir's config.sample value.
    batch_size: global images per sharded call (default config.sample.batch_size),
    a multiple of the device count.
    """
    import jax

    import lensjax
    from lensjax import evaluate, plots
    from lensjax.tasks import diffusion as task
    from lensjax.data import pipeline

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    out = Path(out_dir)
    check_out_dir(out, force)
    config, trained, record = evaluate.restore_workdir(workdir, checkpoint)
    if config.task != "diffusion":
        raise ValueError(f"{workdir} is a {config.task!r} run, not a diffusion run "
                         "(config.task must be 'diffusion')")
    settings = trained.model().settings
    chosen = task.sampler_settings(config, sampler=sampler, steps=steps, eta=eta)
    chosen.check(settings.num_steps)
    requested = batch_size or int((config.get("sample", {}) or {}).get(
        "batch_size", config.eval.batch_size))
    batch = task.sample_batch_size(requested, num, trained.mesh)
    shape = pipeline.image_shape(config)
    writer = jax.process_index() == 0
    grid = []
    for start, images in task.generate(trained, num, sampler=chosen, image_shape=shape,
                                       seed=seed, batch_size=batch, progress=progress):
        if writer:
            write_samples(images, out, start + 1)
        if len(grid) * batch < GRID_IMAGES:
            grid.append(images)
    manifest = {
        "format": "lensjax_samples", "layout": f"{SAMPLES_DIR}/sample<i>.npy, i = 1..{num}",
        "files": {"shape": [1, *shape[:2]], "dtype": "float32", "range": [0.0, 1.0]},
        "num": num, "workdir": str(workdir), "checkpoint": record,
        "config_hash": evaluate.config_hash(config),
        "sampler": {**chosen.describe(settings.num_steps), "seed": seed,
                    "parameters": "EMA" if "ema_params" in trained.state else "raw",
                    "key": "sample i uses fold_in(jax.random.key(seed), i - 1)"},
        "lensjax_version": lensjax.__version__,
    }
    if writer:
        removed = remove_stale_samples(out, num)
        if removed:
            logging.info("removed %d stale sample files numbered above %d", removed, num)
        grid_images = np.concatenate(grid)[:GRID_IMAGES]
        plots.plot_image_grids(
            {"generated": grid_images}, out / GRID_NAME,
            pixel_scale_arcsec=task.pixel_scale_arcsec(config), columns=8,
            title=f"{chosen.text(settings.num_steps)}, seed {seed}, "
                  f"checkpoint step {record['step']}")
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensjax.sample",
        description="Sample a trained lensjax diffusion workdir into OUT/Samples/sample<i>.npy "
                    "(the official Test IV layout) plus OUT/samples_grid.png.")
    parser.add_argument("--workdir", required=True, help="a diffusion run's workdir")
    parser.add_argument("--num", type=int, required=True, help="number of samples N (files 1..N)")
    parser.add_argument("--out", required=True, help="output directory (empty or absent)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                        help="default: the workdir's config.sample.sampler")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps (DDPM always takes all T); default: config.sample.steps")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta (0: deterministic); default: config.sample.eta")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed in [0, 2**31)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per sharded call, a multiple of the device count "
                             "(default: config.sample.batch_size)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT (replaces Samples/sample<i>.npy and "
                             "removes those numbered above N)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--multihost", action="store_true", default=None,
                        help="call jax.distributed.initialize() (default: auto-detect SLURM / "
                             "JAX_COORDINATOR_ADDRESS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad arguments or a wrong workdir)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from lensjax import parallel
    parallel.initialize_distributed(args.multihost)
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    try:
        manifest = sample_workdir(
            args.workdir, args.num, args.out, sampler=args.sampler, steps=args.steps,
            eta=args.eta, seed=args.seed, checkpoint=args.checkpoint,
            batch_size=args.batch_size, force=args.force, progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['num']} samples ({json.dumps(manifest['sampler'])}) of checkpoint "
          f"step {manifest['checkpoint']['step']} to {Path(args.out) / SAMPLES_DIR}")
    return 0


if __name__ == "__main__":
    hugepages.restart_with_hugepages()
    sys.exit(main())
