"""TFDS builders that read the official DeepLense on-disk layouts from a manual dir.

Builders (TFDS name: what `manual_dir` must hold -> features; shared/SIMULATION.md):

- deeplense_common_test: `dataset/{train,val}/{no,sphere,vort}/<int>.npy`, (1,150,150)
  -> image (150,150,1), label {no, sphere, vort}. A `__MACOSX/` folder and hidden files
  are skipped.
- deeplense_diffusion: `Samples/sample<i>.npy`, (1,150,150) -> image (150,150,1).
- deeplense_superres: `Dataset/{HR,LR}/sample<i>.npy`, paired by identical name
  -> hr (150,150,1), lr (75,75,1).
- deeplense_foundation: `Dataset/{no_sub,cdm,axion}/<class>_sim_<int>.npy`, (64,64)
  -> image (64,64,1), label {no_sub, cdm, axion}, axion_mass (eV; 0 for non-axion).
- deeplense_model_i (150x150), deeplense_model_ii, deeplense_model_iii (64x64):
  `{no_sub,cdm,axion}/<class>_sim_<int>.npy` in a single root, or in `train/` and
  `test/` subfolders of the root -> image (raw values), label, axion_mass.

Every example also has "file": its path relative to manual_dir (HR path for superres).
Images are stored HWC float32. Axion files are pickled object arrays [image, mass in eV]
and are the only files ever loaded with allow_pickle (only use files you trust).

Splits (all disjoint; "selection" is for model selection, never the reported set):
- common_test: "val" = the val/ folder; "train" + "selection" = the train/ folder, with a
  seeded 10% per class in "selection".
- model_* with train/ and test/: "test" = test/; train/ -> "train" + "selection".
- otherwise: a seeded `test_fraction` (10%; diffusion 50%, so that FID has >= 5,000
  held-out real images) per class goes to "test", then a seeded `selection_fraction`
  (10%) of the rest to "selection". So "train+selection" : "test" is 90:10.
The split depends only on `split_seed` (builder config, default 0) and the sorted
relative file names. Empty splits are omitted (tiny datasets). Record the lists with
`write_split(workdir, name, list_split_files(name, manual_dir, seed), seed)` or
`record_split(...)`.

    from lensjax.data import deeplense
    ds = deeplense.load("deeplense_foundation", "/data/vi_a", "train")   # dicts
    # plain TFDS works too:
    builder = deeplense.get_builder("deeplense_foundation", data_dir, split_seed=0)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/vi_a"))

TensorFlow is imported here and nowhere else in lensjax's data path; its GPUs are hidden.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from lensjax import parallel

parallel.hide_accelerators_from_tensorflow()

TRAIN, SELECTION, TEST, VAL = "train", "selection", "test", "val"
DEFAULT_SELECTION_FRACTION = 0.1
_NPY_MAGIC = b"\x93NUMPY"
_FIX_FILE = ("Fix: re-extract this file from the official archive (or delete it), then "
             "rebuild (delete the prepared TFDS folder if one was written).")


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Layout:
    name: str                       # TFDS builder name
    kind: str                       # "folders" | "samples" | "pairs" | "classes"
    top: str | None                 # folder expected directly under manual_dir
    layout: str                     # the expected tree, for messages
    image_hw: tuple[int, int]
    class_names: tuple[str, ...] = ()
    lr_hw: tuple[int, int] | None = None
    heldout: str = TEST
    default_test_fraction: float = 0.1

    @property
    def instructions(self) -> str:
        return (f"Download and extract the official data so that the manual dir holds\n"
                f"    {self.layout}\nthen pass that folder as manual_dir (TFDS: "
                f"tfds.download.DownloadConfig(manual_dir=...)). Or simulate it: python -m "
                f"lensjax.sim.export --preset {self.name.removeprefix('deeplense_')} "
                f"--num-per-class N --out DIR --seed S")


_DLS = ("no_sub", "cdm", "axion")
_DLS_TREE = "{no_sub,cdm,axion}/<class>_sim_<int>.npy (axion: pickled [image, mass in eV])"
LAYOUTS: dict[str, _Layout] = {l.name: l for l in (
    _Layout("deeplense_common_test", "folders", "dataset",
            "dataset/{train,val}/{no,sphere,vort}/<int>.npy, each (1,150,150)",
            (150, 150), ("no", "sphere", "vort"), heldout=VAL),
    _Layout("deeplense_diffusion", "samples", "Samples",
            "Samples/sample<i>.npy, each (1,150,150)", (150, 150), default_test_fraction=0.5),
    _Layout("deeplense_superres", "pairs", "Dataset",
            "Dataset/HR/sample<i>.npy (1,150,150) and Dataset/LR/sample<i>.npy (1,75,75), "
            "paired by identical names", (150, 150), lr_hw=(75, 75)),
    _Layout("deeplense_foundation", "classes", "Dataset",
            f"Dataset/{_DLS_TREE}, images (64,64)", (64, 64), _DLS),
    _Layout("deeplense_model_i", "classes", None,
            f"{_DLS_TREE} (or train/... and test/...), images (150,150)", (150, 150), _DLS),
    _Layout("deeplense_model_ii", "classes", None,
            f"{_DLS_TREE} (or train/... and test/...), images (64,64)", (64, 64), _DLS),
    _Layout("deeplense_model_iii", "classes", None,
            f"{_DLS_TREE} (or train/... and test/...), images (64,64)", (64, 64), _DLS),
)}


def _layout(name: str) -> _Layout:
    full = name if name.startswith("deeplense_") else f"deeplense_{name}"
    if full not in LAYOUTS:
        raise ValueError(f"unknown DeepLense dataset {name!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[full]


def class_names(name: str) -> tuple[str, ...]:
    """Class names in label order (empty for the unlabelled diffusion and superres sets)."""
    return _layout(name).class_names


def image_hw(name: str) -> tuple[int, int]:
    """(H, W) of the images of a layout (HR for super-resolution pairs)."""
    return _layout(name).image_hw


def train_split(name: str) -> str:
    """TFDS split to train on."""
    _layout(name)
    return TRAIN


def selection_split(name: str) -> str:
    """TFDS split for model selection (a seeded slice of the training files)."""
    _layout(name)
    return SELECTION


def heldout_split(name: str) -> str:
    """TFDS split that is reported: "val" for Common Test I, "test" otherwise."""
    return _layout(name).heldout


# ----------------------------------------------------------------------------
# Listing files and splitting them
# ----------------------------------------------------------------------------

class _Item(NamedTuple):
    rel: str       # path relative to manual_dir, posix separators
    label: int     # -1 when unlabelled


def _root(layout: _Layout, manual_dir: Path) -> Path:
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"manual_dir {manual_dir} does not exist or is not a folder. "
                                f"{layout.instructions}")
    if layout.top is None or manual_dir.name == layout.top:
        return manual_dir
    if not (manual_dir / layout.top).is_dir():
        raise FileNotFoundError(f"missing folder {manual_dir / layout.top} ({layout.name}). "
                                f"{layout.instructions}")
    return manual_dir / layout.top


def _npy_names(folder: Path, layout: _Layout) -> list[str]:
    """Sorted visible *.npy file names in `folder` (hidden and AppleDouble files skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder {folder} ({layout.name}). "
                                f"{layout.instructions}")
    names = sorted(e.name for e in os.scandir(folder)
                   if e.name.endswith(".npy") and not e.name.startswith(".") and e.is_file())
    if not names:
        raise FileNotFoundError(f"no .npy files in {folder} ({layout.name}); an archive was "
                                f"probably extracted incompletely. {layout.instructions}")
    return names


def _held_count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least 1 and at most n - 1 when n >= 2 and fraction > 0."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(int(np.floor(n * fraction + 0.5)), 1), n - 1)


def _seeded_take(items: list[_Item], fraction: float, seed: int,
                 stream: str) -> tuple[list[_Item], list[_Item]]:
    """(held, kept): a seeded random `fraction` of `items` and the rest, both sorted."""
    items = sorted(items)
    k = _held_count(len(items), fraction)
    order = np.random.default_rng([seed, zlib.crc32(stream.encode())]).permutation(len(items))
    held = sorted(items[i] for i in order[:k])
    return held, sorted(items[i] for i in order[k:])


def _split_items(layout: _Layout, manual_dir: Path, config: "DeepLenseConfig"
                 ) -> dict[str, list[_Item]]:
    """Every split's examples (only non-empty splits, in train/selection/held-out order)."""
    manual_dir = Path(manual_dir)
    root = _root(layout, manual_dir)
    seed = config.split_seed

    def rel(path: Path) -> str:
        return path.relative_to(manual_dir).as_posix()

    def labelled(folder: Path) -> dict[str, list[_Item]]:
        return {cls: [_Item(rel(folder / cls / f), label)
                      for f in _npy_names(folder / cls, layout)]
                for label, cls in enumerate(layout.class_names)}

    held_by_class: dict[str, list[_Item]] = {}
    if layout.kind == "folders" or (layout.kind == "classes" and (root / TRAIN).is_dir()):
        train_by_class = labelled(root / TRAIN)
        held_by_class = labelled(root / (VAL if layout.kind == "folders" else TEST))
    elif layout.kind == "classes":
        train_by_class = {}
        for cls, items in labelled(root).items():
            held_by_class[cls], train_by_class[cls] = _seeded_take(
                items, config.test_fraction, seed, f"{TEST}/{cls}")
    else:
        folder = root / "HR" if layout.kind == "pairs" else root
        names = _npy_names(folder, layout)
        if layout.kind == "pairs":
            lr_names = _npy_names(root / "LR", layout)
            unpaired = sorted([str(root / "HR" / n) for n in set(names) - set(lr_names)]
                              + [str(root / "LR" / n) for n in set(lr_names) - set(names)])
            if unpaired:
                raise ValueError(
                    f"{len(unpaired)} unpaired super-resolution file(s) ({layout.name}: HR and "
                    f"LR files pair by identical name): {', '.join(unpaired[:10])}"
                    f"{' ...' if len(unpaired) > 10 else ''}. Fix: restore the missing "
                    f"partner of each file, or delete the unpaired files.")
        held, train = _seeded_take([_Item(rel(folder / n), -1) for n in names],
                                   config.test_fraction, seed, f"{TEST}/all")
        held_by_class, train_by_class = {"all": held}, {"all": train}

    splits: dict[str, list[_Item]] = {TRAIN: [], SELECTION: [], layout.heldout: []}
    for cls, items in train_by_class.items():
        selection, train = _seeded_take(items, config.selection_fraction, seed,
                                        f"{SELECTION}/{cls}")
        splits[TRAIN] += train
        splits[SELECTION] += selection
    for items in held_by_class.values():
        splits[layout.heldout] += items
    return {k: sorted(v) for k, v in splits.items() if v}


def list_split_files(name: str, manual_dir: str | os.PathLike, split_seed: int = 0,
                     test_fraction: float | None = None,
                     selection_fraction: float | None = None) -> dict[str, list[str]]:
    """{split: sorted file paths relative to manual_dir} exactly as the builder splits them."""
    layout = _layout(name)
    config = make_config(layout.name, split_seed, test_fraction, selection_fraction)
    items = _split_items(layout, Path(manual_dir).expanduser(), config)
    return {split: [item.rel for item in split_items] for split, split_items in items.items()}


def _files_sha256(split_files: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(split_files, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------
# Recording the split
# ----------------------------------------------------------------------------

def write_split(workdir: str | os.PathLike, builder_name: str,
                split_files: dict[str, list[str]], seed: int,
                extra: dict[str, Any] | None = None) -> Path:
    """Write or update `workdir/split.json`: entry `builder_name` = seed, counts, file lists."""
    path = Path(workdir) / "split.json"
    record: dict[str, Any] = {}
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); delete or fix it") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path} does not hold a JSON object; delete or fix it")
    files = {split: [str(f) for f in names] for split, names in split_files.items()}
    record[builder_name] = {"seed": int(seed), "counts": {k: len(v) for k, v in files.items()},
                            "files_sha256": _files_sha256(files), **(extra or {}),
                            "files": files}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def record_split(workdir: str | os.PathLike, name: str, manual_dir: str | os.PathLike,
                 split_seed: int = 0, test_fraction: float | None = None,
                 selection_fraction: float | None = None) -> Path:
    """list_split_files + write_split, with manual_dir and the fractions in the entry."""
    config = make_config(name, split_seed, test_fraction, selection_fraction)
    files = list_split_files(name, manual_dir, split_seed, test_fraction, selection_fraction)
    return write_split(workdir, _layout(name).name, files, split_seed, extra={
        "manual_dir": str(Path(manual_dir).absolute()), "tfds_config": config.name,
        "test_fraction": config.test_fraction,
        "selection_fraction": config.selection_fraction})


# ----------------------------------------------------------------------------
# Reading and checking one file
# ----------------------------------------------------------------------------

def _load_npy(path: Path, allow_pickle: bool) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            if magic == _NPY_MAGIC:
                f.seek(0)
                return np.load(f, allow_pickle=allow_pickle)
        problem = f"it lacks the .npy header (first bytes {magic!r})"
    except Exception as err:  # numpy and pickle raise many types on corrupt data
        if not allow_pickle and "allow_pickle" in str(err):
            raise ValueError(
                f"{path} holds a pickled object array, but only axion-class files are "
                f"pickled, so it is not loaded. Fix: move it to the axion folder if it is an "
                f"axion record [image, mass], or delete it.") from err
        problem = f"{type(err).__name__}: {err}"
    raise ValueError(f"{path} cannot be read as a .npy array ({problem}). {_FIX_FILE}")


def _to_hwc(array: Any, hw: tuple[int, int], path: Path) -> np.ndarray:
    """(1,H,W), (H,W) or (H,W,1) numeric -> (H,W,1) float32, all finite."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{path}: dtype {a.dtype} is not a numeric image. {_FIX_FILE}")
    if a.shape == hw:
        a = a[..., None]
    elif a.shape == (1, *hw):
        a = a[0][..., None]
    elif a.shape != (*hw, 1):
        raise ValueError(f"{path}: image shape {a.shape}, expected {(1, *hw)} or {hw} for "
                         f"this dataset. Fix: delete the file, or read it with the builder of "
                         f"the dataset it belongs to.")
    out = a.astype(np.float32)
    bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    if bad:
        raise ValueError(f"{path}: {bad} non-finite pixel value(s) (NaN/Inf, as float32). "
                         f"{_FIX_FILE}")
    return out


def _axion_record(raw: np.ndarray, hw: tuple[int, int], path: Path) -> tuple[np.ndarray, float]:
    """Parse the official axion file: object array (2,) = [image, axion mass in eV]."""
    expected = f"an object array of shape (2,) = [image {hw}, axion mass in eV]"
    if raw.dtype != object or raw.shape != (2,):
        raise ValueError(f"{path}: an axion file must hold {expected}; got dtype {raw.dtype} "
                         f"and shape {raw.shape}. {_FIX_FILE}")
    mass = np.asarray(raw[1])
    if mass.size != 1 or mass.dtype.kind not in "iuf":
        raise ValueError(f"{path}: the second element of an axion record must be the axion "
                         f"mass in eV (a number); got {raw[1]!r}. {_FIX_FILE}")
    mass = float(mass.reshape(()))
    if not np.isfinite(mass) or mass <= 0:
        raise ValueError(f"{path}: axion mass {mass!r} is not a positive finite number of eV. "
                         f"{_FIX_FILE}")
    return _to_hwc(raw[0], hw, path), mass


def read_example(name: str, manual_dir: str | os.PathLike, rel: str,
                 label: int | None = None) -> dict[str, Any]:
    """One checked example as the builder stores it (numpy; ValueError on a bad file).

    rel: path relative to manual_dir (the HR file for superres); label: class index,
    by default taken from the name of the file's folder.
    """
    layout = _layout(name)
    path = Path(manual_dir) / rel
    if label is None:
        if path.parent.name not in layout.class_names and layout.class_names:
            raise ValueError(f"{path}: folder {path.parent.name!r} is not a class of "
                             f"{layout.name} {layout.class_names}")
        label = layout.class_names.index(path.parent.name) if layout.class_names else -1
    if layout.kind == "pairs":
        lr_path = path.parent.parent / "LR" / path.name
        return {"hr": _to_hwc(_load_npy(path, False), layout.image_hw, path),
                "lr": _to_hwc(_load_npy(lr_path, False), layout.lr_hw, lr_path), "file": rel}
    if layout.kind != "classes":
        example = {"image": _to_hwc(_load_npy(path, False), layout.image_hw, path), "file": rel}
        return example if label < 0 else dict(example, label=label)
    if layout.class_names[label] == "axion":
        image, mass = _axion_record(_load_npy(path, True), layout.image_hw, path)
    else:
        image, mass = _to_hwc(_load_npy(path, False), layout.image_hw, path), 0.0
    return {"image": image, "label": label, "axion_mass": np.float32(mass), "file": rel}


# ----------------------------------------------------------------------------
# TFDS builders
# ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class DeepLenseConfig(tfds.core.BuilderConfig):
    """Split parameters; they are part of the prepared dataset's identity (config name)."""

    split_seed: int = 0
    test_fraction: float = 0.1
    selection_fraction: float = DEFAULT_SELECTION_FRACTION


def make_config(name: str, split_seed: int = 0, test_fraction: float | None = None,
                selection_fraction: float | None = None) -> DeepLenseConfig:
    """Builder config "seed<S>" (plus "_test<pct>_sel<pct>" when the fractions differ)."""
    layout = _layout(name)
    test = layout.default_test_fraction if test_fraction is None else float(test_fraction)
    sel = DEFAULT_SELECTION_FRACTION if selection_fraction is None else float(selection_fraction)
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) \
            or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    for what, value in (("test_fraction", test), ("selection_fraction", sel)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {value}")
    config_name = f"seed{int(split_seed)}"
    if (test, sel) != (layout.default_test_fraction, DEFAULT_SELECTION_FRACTION):
        def pct(x: float) -> str:
            return f"{100 * x:g}".replace(".", "p")
        config_name += f"_test{pct(test)}_sel{pct(sel)}"
    return DeepLenseConfig(name=config_name, split_seed=int(split_seed), test_fraction=test,
                           selection_fraction=sel,
                           description=f"split_seed={split_seed}, test_fraction={test}, "
                                       f"selection_fraction={sel}")


def _features(layout: _Layout) -> dict[str, Any]:
    def image(hw: tuple[int, int]) -> tfds.features.Tensor:
        return tfds.features.Tensor(shape=(*hw, 1), dtype=np.float32)

    if layout.kind == "pairs":
        features = {"hr": image(layout.image_hw), "lr": image(layout.lr_hw)}
    else:
        features = {"image": image(layout.image_hw)}
    if layout.class_names:
        features["label"] = tfds.features.ClassLabel(names=list(layout.class_names))
    if layout.kind == "classes":
        features["axion_mass"] = tfds.features.Scalar(
            dtype=np.float32, doc="axion mass in eV (0 for no_sub and cdm)")
    features["file"] = tfds.features.Text(doc="path relative to manual_dir")
    return features


class _DeepLenseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads one official layout from `dl_manager.manual_dir` (see the module docstring)."""

    LAYOUT: _Layout
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        layout = self.LAYOUT
        return self.dataset_info_from_configs(
            description=f"{layout.name}: official DeepLense layout {layout.layout}.",
            features=tfds.features.FeaturesDict(_features(layout)),
            supervised_keys=("image", "label") if layout.class_names else None,
            homepage="https://ml4sci.org/", metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(os.fspath(dl_manager.manual_dir))
        items = _split_items(self.LAYOUT, manual_dir, self.builder_config)
        files = {split: [item.rel for item in v] for split, v in items.items()}
        self.info.metadata.update(manual_dir=str(manual_dir.absolute()),
                                  split_files_sha256=_files_sha256(files),
                                  split_counts={k: len(v) for k, v in files.items()})
        return {split: self._generate_examples(manual_dir, v) for split, v in items.items()}

    def split_files(self, manual_dir: str | os.PathLike) -> dict[str, list[str]]:
        """{split: relative file paths} as this builder's config splits manual_dir."""
        config = self.builder_config
        return list_split_files(self.name, manual_dir, config.split_seed, config.test_fraction,
                                config.selection_fraction)

    def _generate_examples(self, manual_dir: Path, items: list[_Item]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        for item in items:
            yield item.rel, read_example(self.LAYOUT.name, manual_dir, item.rel, item.label)


def _builder_class(layout: _Layout) -> type:
    class_name = "".join(part.capitalize() for part in layout.name.split("_"))
    return type(class_name, (_DeepLenseBuilder,), {
        "name": layout.name, "LAYOUT": layout, "__module__": __name__,
        "__doc__": f"TFDS builder for {layout.layout}.",
        "MANUAL_DOWNLOAD_INSTRUCTIONS": layout.instructions,
        # TFDS 4.9.10 derives code_path through the `importlib_resources` backport,
        # which it does not install; the answer is this file anyway.
        "code_path": epath.Path(__file__),
        "BUILDER_CONFIGS": [make_config(layout.name)]})


BUILDERS: dict[str, type] = {name: _builder_class(layout) for name, layout in LAYOUTS.items()}
DeeplenseCommonTest = BUILDERS["deeplense_common_test"]
DeeplenseDiffusion = BUILDERS["deeplense_diffusion"]
DeeplenseSuperres = BUILDERS["deeplense_superres"]
DeeplenseFoundation = BUILDERS["deeplense_foundation"]
DeeplenseModelI = BUILDERS["deeplense_model_i"]
DeeplenseModelIi = BUILDERS["deeplense_model_ii"]
DeeplenseModelIii = BUILDERS["deeplense_model_iii"]


def get_builder(name: str, data_dir: str | os.PathLike | None = None, *, split_seed: int = 0,
                test_fraction: float | None = None,
                selection_fraction: float | None = None) -> tfds.core.DatasetBuilder:
    """The (unprepared or prepared) builder for `name` with the given split parameters."""
    cls = BUILDERS[_layout(name).name]
    config = make_config(name, split_seed, test_fraction, selection_fraction)
    # TFDS refuses a new object named like a predefined config: pass the name instead.
    chosen = config.name if config.name in cls.builder_configs else config
    return cls(data_dir=None if data_dir is None else os.fspath(data_dir), config=chosen)


def build(name: str, manual_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None
          = None, **config_kwargs: Any) -> tfds.core.DatasetBuilder:
    """Prepare `name` from manual_dir into data_dir (once) and return the builder.

    A prepared copy is reused only if manual_dir still lists the same split files;
    otherwise a ValueError says which folder to delete. config_kwargs: split_seed,
    test_fraction, selection_fraction.
    """
    builder = get_builder(name, data_dir, **config_kwargs)
    if builder.is_prepared():
        if manual_dir is not None:
            files = list_split_files(name, manual_dir, **config_kwargs)
            built = builder.info.metadata.get("split_files_sha256")
            if built != _files_sha256(files):
                raise ValueError(
                    f"the prepared dataset {builder.data_dir} was built from "
                    f"{builder.info.metadata.get('manual_dir')!r} "
                    f"({builder.info.metadata.get('split_counts')}), which lists different "
                    f"files than {manual_dir} ({ {k: len(v) for k, v in files.items()} }). "
                    f"Fix: delete {builder.data_dir} to rebuild, or pass another data_dir.")
        return builder
    if manual_dir is None:
        raise ValueError(f"{name} is not prepared in {builder.data_dir}; pass manual_dir. "
                         f"{_layout(name).instructions}")
    manual = Path(manual_dir).expanduser().absolute()
    _root(_layout(name), manual)  # a clear error before TFDS's generic one
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    return builder


def load(name: str, manual_dir: str | os.PathLike | None, split: str,
         data_dir: str | os.PathLike | None = None, *, shuffle_files: bool = False,
         **config_kwargs: Any) -> tf.data.Dataset:
    """tf.data.Dataset of example dicts for `split` (any TFDS split string, e.g. "train")."""
    builder = build(name, manual_dir, data_dir, **config_kwargs)
    return builder.as_dataset(split=split, shuffle_files=shuffle_files)
