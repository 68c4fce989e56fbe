"""lensjax.data.deeplense reads the official layouts (written by lensjax.sim.export) exactly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lensjax.data import deeplense as dl
from lensjax.sim.export import export_preset

SEED = 3
SIM_CLASSES = ("no_sub", "cdm", "axion")


# preset -> (files per class, extra export_preset kwargs). Exporting is nearly all XLA
# compilation (seconds per preset), so only these three are simulated; the other layouts
# are assembled from their files below, exactly as shared/SIMULATION.md specifies them
# (tests/sim/test_export.py holds the exporter to the same layouts).
EXPORTS = {"common_test": (3, {"val_per_class": 2}), "foundation": (3, {}),
           "model_i": (2, {})}


def _mean_pool_2x2(image: np.ndarray) -> np.ndarray:
    c, h, w = image.shape
    return image.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name) -> manual dir of a tiny dataset in the official layout (made once).

    common_test, foundation, model_i: written by export_preset. model_ii: the foundation
    files in a single root (both are Model II 64x64 files). diffusion: 4 common_test images
    as Samples/sample<i>.npy. superres: the 5 common_test "no" images as Dataset/HR and
    their 2x2 mean-pools as Dataset/LR (the superres preset's recipe).
    """
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        out = tmp_path_factory.mktemp(name) / "manual"
        if name in EXPORTS:
            num, extra = EXPORTS[name]
            export_preset(name, out, num, SEED, batch_size=num, progress=False, **extra)
        elif name == "model_ii":
            shutil.copytree(get("foundation") / "Dataset", out)
        elif name == "diffusion":
            sources = sorted((get("common_test") / "dataset/train").rglob("*.npy"))[:4]
            (out / "Samples").mkdir(parents=True)
            for i, src in enumerate(sources, 1):
                shutil.copy(src, out / f"Samples/sample{i}.npy")
        elif name == "superres":
            sources = sorted((get("common_test") / "dataset").glob("*/no/*.npy"))
            for sub in ("HR", "LR"):
                (out / "Dataset" / sub).mkdir(parents=True)
            for i, src in enumerate(sources, 1):
                shutil.copy(src, out / f"Dataset/HR/sample{i}.npy")
                np.save(out / f"Dataset/LR/sample{i}.npy", _mean_pool_2x2(np.load(src)))
        cache[name] = out
        return out

    return get


@pytest.fixture()
def data_dir(tmp_path):
    return tmp_path / "tfds"


def _examples(builder, split):
    import tensorflow_datasets as tfds
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    for ex in examples:
        ex["file"] = ex["file"].decode()
    return sorted(examples, key=lambda ex: ex["file"])


def _all_npy(root: Path, under: str = "") -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / under).rglob("*.npy")
                  if not any(part.startswith(".") or part == "__MACOSX"
                             for part in p.relative_to(root).parts))


def _check_split_files(builder, manual: Path, files: dict[str, list[str]], under: str,
                       lr: bool = False) -> None:
    """Builder splits hold exactly `files`; splits are disjoint and cover every file."""
    assert set(builder.info.splits) == set(files)
    for split, names in files.items():
        assert builder.info.splits[split].num_examples == len(names)
        assert [ex["file"] for ex in _examples(builder, split)] == names
    every = [f for names in files.values() for f in names]
    assert len(every) == len(set(every))
    assert sorted(every) == _all_npy(manual, f"{under}/HR" if lr else under)


def _check_labelled(builder, manual: Path, classes: tuple[str, ...], hw, axion: bool) -> None:
    for split in builder.info.splits:
        for ex in _examples(builder, split):
            path = manual / ex["file"]
            assert ex["image"].shape == (*hw, 1) and ex["image"].dtype == np.float32
            assert classes[ex["label"]] == path.parent.name
            if axion and path.parent.name == "axion":
                image, mass = np.load(path, allow_pickle=True)
                assert mass > 0 and ex["axion_mass"] == np.float32(mass)
            else:
                image = np.load(path)   # no pickle: only axion files are pickled
                if axion:
                    assert ex["axion_mass"] == 0.0
            image = np.asarray(image, np.float32).reshape(hw)
            np.testing.assert_array_equal(ex["image"][..., 0], image)


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------

def test_common_test(exported, tmp_path, data_dir):
    manual = tmp_path / "ct"
    shutil.copytree(exported("common_test"), manual)
    # macOS zip debris that must be skipped: a __MACOSX tree and hidden files.
    (manual / "__MACOSX/dataset/train/no").mkdir(parents=True)
    (manual / "__MACOSX/dataset/train/no/._0.npy").write_bytes(b"\0\5\26\7 garbage")
    (manual / "dataset/train/no/._0.npy").write_bytes(b"\0\5\26\7 garbage")
    (manual / "dataset/train/no/.DS_Store").write_bytes(b"garbage")
    builder = dl.build("deeplense_common_test", manual, data_dir)
    files = dl.list_split_files("deeplense_common_test", manual)
    assert {k: len(v) for k, v in files.items()} == {"train": 6, "selection": 3, "val": 6}
    for split, names in files.items():   # the selection slice is stratified per class
        for cls in ("no", "sphere", "vort"):
            expected = 2 if split == "val" else (1 if split == "selection" else 2)
            assert sum(f"/{cls}/" in n for n in names) == expected
    assert all(f.startswith("dataset/val/") for f in files["val"])
    assert all(f.startswith("dataset/train/") for f in files["train"] + files["selection"])
    _check_split_files(builder, manual, files, "dataset")
    _check_labelled(builder, manual, ("no", "sphere", "vort"), (150, 150), axion=False)
    assert builder.info.features["label"].names == ["no", "sphere", "vort"]
    assert dl.class_names("deeplense_common_test") == ("no", "sphere", "vort")
    assert dl.heldout_split("deeplense_common_test") == "val"
    assert (dl.train_split("common_test"), dl.selection_split("common_test")) == \
        ("train", "selection")
    # load() reuses the prepared copy and yields dicts.
    ds = dl.load("deeplense_common_test", manual, "val", data_dir=data_dir)
    assert sum(1 for _ in ds) == 6


def test_foundation(exported, data_dir):
    manual = exported("foundation")
    builder = dl.build("foundation", manual, data_dir)
    files = dl.list_split_files("foundation", manual)
    # 3 per class: one test file and one selection file per class, stratified.
    assert {k: len(v) for k, v in files.items()} == {"train": 3, "selection": 3, "test": 3}
    _check_split_files(builder, manual, files, "Dataset")
    _check_labelled(builder, manual, SIM_CLASSES, (64, 64), axion=True)
    masses = [ex["axion_mass"] for s in files for ex in _examples(builder, s) if ex["label"] == 2]
    assert len(masses) == 3 and all(1e-24 <= m <= 1e-22 for m in masses)
    assert dl.heldout_split("foundation") == "test"


def test_model_i_single_root(exported, data_dir):
    manual = exported("model_i")
    builder = dl.build("deeplense_model_i", manual, data_dir)
    files = dl.list_split_files("deeplense_model_i", manual)
    # 2 per class: one test file each, and no selection split (empty splits are omitted).
    assert {k: len(v) for k, v in files.items()} == {"train": 3, "test": 3}
    _check_split_files(builder, manual, files, "")
    _check_labelled(builder, manual, SIM_CLASSES, (150, 150), axion=True)


def test_model_ii_and_iii_train_test_roots(exported, tmp_path, data_dir):
    manual = exported("model_ii")
    builder = dl.build("deeplense_model_ii", manual, data_dir)
    _check_split_files(builder, manual, dl.list_split_files("model_ii", manual), "")
    _check_labelled(builder, manual, SIM_CLASSES, (64, 64), axion=True)
    # Model III has Model II's file format: reuse those files as shipped train/ + test/ roots.
    root = tmp_path / "model_iii"
    for cls in SIM_CLASSES:
        names = sorted(p.name for p in (manual / cls).glob("*.npy"))
        for split, chosen in (("train", names[:2]), ("test", names[2:])):
            (root / split / cls).mkdir(parents=True)
            for name in chosen:
                shutil.copy(manual / cls / name, root / split / cls / name)
    builder = dl.build("deeplense_model_iii", root, data_dir)
    files = dl.list_split_files("deeplense_model_iii", root)
    assert sorted(files["test"]) == _all_npy(root, "test")
    assert sorted(files["train"] + files["selection"]) == _all_npy(root, "train")
    assert {k: len(v) for k, v in files.items()} == {"train": 3, "selection": 3, "test": 3}
    _check_split_files(builder, root, files, "")
    _check_labelled(builder, root, SIM_CLASSES, (64, 64), axion=True)


def test_diffusion(exported, data_dir):
    manual = exported("diffusion")
    builder = dl.build("deeplense_diffusion", manual, data_dir)
    files = dl.list_split_files("diffusion", manual)
    # Half held out by default (FID needs a held-out real set as large as the samples).
    assert {k: len(v) for k, v in files.items()} == {"train": 1, "selection": 1, "test": 2}
    _check_split_files(builder, manual, files, "Samples")
    assert "label" not in builder.info.features and dl.class_names("diffusion") == ()
    for ex in _examples(builder, "train+selection+test"):
        assert ex["image"].shape == (150, 150, 1) and ex["image"].dtype == np.float32
        np.testing.assert_array_equal(ex["image"][..., 0], np.load(manual / ex["file"])[0])


def test_superres(exported, data_dir):
    manual = exported("superres")
    builder = dl.build("deeplense_superres", manual, data_dir)
    files = dl.list_split_files("superres", manual)
    # 5 pairs: round(0.5) = 1 test; round(0.4) = 0 selection, but a split of >= 2 files
    # always holds out at least one.
    assert {k: len(v) for k, v in files.items()} == {"train": 3, "selection": 1, "test": 1}
    _check_split_files(builder, manual, files, "Dataset", lr=True)
    for ex in _examples(builder, "train+selection+test"):
        hr_path = manual / ex["file"]
        assert ex["hr"].shape == (150, 150, 1) and ex["lr"].shape == (75, 75, 1)
        assert ex["hr"].dtype == ex["lr"].dtype == np.float32
        np.testing.assert_array_equal(ex["hr"][..., 0], np.load(hr_path)[0])
        np.testing.assert_array_equal(ex["lr"][..., 0],
                                      np.load(manual / "Dataset/LR" / hr_path.name)[0])


# ----------------------------------------------------------------------------
# Seeded splits and split.json
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_listing(tmp_path_factory):
    """A foundation tree of 100/50/30 empty files: listing and splitting never read them."""
    manual = tmp_path_factory.mktemp("listing")
    for cls, n in zip(SIM_CLASSES, (100, 50, 30)):
        (manual / "Dataset" / cls).mkdir(parents=True)
        for i in range(n):
            (manual / "Dataset" / cls / f"{cls}_sim_{7919 * i + 13}.npy").touch()
    return manual


def test_seeded_split_is_deterministic_stratified_and_disjoint(big_listing):
    files = dl.list_split_files("foundation", big_listing, split_seed=0)
    assert files == dl.list_split_files("foundation", big_listing, split_seed=0)
    every = [f for names in files.values() for f in names]
    assert len(every) == len(set(every)) == 180 and sorted(every) == _all_npy(big_listing)
    # Per class: 10% (rounded half up) to test, then 10% of the rest to selection.
    for cls, (test, selection, train) in zip(SIM_CLASSES, ((10, 9, 81), (5, 5, 40),
                                                            (3, 3, 24))):
        count = {k: sum(f"/{cls}/" in f for f in v) for k, v in files.items()}
        assert count == {"test": test, "selection": selection, "train": train}
    other = dl.list_split_files("foundation", big_listing, split_seed=1)
    assert other["test"] != files["test"]
    assert sorted(f for v in other.values() for f in v) == sorted(every)
    custom = dl.list_split_files("foundation", big_listing, test_fraction=0.2,
                                 selection_fraction=0.0)
    assert set(custom) == {"train", "test"} and len(custom["test"]) == 20 + 10 + 6
    assert dl.make_config("foundation", 5, 0.2, 0.0).name == "seed5_test20_sel0"
    assert dl.make_config("foundation", 5).name == "seed5"
    with pytest.raises(ValueError, match="split_seed"):
        dl.make_config("foundation", -1)


def test_write_split_and_record_split(big_listing, tmp_path):
    workdir = tmp_path / "work"
    (workdir).mkdir()
    (workdir / "split.json").write_text(json.dumps({"sim": {"seed": 9}}))
    files = dl.list_split_files("foundation", big_listing, split_seed=4)
    path = dl.write_split(workdir, "deeplense_foundation", files, seed=4)
    record = json.loads(path.read_text())
    assert record["sim"] == {"seed": 9}   # other entries are kept
    entry = record["deeplense_foundation"]
    assert entry["seed"] == 4 and entry["files"] == files
    assert entry["counts"] == {k: len(v) for k, v in files.items()}
    dl.record_split(workdir, "foundation", big_listing, split_seed=4)
    entry = json.loads(path.read_text())["deeplense_foundation"]
    assert entry["files"] == files and entry["tfds_config"] == "seed4"
    assert entry["manual_dir"] == str(big_listing)


def test_builder_split_seed_config(exported, data_dir):
    manual = exported("foundation")
    builder = dl.build("foundation", manual, data_dir, split_seed=SEED + 1)
    assert builder.builder_config.name == f"seed{SEED + 1}"
    files = dl.list_split_files("foundation", manual, split_seed=SEED + 1)
    assert builder.split_files(manual) == files
    assert files != dl.list_split_files("foundation", manual)
    _check_split_files(builder, manual, files, "Dataset")
    # A prepared copy is only reused for the same listing.
    fresh = dl.get_builder("foundation", data_dir, split_seed=SEED + 1)
    assert fresh.is_prepared() and fresh.info.metadata["split_files_sha256"]


# ----------------------------------------------------------------------------
# Bad data: loud errors that name the file and the fix
# ----------------------------------------------------------------------------

@pytest.fixture()
def foundation_copy(exported, tmp_path):
    manual = tmp_path / "foundation"
    shutil.copytree(exported("foundation"), manual)
    return manual


def _first(manual: Path, cls: str) -> Path:
    return sorted((manual / "Dataset" / cls).glob("*.npy"))[0]


def _expect_error(name, manual, data_dir, exc, path):
    with pytest.raises(exc) as info:
        dl.build(name, manual, data_dir)
    assert str(path) in str(info.value)
    assert not dl.get_builder(name, data_dir).is_prepared()
    return str(info.value)


def test_missing_folder(exported, tmp_path, data_dir):
    manual = tmp_path / "ct"
    shutil.copytree(exported("common_test"), manual)
    shutil.rmtree(manual / "dataset/val/sphere")
    message = _expect_error("common_test", manual, data_dir, FileNotFoundError,
                            manual / "dataset/val/sphere")
    assert "dataset/{train,val}/{no,sphere,vort}" in message
    _expect_error("model_ii", tmp_path / "nowhere", data_dir, FileNotFoundError,
                  tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan", "shape", "pickled",
                                    "axion_plain", "axion_nan_mass"])
def test_bad_file(foundation_copy, data_dir, damage):
    cls = "axion" if damage.startswith("axion") else ("cdm" if damage == "pickled" else "no_sub")
    path = _first(foundation_copy, cls)
    if damage == "garbage":
        path.write_bytes(b"this is not a numpy file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "nan":
        image = np.load(path)
        image[3, 4] = np.nan
        np.save(path, image)
    elif damage == "shape":
        np.save(path, np.zeros((32, 32)))
    elif damage == "pickled":
        record = np.empty(2, dtype=object)
        record[:] = [np.load(path), 1e-23]
        np.save(path, record, allow_pickle=True)
    elif damage == "axion_plain":
        np.save(path, np.zeros((64, 64)))
    elif damage == "axion_nan_mass":
        record = np.load(path, allow_pickle=True)
        record[1] = float("nan")
        np.save(path, record, allow_pickle=True)
    message = _expect_error("foundation", foundation_copy, data_dir, ValueError, path)
    assert "Fix:" in message


def test_unpaired_superres(exported, tmp_path, data_dir):
    manual = tmp_path / "sr"
    shutil.copytree(exported("superres"), manual)
    (manual / "Dataset/LR/sample2.npy").unlink()
    message = _expect_error("superres", manual, data_dir, ValueError,
                            manual / "Dataset/HR/sample2.npy")
    assert "unpaired" in message
    with pytest.raises(ValueError, match="sample2.npy"):
        dl.list_split_files("superres", manual)


def test_prepared_copy_of_other_files_is_refused(foundation_copy, data_dir):
    dl.build("foundation", foundation_copy, data_dir)
    _first(foundation_copy, "cdm").unlink()
    with pytest.raises(ValueError, match="delete"):
        dl.load("foundation", foundation_copy, "train", data_dir=data_dir)


def test_read_example_infers_the_label(exported):
    manual = exported("foundation")
    rel = dl.list_split_files("foundation", manual)["test"][0]   # sorted: axion first
    example = dl.read_example("foundation", manual, rel)
    assert example["label"] == 2 and example["axion_mass"] > 0


def test_tensorflow_stays_inside_deeplense():
    import tensorflow as tf
    assert tf.config.get_visible_devices("GPU") == []
    code = "import sys, lensjax.data; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_unknown_name():
    with pytest.raises(ValueError, match="deeplense_common_test"):
        dl.class_names("common_tset")
