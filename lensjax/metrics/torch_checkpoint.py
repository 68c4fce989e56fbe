"""Read PyTorch state dicts (torch.save files) without torch, and .npz weight files.

    state_dict = read_state_dict("pt_inception-2015-12-05-6726825d.pth")   # {name: np.ndarray}

torch is not a lensjax dependency, yet published weights (the FID Inception
network among them) ship as torch.save files. Both of its formats are read: the
zip format of torch >= 1.6 (`<prefix>/data.pkl` with persistent ids naming the
storages in `<prefix>/data/<key>`) and the older stream format. A restricted
unpickler accepts only the few globals a state dict needs (OrderedDict, torch's
tensor rebuild functions, storage types), so reading executes no code from the
file.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


# Storage class names in torch's pickles -> numpy dtype (stored little-endian unless
# the zip's `byteorder` record says otherwise).
TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# torch.save's stream format (torch < 1.6, or _use_new_zipfile_serialization=False).
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stand-in for a `torch.<Name>Storage` class: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(TORCH_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named by a persistent id; its bytes are attached once read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as `torch._utils._rebuild_tensor_v2` describes it: a strided view of a storage."""

    def __init__(self, storage: _StorageRef, offset: int, size: Sequence[int],
                 stride: Sequence[int]):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self, name: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError(f"{name}: storage {self.storage.key!r} has no data in the file")
        if len(self.size) != len(self.stride):
            raise ValueError(f"{name}: size {self.size} and stride {self.stride} disagree")
        if 0 in self.size:
            return np.zeros(self.size, data.dtype.newbyteorder("="))
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= data.size:
            raise ValueError(f"{name}: view (offset {self.offset}, size {self.size}, stride "
                             f"{self.stride}) exceeds its storage of {data.size} elements")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
        return np.array(view, dtype=data.dtype.newbyteorder("="))


def _rebuild_tensor(storage: _StorageRef, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused: Any) -> _TensorRef:
    # Stands for torch._utils._rebuild_tensor(_v2); requires_grad, hooks and
    # metadata (the trailing arguments) do not matter for weights.
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage in the checkpoint")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: _TensorRef, *unused: Any) -> _TensorRef:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a tensor state dict, never importing code."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: Any, storages: dict[str, _StorageRef]):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which a weights file "
                                     "has no reason to contain; refusing to load it")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id in checkpoint: {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 1.0 checkpoints) are not supported")
        if key not in self.storages:
            self.storages[key] = _StorageRef(key, storage_type.dtype, numel)
        return self.storages[key]


def _materialize_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
    result = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        result[str(name)] = value.materialize(f"{source}: {name}")
    return result


def _read_torch_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip but not a torch.save checkpoint (found "
                             f"{len(pickles)} data.pkl records)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _StorageRef] = {}
        obj = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            record = f"{prefix}data/{key}"
            try:
                raw = archive.read(record)
            except KeyError:
                raise ValueError(f"{path}: storage record {record!r} is missing") from None
            dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
            if len(raw) != storage.numel * dtype.itemsize:
                raise ValueError(f"{path}: storage {key!r} has {len(raw)} bytes, expected "
                                 f"{storage.numel} x {dtype.itemsize}")
            storage.data = np.frombuffer(raw, dtype=dtype)
    return _materialize_state_dict(obj, str(path))


def _read_torch_legacy(path: Path) -> dict[str, np.ndarray]:
    storages: dict[str, _StorageRef] = {}
    with open(path, "rb") as f:
        header = _StateDictUnpickler(f, storages)
        try:
            magic = header.load()
        except Exception as error:  # noqa: BLE001 - any failure means "not this format"
            raise ValueError(f"{path} is neither a torch.save checkpoint nor an .npz") from error
        if magic != TORCH_LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a torch.save checkpoint nor an .npz")
        protocol = _StateDictUnpickler(f, storages).load()
        if protocol != TORCH_LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported torch.save protocol version {protocol}")
        sys_info = _StateDictUnpickler(f, storages).load()
        if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path} was written on a big-endian machine; not supported")
        obj = _StateDictUnpickler(f, storages).load()
        keys = _StateDictUnpickler(f, storages).load()
        # Storage bytes follow in `keys` order, each as an int64 element count + raw data.
        for key in keys:
            storage = storages.get(str(key))
            if storage is None:
                raise ValueError(f"{path}: storage {key!r} is listed but no tensor uses it")
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if numel != storage.numel or len(raw) != nbytes:
                raise ValueError(f"{path}: storage {key!r} is truncated or has the wrong size")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _materialize_state_dict(obj, str(path))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} from a local torch.save state dict (zip or stream format) or an .npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (lensjax never downloads "
                                "weights; give the local path, e.g. of pt_inception-2015-12-05-6726825d.pth)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_npz = all(name.endswith(".npy") for name in archive.namelist())
        if is_npz:
            with np.load(path, allow_pickle=False) as npz:
                return {name: np.asarray(npz[name]) for name in npz.files}
        return _read_torch_zip(path)
    return _read_torch_legacy(path)
