"""safetensors files read and written a tensor at a time, with pread and pwrite.

safetensors' own reader maps the whole file: every page a tensor read touches stays in the process's
resident set until the handle closes, so reading a 16 GB model through it peaks at 16 GB of RSS. Here the
header is parsed (and checked as strictly as safetensors checks it) and each tensor is read into memory of
its own, which is freed with the tensor. The writer lays a file out from its tensors' dtypes and shapes
first, so their bytes can be written in any order, from any thread, as they are produced.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import torch

from xorgemm.errors import InputError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


class Header:
    """A safetensors file's header, checked: every entry's dtype, shape and data offsets, the offsets tiling
    the data section exactly (no holes, no overlaps), as safetensors requires."""

    def __init__(self, path: Path, size: int, data_start: int, metadata: dict[str, str], entries: dict):
        self.path, self.size, self.data_start, self.metadata = path, size, data_start, metadata
        self.entries = entries  # name -> (dtype name, shape, absolute offset, nbytes), in the file's order

    @classmethod
    def read(cls, path, fd: int | None = None) -> Header:
        path = Path(path)
        own = fd is None
        if own:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise InputError(f"{path}: cannot be opened ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise InputError(f"{path}: is not a safetensors file (shorter than its 8-byte header length)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise InputError(f"{path}: is truncated or not a safetensors file (header of {hlen} bytes, file of "
                                 f"{size})")
            raw = os.pread(fd, hlen, 8)
        finally:
            if own:
                os.close(fd)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: is not a safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: is not a safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InputError(f"{path}: its __metadata__ is not a map of strings")
        data_start = 8 + hlen
        entries, spans = {}, []
        for name, info in header.items():
            ok = (isinstance(info, dict) and info.get("dtype") in ELEMENT_BYTES
                  and _ints(info.get("shape")) and _ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2)
            if not ok:
                raise InputError(f"{path}: tensor '{name}': malformed header entry {info!r}")
            a, b = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= s
            if not 0 <= a <= b or b - a != numel * ELEMENT_BYTES[info["dtype"]]:
                raise InputError(f"{path}: tensor '{name}': data offsets {a}..{b} do not match its shape "
                                 f"{info['shape']} {info['dtype']}")
            entries[name] = (info["dtype"], tuple(info["shape"]), data_start + a, b - a)
            spans.append((a, b, name))
        at = 0
        for a, b, name in sorted(spans):
            if a != at:
                raise InputError(f"{path}: tensor '{name}': its data starts at {a}, not at {at} where the previous "
                                 "one ends (the data section has a hole or an overlap)")
            at = b
        if data_start + at != size:
            what = "is truncated" if data_start + at > size else "has bytes after its last tensor"
            raise InputError(f"{path}: {what} (the header describes {data_start + at} bytes, the file has {size})")
        return cls(path, size, data_start, metadata, entries)


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def pread_into(fd: int, out: torch.Tensor, offset: int, path, what: str):
    """Reads out.nbytes bytes at `offset` into the contiguous CPU tensor `out`."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise InputError(f"{path}: {what} cannot be read ({e.strerror})") from None
        if n == 0:
            raise InputError(f"{path}: {what} cannot be read (the file ended early: was it truncated?)")
        done += n


def layout(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None):
    """The header bytes and each tensor's (offset, nbytes) in the data section, for {name: (dtype name,
    shape)}. Tensors are ordered as safetensors orders them (wider elements first, then by name), so each
    one's data is aligned to its element size."""
    order = sorted(tensors, key=lambda n: (-ELEMENT_BYTES[tensors[n][0]], n))
    header, offsets, at = {}, {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        dtype, shape = tensors[name]
        numel = 1
        for s in shape:
            numel *= s
        n = numel * ELEMENT_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        offsets[name] = (at, n)
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, offsets, at


class Writer:
    """One safetensors file written tensor by tensor, in any order and from any thread, into `tmp_path` (the
    caller renames it into place: see writer.atomic_path). `tensors` is {name: (dtype name, shape)}."""

    def __init__(self, tmp_path, tensors: dict, metadata: dict[str, str] | None = None):
        self.path = Path(tmp_path)
        head, self._offsets, data_bytes = layout(tensors, metadata)
        self._start = len(head)
        self.nbytes = self._start + data_bytes
        self._pending = set(tensors)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, self.nbytes)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, t: torch.Tensor):
        at, n = self._offsets[name]
        data = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        if len(data) != n:
            raise InputError(f"{self.path}: tensor '{name}' has {len(data)} bytes, its header entry {n}")
        done = 0
        while done < n:
            done += os.pwrite(self._fd, data[done:], self._start + at + done)
        self._pending.discard(name)

    def discard(self):
        """Closes and removes the file (a write that failed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self):
        """fsyncs and closes; refuses a file some tensor was never written to."""
        try:
            if self._pending:
                raise InputError(f"{self.path}: tensors never written, e.g. '{sorted(self._pending)[0]}'")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
