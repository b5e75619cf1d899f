"""Writing a .xor.safetensors container: the chunked stream, the index, and atomic file writes."""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import zstandard

from xorgemm.errors import InputError
from xorgemm.format.hashes import checksum
from xorgemm.format.layout import FORMAT, FORMAT_VERSION, MAX_CHUNK_BYTES, TILE_ALIGN, VERSION_CODECS


class StreamWriter:
    """Accumulates the logical stream and compresses it into independent zstd chunks as it fills."""

    def __init__(self, chunk_bytes: int = 64 * 1024, level: int = 3):
        if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise InputError(f"chunk size {chunk_bytes} must be between 4096 and {MAX_CHUNK_BYTES} bytes")
        if not 1 <= level <= 22:
            raise InputError(f"zstd level {level} must be between 1 and 22")
        self.chunk_bytes = chunk_bytes
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        self._pending = bytearray()
        self._chunks: list[bytes] = []
        self._table: list[tuple[int, int, int, int]] = []
        self.stream_bytes = 0
        self.compressed_bytes = 0

    def append(self, data) -> tuple[int, int]:
        """Appends bytes at the next TILE_ALIGN boundary; returns their (offset, length) span."""
        pad = -self.stream_bytes % TILE_ALIGN
        if pad:
            self._pending += bytes(pad)
            self.stream_bytes += pad
        mv = memoryview(data).cast("B")
        offset = self.stream_bytes
        self._pending += mv
        self.stream_bytes += len(mv)
        while len(self._pending) >= self.chunk_bytes:
            self._flush(self.chunk_bytes)
        return offset, len(mv)

    def _flush(self, n: int):
        raw = bytes(self._pending[:n])
        del self._pending[:n]
        comp = self._zstd.compress(raw)
        self._table.append((self.compressed_bytes, len(comp), len(raw), checksum(raw)))
        self._chunks.append(comp)
        self.compressed_bytes += len(comp)

    def finish(self) -> tuple[np.ndarray, bytes]:
        if self._pending:
            self._flush(len(self._pending))
        table = np.array(self._table, dtype=np.int64).reshape(-1, 4)
        return table, b"".join(self._chunks)


def write_delta_file(path, index: dict, chunk_table: np.ndarray, payload: bytes):
    """Writes the container atomically (see atomic_path), in the format version whose codec list the index
    declares (the oldest that holds the file's tiles: see packing)."""
    # The index is a zstd'd JSON tensor, not a metadata string: metadata values are strings, so nested JSON
    # would be escaped, and the index of a large model runs to megabytes.
    raw_index = json.dumps(index, separators=(",", ":")).encode()
    packed_index = zstandard.ZstdCompressor(level=19).compress(raw_index)
    version = next((v for v, names in VERSION_CODECS.items() if list(names) == index["codecs"]), FORMAT_VERSION)
    meta = {"format": FORMAT, "format_version": str(version), "index_bytes": str(len(raw_index)),
            "index_xxh3": str(checksum(raw_index)), "tensors": str(len(index["tensors"])),
            "base_fingerprint": index["base_fingerprint"]}
    parts, header, at = [], {"__metadata__": meta}, 0
    for name, dtype, shape, data in (("index", "U8", [len(packed_index)], packed_index),
                                     ("chunks", "I64", list(chunk_table.shape), chunk_table.astype("<i8").tobytes()),
                                     ("payload", "U8", [len(payload)], payload)):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        parts.append(data)
        at += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # safetensors aligns the data section to 8 bytes
    atomic_write(path, [struct.pack("<Q", len(hjson)), hjson] + parts)


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and setting it back at once (which
    other threads could see for that instant)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` to write; on success it is fsynced and renamed over `path`, on any
    error it is removed. Readers never see a partial file, and a failed write leaves none behind."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; the output must be a file path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            # mkstemp makes the file 0600; the output gets what open() would give it: 0666 less the umask.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path, parts):
    """Writes the byte strings `parts` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for p in parts:
            f.write(p)
