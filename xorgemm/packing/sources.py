"""Where weights come from: an in-memory state dict, a .safetensors file, or a Hugging Face model folder
(a single model.safetensors or shards listed by model.safetensors.index.json). Tensors load one at a
time, so packing a large model never holds two whole models in memory. Pickle checkpoints are refused."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from xorgemm.errors import InputError
from xorgemm.format.reader import sniff_pickle

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
    """One or more .safetensors files, opened lazily (mmap) with safetensors' own reader."""

    def __init__(self, files: Iterable[Path], label: str, weight_map: dict[str, str] | None = None):
        self.label = label
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._meta = {}
        for path in files:
            check_not_pickle(path)
            try:
                h = safe_open(str(path), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise InputError(f"{path}: cannot be read as safetensors ({e})") from None
            self._handles[path] = h
            for k in keys:
                if weight_map is not None and Path(weight_map.get(k, "")).name != path.name:
                    continue
                if k in self._where:
                    raise InputError(f"{path}: tensor '{k}' also appears in {self._where[k]}")
                self._where[k] = path
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise InputError(f"{label}: the shard index lists tensors no shard holds, e.g. '{missing[0]}'")

    def names(self):
        return list(self._where)

    def meta(self, name):
        if name not in self._meta:
            sl = self._handles[self._where[name]].get_slice(name)
            from xorgemm.format.layout import DTYPES

            dt = sl.get_dtype()
            if dt not in DTYPES:
                raise InputError(f"{self._where[name]}: tensor '{name}' has dtype {dt}, which xorgemm does not support")
            self._meta[name] = (DTYPES[dt], tuple(sl.get_shape()))
        return self._meta[name]

    def get(self, name):
        path = self._where[name]
        try:
            return self._handles[path].get_tensor(name).contiguous()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{path}: tensor '{name}' cannot be read ({e})") from None


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
