"""lensjax.sim.export writes the exact official DeepLense on-disk layouts, deterministically."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lensjax
from lensjax.sim import export, get_preset

SEED = 11
REPO_ROOT = Path(__file__).resolve().parents[2]

# preset -> (num_per_class, batch_size, extra kwargs). Small, and chosen so that the
# compiled sample functions are shared between tests (one compilation per forced class).
CONFIGS = {
    "common_test": (2, 64, {"val_per_class": 1}),
    "diffusion": (3, 64, {}),
    "superres": (3, 64, {}),
    "foundation": (2, 64, {}),
    "model_i": (1, 64, {}),
    "model_ii": (2, 64, {}),
    "model_iii": (3, 2, {}),     # chunks of 2 with a partial last chunk
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name) -> (root, summary), exporting each preset once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            num, batch, extra = CONFIGS[name]
            root = tmp_path_factory.mktemp(name) / "out"
            summary = export.export_preset(name, root, num, SEED, batch_size=batch,
                                           progress=False, **extra)
            cache[name] = (root, summary)
        return cache[name]

    return get


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tree(root: Path) -> set[str]:
    return set(_files(root))


def _load_manifest(root: Path) -> dict:
    return json.loads((root / export.MANIFEST_NAME).read_text())


def _check_manifest(root: Path, summary: dict, name: str, counts: dict) -> None:
    manifest = _load_manifest(root)
    assert manifest["preset"] == name
    assert manifest["describe"] == get_preset(name).describe()
    assert manifest["seed"] == SEED
    assert manifest["counts"] == counts
    assert manifest["lensjax_version"] == lensjax.__version__
    assert manifest["layout"] and manifest["key_derivation"]
    assert manifest["num_files"] == len(_tree(root)) - 1
    assert {k: v for k, v in summary.items() if k in manifest} == manifest


def _sim_ints(names, cls):
    pattern = re.compile(rf"^{cls}_sim_(\d+)\.npy$")
    values = []
    for name in names:
        match = pattern.match(name)
        assert match, name
        values.append(int(match.group(1)))
    assert all(0 <= v < 2**128 for v in values)
    assert len(set(values)) == len(values)
    return values


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

def test_common_test_layout(exported):
    root, summary = exported("common_test")
    expected = {export.MANIFEST_NAME}
    for split, count in (("train", 2), ("val", 1)):
        for cls in ("no", "sphere", "vort"):
            expected |= {f"dataset/{split}/{cls}/{i}.npy" for i in range(count)}
    assert _tree(root) == expected
    arrays = []
    for rel in sorted(expected - {export.MANIFEST_NAME}):
        array = np.load(root / rel)
        assert array.shape == (1, 150, 150) and array.dtype == np.float32
        assert array.min() == 0.0 and array.max() == 1.0
        arrays.append(array)
    # Every (split, class, index) has its own key: no two images coincide.
    assert len({a.tobytes() for a in arrays}) == len(arrays)
    _check_manifest(root, summary, "common_test",
                    {"train": {"no": 2, "sphere": 2, "vort": 2}, "val": {"no": 1, "sphere": 1, "vort": 1}})


def test_diffusion_layout(exported):
    root, summary = exported("diffusion")
    assert _tree(root) == {export.MANIFEST_NAME} | {f"Samples/sample{i}.npy" for i in (1, 2, 3)}
    for i in (1, 2, 3):
        array = np.load(root / f"Samples/sample{i}.npy")
        assert array.shape == (1, 150, 150) and array.dtype == np.float32
        assert 0.0 <= array.min() and array.max() <= 1.0
    _check_manifest(root, summary, "diffusion", {"all": {"samples": 3}})


def test_superres_layout_pairs_hr_and_mean_pooled_lr(exported):
    root, summary = exported("superres")
    names = {f"sample{i}.npy" for i in (1, 2, 3)}
    assert _tree(root) == ({export.MANIFEST_NAME} | {f"Dataset/HR/{n}" for n in names}
                           | {f"Dataset/LR/{n}" for n in names})
    for name in names:
        hr, lr = np.load(root / "Dataset/HR" / name), np.load(root / "Dataset/LR" / name)
        assert hr.shape == (1, 150, 150) and lr.shape == (1, 75, 75)
        assert hr.dtype == lr.dtype == np.float32
        assert hr.min() == 0.0 and hr.max() == 1.0
        assert 0.0 <= lr.min() and lr.max() <= 1.0
        pooled = hr.astype(np.float64).reshape(1, 75, 2, 75, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(lr, pooled, atol=1e-6)
    _check_manifest(root, summary, "superres", {"all": {"pairs": 3}})


def _check_deeplensesim_dir(base: Path, name: str, num: int, size: int) -> None:
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["axion", "cdm", "no_sub"]
    for cls in ("no_sub", "cdm", "axion"):
        names = sorted(p.name for p in (base / cls).iterdir())
        assert len(names) == num
        expected = {export._sim_name(name, SEED, cls, i) for i in range(num)}
        assert set(names) == expected
        _sim_ints(names, cls)
        for file_name in names:
            path = base / cls / file_name
            if cls == "axion":
                with pytest.raises(ValueError):      # pickled, exactly like the official files
                    np.load(path)
                record = np.load(path, allow_pickle=True)
                assert record.dtype == object and record.shape == (2,)
                image, mass = record
                assert isinstance(mass, float) and 1e-24 <= mass <= 1e-22
            else:
                image = np.load(path)
            assert isinstance(image, np.ndarray)
            assert image.shape == (size, size) and image.dtype == np.float64
            assert np.all(np.isfinite(image)) and image.min() >= 0.0
            assert image.max() > 1.0 or name != "model_i"   # raw counts, not normalised


def test_foundation_layout(exported):
    root, summary = exported("foundation")
    assert sorted(p.name for p in root.iterdir()) == ["Dataset", export.MANIFEST_NAME]
    _check_deeplensesim_dir(root / "Dataset", "foundation", 2, 64)
    _check_manifest(root, summary, "foundation", {"all": {"no_sub": 2, "cdm": 2, "axion": 2}})


@pytest.mark.parametrize("name, size", [("model_i", 150), ("model_ii", 64), ("model_iii", 64)])
def test_model_layouts(exported, name, size):
    root, summary = exported(name)
    num = CONFIGS[name][0]
    assert sorted(p.name for p in root.iterdir()) == ["axion", "cdm", export.MANIFEST_NAME, "no_sub"]
    _check_deeplensesim_dir(root, name, num, size)
    if name == "model_i":   # stored Poisson draws: whole numbers
        image = np.load(next((root / "cdm").iterdir()))
        np.testing.assert_array_equal(image, np.round(image))
    _check_manifest(root, summary, name, {"all": {c: num for c in ("no_sub", "cdm", "axion")}})


# ----------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------

def test_same_seed_gives_identical_files_and_names(exported, tmp_path):
    for name in ("foundation", "common_test"):
        root, _ = exported(name)
        num, batch, extra = CONFIGS[name]
        again = tmp_path / name
        export.export_preset(name, again, num, SEED, batch_size=batch, progress=False, **extra)
        assert _files(again) == _files(root)


def test_other_seed_gives_other_files(exported, tmp_path):
    root, _ = exported("foundation")
    other = tmp_path / "other"
    export.export_preset("foundation", other, 2, SEED + 1, progress=False)
    first, second = _files(root), _files(other)
    npy = lambda files: {k: v for k, v in files.items() if k.endswith(".npy")}  # noqa: E731
    assert not set(npy(first)) & set(npy(second))
    assert not set(npy(first).values()) & set(npy(second).values())


def test_files_follow_documented_keys_whatever_the_chunking(exported):
    # model_iii was exported in chunks of 2 (examples 0-1, then 2 of a chunk 2-3): a chunk
    # starting at example 1 must reproduce files 1 and 2 (same batch size: no recompilation).
    root, _ = exported("model_iii")
    preset = get_preset("model_iii")
    c = preset.class_names.index("axion")
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), 0), c)
    images, _, params = preset.sample(key, 2, label=c, start_index=1)
    for j, i in enumerate((1, 2)):
        record = np.load(root / "axion" / export._sim_name("model_iii", SEED, "axion", i),
                         allow_pickle=True)
        np.testing.assert_array_equal(record[0], np.asarray(images[j, ..., 0], np.float64))
        assert record[1] == float(params["axion_mass_ev"][j])


# ----------------------------------------------------------------------------
# Output directory, arguments, CLI
# ----------------------------------------------------------------------------

def test_refuses_non_empty_dir_and_force_overwrites(tmp_path):
    out = tmp_path / "busy"
    stale = out / "Dataset" / "cdm" / "cdm_sim_1.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros(3))
    leftover = stale.with_name(".axion_sim_2.npy.tmp")   # from a killed run
    leftover.write_bytes(b"\x93NUMPY")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force") as err:
        export.export_preset("foundation", out, 2, SEED, progress=False)
    assert str(out) in str(err.value)
    assert stale.exists() and not (out / export.MANIFEST_NAME).exists()

    summary = export.export_preset("foundation", out, 2, SEED, force=True, progress=False)
    assert not stale.exists() and not leftover.exists()   # stale files of the layout removed
    assert (out / "notes.txt").read_text() == "keep me"   # anything else left alone
    assert summary["num_files"] == 6
    assert len(list((out / "Dataset").rglob("*.npy"))) == 6


def test_cli_refuses_non_empty_dir(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "lensjax.sim.export", "--preset", "model_ii", "--num-per-class", "1",
         "--out", str(out), "--seed", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert str(out) in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def test_cli_writes_with_force(tmp_path, capsys):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "x").write_text("")
    rc = export.main(["--preset", "foundation", "--num-per-class", "2", "--out", str(out),
                      "--seed", str(SEED), "--force", "--no-progress"])
    assert rc == 0
    assert "wrote 6 files" in capsys.readouterr().out
    assert _load_manifest(out)["counts"] == {"all": {"no_sub": 2, "cdm": 2, "axion": 2}}


def test_unknown_preset_lists_valid_names(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown preset 'nope'") as err:
        export.export_preset("nope", tmp_path / "o", 1, 0)
    for name in export.EXPORTABLE_PRESETS:
        assert name in str(err.value)
    assert export.main(["--preset", "nope", "--num-per-class", "1", "--out", str(tmp_path / "o")]) == 2
    assert "common_test" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_per_class=0), "num_per_class"),
    (dict(num_per_class=1.5), "num_per_class"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(batch_size=0), "batch_size"),
    (dict(val_per_class=-1, preset_name="common_test"), "val_per_class"),
    (dict(val_per_class=1), "common_test"),
])
def test_bad_arguments_are_rejected_before_writing(tmp_path, kwargs, message):
    args = dict(preset_name="foundation", out_dir=tmp_path / "o", num_per_class=1, seed=0,
                progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        export.export_preset(**args)
    assert not (tmp_path / "o").exists()


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"

    def broken_save(f, array, allow_pickle):
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export.np, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        export._save_atomic(path, np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_sim_names_are_deterministic_128_bit_ints():
    a = export._sim_name("foundation", 0, "cdm", 5)
    assert a == export._sim_name("foundation", 0, "cdm", 5)
    assert a != export._sim_name("foundation", 1, "cdm", 5)
    assert a != export._sim_name("foundation", 0, "cdm", 6)
    (value,) = _sim_ints([a], "cdm")
    assert value.bit_length() <= 128
