"""Where weights come from: an in-memory state dict, a .safetensors file, or a Hugging Face model folder
(a single model.safetensors or shards listed by model.safetensors.index.json). Tensors load one at a
time, so packing a large model never holds two whole models in memory. Pickle checkpoints are refused."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from xorgemm.errors import InputError
from xorgemm.format.layout import DTYPES
from xorgemm.format.reader import sniff_pickle
from xorgemm.format.safetensors_io import Header, pread_into

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class TensorSource:
    """Names, dtypes and shapes up front; tensor bytes on demand (CPU, contiguous)."""

    label: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def meta(self, name) -> tuple[torch.dtype, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name) -> torch.Tensor:
        raise NotImplementedError

    def layout(self) -> tuple[dict[str, str], dict[str, dict]] | None:
        """Where the tensors live: ({tensor: file name}, {file name: its safetensors metadata}), or None for a
        source that is not files (a state dict)."""
        return None

    def __contains__(self, name):
        return name in self._names_set()

    def _names_set(self):
        if not hasattr(self, "_set"):
            self._set = set(self.names())
        return self._set


class DictSource(TensorSource):
    def __init__(self, sd: Mapping[str, torch.Tensor], label: str):
        self.label = label
        self._sd = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise InputError(f"{label}: entry '{k}' is a {type(v).__name__}, not a tensor")
            self._sd[k] = v

    def names(self):
        return list(self._sd)

    def meta(self, name):
        t = self._sd[name]
        return t.dtype, tuple(t.shape)

    def get(self, name):
        return self._sd[name].detach().cpu().contiguous()


class SafetensorsSource(TensorSource):
    """One or more .safetensors files. Each tensor is read on demand into memory of its own (pread, not a
    map: see format/safetensors_io.py), so reading a model tensor by tensor holds one tensor at a time."""

    def __init__(self, files: Iterable[Path], label: str, weight_map: dict[str, str] | None = None):
        self.label = label
        self._fds: dict[Path, int] = {}
        self._headers: dict[Path, Header] = {}
        self._where: dict[str, Path] = {}
        try:
            for path in files:
                check_not_pickle(path)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise InputError(f"{path}: cannot be opened ({e.strerror})") from None
                self._fds[path] = fd
                h = self._headers[path] = Header.read(path, fd)
                for k in h.entries:
                    if weight_map is not None and Path(weight_map.get(k, "")).name != path.name:
                        continue
                    if k in self._where:
                        raise InputError(f"{path}: tensor '{k}' also appears in {self._where[k]}")
                    self._where[k] = path
        except BaseException:
            self.close()
            raise
        missing = [k for k in weight_map if k not in self._where] if weight_map is not None else []
        if missing:
            self.close()
            raise InputError(f"{label}: the shard index lists tensors no shard holds, e.g. '{missing[0]}'")

    def names(self):
        return list(self._where)

    def meta(self, name):
        path = self._where[name]
        dt, shape, _, _ = self._headers[path].entries[name]
        if dt not in DTYPES:
            raise InputError(f"{path}: tensor '{name}' has dtype {dt}, which xorgemm does not support")
        return DTYPES[dt], shape

    def get(self, name):
        dtype, shape = self.meta(name)
        path = self._where[name]
        _, _, offset, _ = self._headers[path].entries[name]
        out = torch.empty(shape, dtype=dtype)
        pread_into(self._fds[path], out, offset, path, f"tensor '{name}'")
        return out

    def layout(self):
        return ({k: p.name for k, p in self._where.items()},
                {p.name: dict(h.metadata) for p, h in self._headers.items()})

    def close(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


def check_not_pickle(path: Path):
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"{path}: is a pickle checkpoint ({path.suffix}); xorgemm never unpickles: convert it to "
                         ".safetensors first")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise InputError(f"{path}: cannot be opened ({e.strerror})") from None
    if sniff_pickle(head):
        raise InputError(f"{path}: is a pickle / torch.save checkpoint; xorgemm never unpickles: convert it to "
                         ".safetensors first")


def open_source(src, label: str = "state dict") -> TensorSource:
    """A state dict, a nn.Module, a .safetensors path, or a Hugging Face model folder."""
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, torch.nn.Module):
        return DictSource(src.state_dict(), label=f"{label} ({type(src).__name__})")
    if isinstance(src, Mapping):
        return DictSource(src, label=label)
    if not isinstance(src, (str, Path)):
        raise InputError(f"{label}: expected a state dict or a path, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        return SafetensorsSource([path], label=str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({path / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: is not a valid shard index ({e})") from None
        for s in shards:
            if not s.is_file():
                raise InputError(f"{index}: lists shard {s.name}, which is missing")
        return SafetensorsSource(shards, label=str(path), weight_map=weight_map)
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if not f.name.endswith(".xor.safetensors")]
    if not files:
        pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle checkpoints {pickles}; convert them to safetensors)" if pickles else ""
        raise InputError(f"{path}: folder holds no .safetensors weights{hint}")
    return SafetensorsSource(files, label=str(path))


@contextlib.contextmanager
def opened(src, label: str):
    """open_source(src, label) for a `with`: a source opened here has its files closed afterwards (one passed
    in is the caller's)."""
    source = open_source(src, label)
    try:
        yield source
    finally:
        if source is not src and isinstance(source, SafetensorsSource):
            source.close()
