"""Write simulated DeepLense data in the exact on-disk layout of the official datasets.

    python -m lensjax.sim.export --preset common_test --num-per-class 10000 --out data/ct --seed 0

Layouts (shared/SIMULATION.md, "Official on-disk layouts"):

- common_test: DIR/dataset/{train,val}/{no,sphere,vort}/<i>.npy, float32 (1,150,150) in [0,1]
- diffusion:   DIR/Samples/sample<i>.npy, i = 1..N, float32 (1,150,150) in [0,1]
- superres:    DIR/Dataset/{HR,LR}/sample<i>.npy, float32 (1,150,150) and (1,75,75)
- foundation:  DIR/Dataset/{no_sub,cdm,axion}/<class>_sim_<128-bit int>.npy, float64 (64,64)
- model_i/ii/iii: DIR/{no_sub,cdm,axion}/<class>_sim_<128-bit int>.npy, float64 raw values
  ((150,150) for Model I, (64,64) for Models II/III)

Axion files hold a pickled object array [image, axion mass in eV] like the official ones.

Example n of class c in split s uses the key fold_in(fold_in(fold_in(key(seed), s), c), n)
(the last fold is `Preset.sample`'s start_index contract), so the files do not depend on
--batch-size, and a larger --num-per-class only appends files. Models I-III ship as a
train root and a test root: export the test root with a different --seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

import lensjax
from lensjax.sim.recipes import Preset, get_preset

MANIFEST_NAME = "lensjax_export.json"
MAX_SEED = 2**32  # jax.random.key silently wraps larger seeds
DEFAULT_BATCH_SIZE = 64


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

# write(batch, j, n) -> {relative path: array} for example j of a batch, file index n.
Writer = Callable[[dict[str, np.ndarray], int, int], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class _Job:
    """One stream of examples: a (split, class) pair with its own key."""

    split: str
    split_index: int
    group: str              # class name, or "samples" / "pairs" for unlabelled layouts
    key_index: int          # folded into the key after the split
    label: int | None       # forced class, or None for the preset's default mix
    count: int
    folders: tuple[str, ...]
    write: Writer


@dataclasses.dataclass(frozen=True)
class _Layout:
    name: str
    description: str
    jobs: tuple[_Job, ...]
    files: dict[str, Any]   # per-file shape/dtype, for the manifest


def _sim_name(preset_name: str, seed: int, class_name: str, index: int) -> str:
    """Deterministic `<class>_sim_<128-bit int>.npy` (official names are random 128-bit ints)."""
    digest = hashlib.blake2b(f"{preset_name}/{seed}/{class_name}/{index}".encode(),
                             digest_size=16).digest()
    return f"{class_name}_sim_{int.from_bytes(digest, 'big')}.npy"


def _axion_record(image: np.ndarray, axion_mass_ev: float) -> np.ndarray:
    """The official axion file content: object array (2,) = [image, mass in eV]."""
    record = np.empty(2, dtype=object)
    record[0] = image
    record[1] = float(axion_mass_ev)
    return record


def _unit(image: np.ndarray) -> np.ndarray:
    """float32 clipped to [0, 1]: min-max scaling by a reciprocal can overshoot by an ulp."""
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _common_test_layout(preset: Preset, num_per_class: int, val_per_class: int) -> _Layout:
    jobs = []
    for split_index, (split, count) in enumerate((("train", num_per_class), ("val", val_per_class))):
        for c, cls in enumerate(preset.class_names):
            folder = f"dataset/{split}/{cls}"
            jobs.append(_Job(split, split_index, cls, c, c, count, (folder,),
                             lambda b, j, n, folder=folder: {
                                 f"{folder}/{n}.npy": _unit(b["images"][j][None])}))
    n = preset.num_pix
    return _Layout("common_test_i", "Common Test I: dataset/{train,val}/{no,sphere,vort}/<i>.npy",
                   tuple(jobs), {"shape": [1, n, n], "dtype": "float32", "range": [0.0, 1.0]})


def _diffusion_layout(preset: Preset, num: int) -> _Layout:
    job = _Job("all", 0, "samples", 0, None, num, ("Samples",),
               lambda b, j, n: {f"Samples/sample{n + 1}.npy": _unit(b["images"][j][None])})
    n = preset.num_pix
    return _Layout("specific_test_iv_diffusion", "Specific Test IV: Samples/sample<i>.npy, i = 1..N",
                   (job,), {"shape": [1, n, n], "dtype": "float32", "range": [0.0, 1.0]})


def _superres_layout(preset: Preset, num: int) -> _Layout:
    def write(b, j, n):
        name = f"sample{n + 1}.npy"
        return {f"Dataset/HR/{name}": _unit(b["images"][j][None]),
                f"Dataset/LR/{name}": _unit(b["lr_image"][j][None])}

    job = _Job("all", 0, "pairs", 0, None, num, ("Dataset/HR", "Dataset/LR"), write)
    hr, lr = preset.num_pix, preset.lr_shape[0]
    return _Layout("specific_test_vi_b_superres",
                   "Specific Test VI.B: Dataset/{HR,LR}/sample<i>.npy, paired by name",
                   (job,), {"HR": {"shape": [1, hr, hr], "dtype": "float32", "range": [0.0, 1.0]},
                            "LR": {"shape": [1, lr, lr], "dtype": "float32", "range": [0.0, 1.0]}})


def _deeplensesim_layout(preset: Preset, seed: int, num_per_class: int, prefix: str,
                         layout_name: str, description: str) -> _Layout:
    jobs = []
    for c, cls in enumerate(preset.class_names):
        folder = f"{prefix}{cls}"

        def write(b, j, n, folder=folder, cls=cls):
            image = b["images"][j].astype(np.float64)
            content = _axion_record(image, b["axion_mass_ev"][j]) if cls == "axion" else image
            return {f"{folder}/{_sim_name(preset.name, seed, cls, n)}": content}

        jobs.append(_Job("all", 0, cls, c, c, num_per_class, (folder,), write))
    n = preset.num_pix
    return _Layout(layout_name, description, tuple(jobs),
                   {"shape": [n, n], "dtype": "float64", "normalised": False,
                    "axion": "object array (2,) = [image, axion mass in eV]; np.load(allow_pickle=True)"})


def _layout(preset: Preset, seed: int, num_per_class: int, val_per_class: int | None) -> _Layout:
    name = preset.name
    if val_per_class is not None and name != "common_test":
        raise ValueError(f"--val-per-class only applies to the common_test preset (the only "
                         f"official layout with a split), not {name!r}")
    if name == "common_test":
        val = max(1, num_per_class // 4) if val_per_class is None else val_per_class
        return _common_test_layout(preset, num_per_class, val)
    if name == "diffusion":
        return _diffusion_layout(preset, num_per_class)
    if name == "superres":
        return _superres_layout(preset, num_per_class)
    if name == "foundation":
        return _deeplensesim_layout(
            preset, seed, num_per_class, "Dataset/", "specific_test_vi_a_foundation",
            "Specific Test VI.A: Dataset/{no_sub,cdm,axion}/<class>_sim_<128-bit int>.npy")
    if name in ("model_i", "model_ii", "model_iii"):
        return _deeplensesim_layout(
            preset, seed, num_per_class, "", f"deeplensesim_{name}",
            "DeepLenseSim models: {no_sub,cdm,axion}/<class>_sim_<int>.npy")
    raise ValueError(f"preset {name!r} has no official on-disk layout")


EXPORTABLE_PRESETS: tuple[str, ...] = ("common_test", "diffusion", "superres", "foundation",
                                       "model_i", "model_ii", "model_iii")


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------

def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a hidden temporary beside `path`, then rename: no half-written .npy."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=array.dtype == object)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"output directory {str(out_dir)!r} is not empty; pass --force "
                              f"(force=True) to write into it anyway")


def _batch_to_numpy(images, params) -> dict[str, np.ndarray]:
    """One device->host transfer per batch: images and lr_image (B, h, w), axion_mass_ev (B,)."""
    wanted = {"images": images[..., 0]}
    if "lr_image" in params:
        wanted["lr_image"] = params["lr_image"][..., 0]
    if "axion_mass_ev" in params:
        wanted["axion_mass_ev"] = params["axion_mass_ev"]
    return jax.device_get(wanted)


def export_preset(preset_name: str, out_dir: str | os.PathLike, num_per_class: int, seed: int,
                  force: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                  val_per_class: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Simulate `preset_name` and write it in its official layout under `out_dir`.

    num_per_class: files per class (per split for common_test's train; the total for the
    unlabelled diffusion and superres layouts). val_per_class: common_test only; default
    max(1, num_per_class // 4), the official 10,000 : 2,500 ratio.
    Returns the manifest written to out_dir/lensjax_export.json plus "out_dir" and "seconds".
    """
    if preset_name not in EXPORTABLE_PRESETS:
        raise ValueError(f"unknown preset {preset_name!r} (or one without an official "
                         f"layout); valid presets: {', '.join(EXPORTABLE_PRESETS)}")
    num_per_class = _check_int("num_per_class", num_per_class, 1)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    batch_size = _check_int("batch_size", batch_size, 1)
    if val_per_class is not None:
        val_per_class = _check_int("val_per_class", val_per_class, 0)
    out = Path(out_dir)
    _check_out_dir(out, force)

    preset = get_preset(preset_name)
    layout = _layout(preset, seed, num_per_class, val_per_class)
    root_key = jax.random.key(seed)
    # One chunk size for the whole export: one compilation per forced class.
    chunk = min(batch_size, max(job.count for job in layout.jobs))
    start_time = time.perf_counter()

    for job in layout.jobs:
        for folder in job.folders:
            (out / folder).mkdir(parents=True, exist_ok=True)
    total = sum(job.count * len(job.folders) for job in layout.jobs)
    written: set[Path] = set()
    counts: dict[str, dict[str, int]] = {}
    with tqdm(total=total, desc=f"export {preset_name}", unit="file", disable=not progress) as bar:
        for job in layout.jobs:
            key = jax.random.fold_in(jax.random.fold_in(root_key, job.split_index), job.key_index)
            for start in range(0, job.count, chunk):
                images, _, params = preset.sample(key, chunk, label=job.label, start_index=start)
                batch = _batch_to_numpy(images, params)
                if not np.all(np.isfinite(batch["images"])):
                    raise RuntimeError(f"preset {preset_name!r} produced non-finite pixels "
                                       f"(split {job.split}, {job.group}, examples {start}+)")
                for j in range(min(chunk, job.count - start)):
                    for rel, array in job.write(batch, j, start + j).items():
                        path = out / rel
                        if path in written:
                            raise RuntimeError(f"file name collision at {path}")
                        _save_atomic(path, array)
                        written.add(path)
                        bar.update(1)
            counts.setdefault(job.split, {})[job.group] = job.count

    # --force into an earlier export: drop its files that this export did not rewrite,
    # and temporaries left by a killed run.
    for job in layout.jobs:
        for folder in job.folders:
            for stale in [*(out / folder).glob("*.npy"), *(out / folder).glob(".*.npy.tmp")]:
                if stale not in written:
                    stale.unlink()

    manifest = {
        "format": "lensjax_export",
        "format_version": 1,
        "layout": layout.name,
        "layout_description": layout.description,
        "preset": preset_name,
        "describe": preset.describe(),
        "class_names": list(preset.class_names),
        "seed": seed,
        "counts": counts,
        "num_files": len(written),
        "files": layout.files,
        "key_derivation": ("example n of class c (0 if unlabelled) in split s: fold_in("
                           "fold_in(fold_in(jax.random.key(seed), s), c), n); splits " +
                           ", ".join(sorted({f"{j.split}={j.split_index}" for j in layout.jobs}))),
        "lensjax_version": lensjax.__version__,
        "jax_version": jax.__version__,
    }
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return dict(manifest, out_dir=str(out), seconds=time.perf_counter() - start_time)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensjax.sim.export",
        description="Simulate a DeepLense preset and write it in the official on-disk layout.",
        epilog="Presets: " + ", ".join(EXPORTABLE_PRESETS) + ". Example: python -m "
               "lensjax.sim.export --preset common_test --num-per-class 10000 --out data/ct --seed 0")
    parser.add_argument("--preset", required=True, help="preset name (see below)")
    parser.add_argument("--num-per-class", type=int, required=True,
                        help="files per class (common_test: per class in train; diffusion, "
                             "superres: total)")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help=f"root seed in [0, {MAX_SEED})")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty directory (overwrites this layout's files "
                             "and removes stale .npy files in its folders)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="examples simulated per call (memory/speed only; files do not change)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="common_test only: files per class in val (default num_per_class//4, "
                             "at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        summary = export_preset(args.preset, args.out, args.num_per_class, args.seed,
                                force=args.force, batch_size=args.batch_size,
                                val_per_class=args.val_per_class, progress=not args.no_progress)
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_files']} files ({summary['layout']}) to {summary['out_dir']} "
          f"in {summary['seconds']:.1f} s; counts: {json.dumps(summary['counts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
