"""Checks a request's fine-tune in the front-end process, before the request reaches the engine.

A delta that fails to load inside vLLM's worker fails the step it was scheduled in, and with it the engine
(in-process, the next `generate` never returns). So every `.xor.safetensors` a request names is opened,
validated and matched against the served base here first: a missing, corrupted or wrong-base file, or a
tensor the plugin cannot serve per request (stored whole, tiled other than 64x64), is a clear error for that
request alone. A file is checked once per (path, size, mtime); the base tensors'
digests once per process.
"""
from __future__ import annotations

import os
import threading

from xorgemm.errors import BaseMismatchError, InputError
from xorgemm.format.hashes import digest
from xorgemm.format.layout import DEFAULT_TILE
from xorgemm.format.reader import load_delta
from xorgemm.packing.sources import open_source

_LOCK = threading.Lock()
_CHECKED: set[tuple] = set()
_BASE_DIGESTS: dict[tuple[str, str], str] = {}


def check_request(model_dir: str, path: str):
    """Raises InputError / DeltaFormatError / BaseMismatchError (naming the file and tensor) unless the
    delta at `path` is well formed and made from the base model in `model_dir`."""
    try:
        st = os.stat(path)
        key = (model_dir, os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None  # load_delta says what is wrong with the path
    with _LOCK:
        if key in _CHECKED:
            return
        with load_delta(path) as d:
            d.check_chunks()  # the worker reads chunks lazily; a corrupted one must not first show up there
            for t in d.tensors.values():
                if t.kind == "whole":  # new in the fine-tune or reshaped: no base to serve it from
                    raise InputError(f"{t.where()}: stored whole ({t.reason}); the vLLM plugin serves deltas "
                                     "of the served model's tensors only")
                if t.kind == "xor":
                    if len(t.shape) >= 2 and t.tile != DEFAULT_TILE:  # the layers' tile; shards cut on it
                        raise InputError(f"{t.where()}: tiled {t.tile[0]}x{t.tile[1]}; the vLLM plugin serves "
                                         f"{DEFAULT_TILE[0]}x{DEFAULT_TILE[1]} tiles (xorgemm pack's default)")
                    t.section()  # every tile entry and payload offset valid
            base = open_source(model_dir, "base")
            for name, t in d.tensors.items():
                if name not in base:
                    raise BaseMismatchError(f"{d.path}: tensor '{name}': the served model {model_dir} has no such "
                                            "tensor; this delta was made for another model")
                dkey = (model_dir, name)
                if dkey not in _BASE_DIGESTS:
                    _BASE_DIGESTS[dkey] = digest(base.get(name))
                t.check_base(_meta_tensor(base, name), base_digest=_BASE_DIGESTS[dkey])
        _CHECKED.add(key)


def _meta_tensor(base, name):
    """A tensor with the base's dtype and shape and no data: check_base compares those, then the digest."""
    import torch

    dtype, shape = base.meta(name)
    return torch.empty(shape, dtype=dtype, device="meta")
