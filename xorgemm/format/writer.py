"""Writing a delta: its spans compressed in chunks, streamed into one container or several shards, and atomic
file writes."""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from xorgemm._threads import threads
from xorgemm.errors import InputError
from xorgemm.format.hashes import base_fingerprint, checksum
from xorgemm.format.layout import (
    FORMAT,
    FORMAT_VERSION,
    HASH_HEX,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    TILE_ALIGN,
    VERSION_CODECS,
)


def check_stream_args(chunk_bytes: int, level: int):
    if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % TILE_ALIGN:
        raise InputError(f"chunk size {chunk_bytes} must be a multiple of {TILE_ALIGN} bytes between 4096 and "
                         f"{MAX_CHUNK_BYTES}")
    if not 1 <= level <= 22:
        raise InputError(f"zstd level {level} must be between 1 and 22")


_LOCAL = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor per level, reused (pack compresses on every core at once)."""
    cache = _LOCAL.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cache[level]


@dataclass
class Span:
    """A tensor's bytes in the stream, ready to be written. A span of a chunk or more comes compressed (by the
    worker that made it: every core compresses), cut into chunks of chunk_bytes, the last padded with zeros
    to TILE_ALIGN; it starts a chunk of its own, so it decodes without its neighbours. A smaller span comes
    raw and shares a chunk with the small spans around it (never straddling two), which keeps a model's
    biases and norms compressing together."""

    length: int  # the span's bytes, before any padding
    raw: bytes | None = None  # a small span
    frames: list[bytes] = field(default_factory=list)
    raw_sizes: list[int] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        """What it adds to a file, about: its compressed chunks, or a small span's raw bytes."""
        return len(self.raw) if self.raw is not None else sum(len(f) for f in self.frames)


def compress_span(data, chunk_bytes: int, level: int) -> Span:
    """`data` (a buffer) as a Span: raw if smaller than a chunk, else cut into chunks of chunk_bytes and
    each compressed. Safe to call from many threads at once (zstd releases the GIL); a large span's chunks
    are compressed on every core (see _HELPERS)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n < chunk_bytes:
        return Span(n, raw=bytes(mv))
    pad = -n % TILE_ALIGN
    starts = range(0, n + pad, chunk_bytes)

    def compress(lo: int, hi: int):
        zc = _compressor(level)
        out = []
        for at in starts[lo:hi]:
            raw = mv[at:at + chunk_bytes]
            if at + chunk_bytes > n and pad:  # the last chunk carries the padding
                raw = bytes(raw) + bytes(pad)
            out.append((zc.compress(raw), len(raw), checksum(raw)))
        return out

    helpers = _helpers()
    if len(starts) < _PARALLEL_CHUNKS or helpers is None:
        parts = [compress(0, len(starts))]
    else:
        k = 4 * threads()
        bounds = [len(starts) * i // k for i in range(k + 1)]
        parts = list(helpers.map(compress, bounds[:-1], bounds[1:]))
    span = Span(n)
    for part in parts:
        for frame, raw_len, check in part:
            span.frames.append(frame)
            span.raw_sizes.append(raw_len)
            span.checksums.append(check)
    return span


_PARALLEL_CHUNKS = 256  # 16 MiB of 64 KiB chunks: below that a span is compressed by the thread that made it
_HELPER_POOL: dict[int, ThreadPoolExecutor] = {}
_HELPER_LOCK = threading.Lock()


def _helpers() -> ThreadPoolExecutor | None:
    """Threads that compress a large span's chunks (none on one core): apart from pack's workers, which
    wait on them, so the two never deadlock."""
    n = threads()
    if n == 1:
        return None
    with _HELPER_LOCK:
        if n not in _HELPER_POOL:
            _HELPER_POOL[n] = ThreadPoolExecutor(n, thread_name_prefix="xorgemm-zstd")
        return _HELPER_POOL[n]


def _reserved_header() -> int:
    """The header space a streamed container reserves (its header is written last, when its offsets are
    known): the longest header any container can have, every number at its widest."""
    wide = 10**15  # more bytes than any disk holds
    meta = {"format": FORMAT, "format_version": str(max(VERSION_CODECS)), "index_bytes": str(MAX_HEADER_BYTES),
            "index_xxh3": str(-(2**63)), "tensors": str(wide), "base_fingerprint": "f" * HASH_HEX}
    sizes = {"payload": ("U8", [wide], wide), "index": ("U8", [wide], wide), "chunks": ("I64", [wide, 4], wide)}
    return len(_container_header(meta, sizes)) - 8


def _container_header(meta: dict, sizes: dict[str, tuple[str, list, int]], reserve: int | None = None) -> bytes:
    """The 8-byte length and the JSON header of a container whose data section holds, in this order, the
    entries `sizes` ({name: (dtype, shape, bytes)}); padded with spaces to 8 bytes, or to exactly `reserve`."""
    header, at = {"__metadata__": meta}, 0
    for name, (dtype, shape, n) in sizes.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    target = len(hjson) + (-len(hjson) % 8) if reserve is None else reserve
    if len(hjson) > target:
        raise InputError(f"a delta header of {len(hjson)} bytes does not fit the {target} reserved for it")
    return struct.pack("<Q", target) + hjson + b" " * (target - len(hjson))


def _index_parts(index: dict, chunk_table: np.ndarray, payload_bytes: int):
    """The metadata, the header's entries and the bytes of a container's index and chunk table. The data
    section holds the payload first, then the index, then the chunk table: a streamed payload comes first,
    and what describes it is written once it is complete."""
    raw_index = json.dumps(index, separators=(",", ":")).encode()
    packed_index = zstandard.ZstdCompressor(level=19).compress(raw_index)
    version = next((v for v, names in VERSION_CODECS.items() if list(names) == index["codecs"]), FORMAT_VERSION)
    meta = {"format": FORMAT, "format_version": str(version), "index_bytes": str(len(raw_index)),
            "index_xxh3": str(checksum(raw_index)), "tensors": str(len(index["tensors"])),
            "base_fingerprint": index["base_fingerprint"]}
    table = np.ascontiguousarray(chunk_table, dtype="<i8").reshape(-1, 4)
    sizes = {"payload": ("U8", [payload_bytes], payload_bytes),
             "index": ("U8", [len(packed_index)], len(packed_index)),
             "chunks": ("I64", list(table.shape), table.nbytes)}
    return meta, sizes, [packed_index, table.tobytes()]


def write_delta_file(path, index: dict, chunk_table: np.ndarray, payload: bytes):
    """Writes a whole container atomically (see atomic_path) from memory: the index, the chunk table and the
    payload they describe. Pack streams its containers (DeltaWriter); this writes small or crafted ones."""
    meta, sizes, parts = _index_parts(index, chunk_table, len(payload))
    atomic_write(path, [_container_header(meta, sizes), payload] + parts)


class _Container:
    """One container being streamed to a temporary file: header space, then chunks as they come, then (on
    `finish`) the index, the chunk table and the header."""

    def __init__(self, folder: Path, stem: str, chunk_bytes: int, level: int):
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.reserved = _reserved_header()
        try:
            self.f.write(bytes(8 + self.reserved))
        except BaseException:
            self.discard()
            raise
        self.chunk_bytes, self.level = chunk_bytes, level
        self.table: list[tuple[int, int, int, int]] = []
        self.entries: dict[str, dict] = {}
        self.payload_bytes = 0
        self.stream_bytes = 0
        self._small = bytearray()  # small spans waiting to fill a chunk

    def _write_chunk(self, frame: bytes, raw_len: int, check: int):
        self.f.write(frame)
        self.table.append((self.payload_bytes, len(frame), raw_len, check))
        self.payload_bytes += len(frame)
        self.stream_bytes += raw_len

    def _flush_small(self):
        if self._small:
            self._small += bytes(-len(self._small) % TILE_ALIGN)
            raw = bytes(self._small)
            self._write_chunk(_compressor(self.level).compress(raw), len(raw), checksum(raw))
            self._small.clear()

    def append(self, span: Span) -> int:
        """Writes a span; returns its offset in this container's stream."""
        if span.raw is not None:
            pad = -len(self._small) % TILE_ALIGN
            if len(self._small) + pad + span.length > self.chunk_bytes:
                self._flush_small()
                pad = 0
            self._small += bytes(pad)
            offset = self.stream_bytes + len(self._small)
            self._small += span.raw
            return offset
        self._flush_small()
        offset = self.stream_bytes
        for frame, raw, check in zip(span.frames, span.raw_sizes, span.checksums):
            self._write_chunk(frame, raw, check)
        return offset

    @property
    def size(self) -> int:
        return self.payload_bytes + len(self._small)

    def finish(self, index: dict):
        self._flush_small()
        index = dict(index, stream_bytes=self.stream_bytes, tensors=self.entries)
        meta, sizes, parts = _index_parts(index, np.array(self.table, dtype=np.int64).reshape(-1, 4),
                                          self.payload_bytes)
        for p in parts:
            self.f.write(p)
        self.f.seek(0)
        self.f.write(_container_header(meta, sizes, reserve=self.reserved))
        self.f.flush()
        os.fsync(self.f.fileno())
        os.fchmod(self.f.fileno(), 0o666 & ~_umask())
        self.f.close()

    def discard(self):
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def shard_name(stem: str, i: int, n: int) -> str:
    """The Hugging Face way: NAME-00001-of-00003 (with its suffix)."""
    return f"{stem}-{i:05d}-of-{n:05d}"


class DeltaWriter:
    """A delta streamed to disk as its tensors' chunks arrive: one .xor.safetensors file, or, once the
    payload would pass `max_file_bytes`, shards NAME-0000i-of-0000n.xor.safetensors of whole tensors and a
    NAME.xor.safetensors.index.json. Nothing is visible under the output's names until `finish`; a delta of
    the other form left there before is removed then, so the path always reads back what was written."""

    SUFFIX = ".xor.safetensors"

    def __init__(self, path, *, max_file_bytes: int, chunk_bytes: int, level: int):
        check_stream_args(chunk_bytes, level)
        self.chunk_bytes, self.level = chunk_bytes, level
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"{self.path}: the folder {self.path.parent} does not exist")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder; the output must be a file path")
        name = self.path.name
        self.stem = name[:-len(self.SUFFIX)] if name.endswith(self.SUFFIX) and len(name) > len(self.SUFFIX) else name
        self.max_file_bytes = max_file_bytes
        self.shards: list[_Container] = []
        self._new_shard()

    def _new_shard(self):
        self.shards.append(_Container(self.path.parent, self.stem, self.chunk_bytes, self.level))

    def add(self, name: str, entry: dict, span: Span | None):
        """Records tensor `name` (its index entry; its span is set here) with its bytes, if it has any."""
        cur = self.shards[-1]
        if span is not None and span.length:
            if cur.size and cur.size + span.stored_bytes > self.max_file_bytes:
                self._new_shard()
                cur = self.shards[-1]
            entry["span"] = [cur.append(span), span.length]
        else:
            entry["span"] = [0, 0]
        cur.entries[name] = entry

    def finish(self, make_index) -> list[Path]:
        """Completes every container (`make_index(entries)` gives each one's index, less stream_bytes and
        tensors) and moves them into place; returns the files written."""
        try:
            for s in self.shards:
                s.finish(make_index(s.entries))
        except BaseException:
            self.abort()
            raise
        self.written_stream_bytes = sum(s.stream_bytes for s in self.shards)
        index_path = self.path.with_name(self.path.name + ".index.json")
        stale = files_listed_by(index_path)  # an earlier sharded write's shards
        if len(self.shards) == 1:
            os.replace(self.shards[0].tmp, self.path)
            self.shards = []
            _remove(index_path, *(self.path.parent / f for f in stale))  # would be read instead of the file
            return [self.path]
        n = len(self.shards)
        names = [shard_name(self.stem, i + 1, n) + self.SUFFIX for i in range(n)]
        weight_map, hashes, total = {}, {}, 0
        for s, fname in zip(self.shards, names):
            total += s.tmp.stat().st_size
            for t, e in s.entries.items():
                weight_map[t] = fname
                if e["kind"] != "whole":
                    hashes[t] = e["base"]
        doc = {"metadata": {"format": FORMAT, "total_size": total, "base_fingerprint": base_fingerprint(hashes)},
               "weight_map": weight_map}
        moved = []
        try:
            for s, fname in zip(self.shards, names):
                os.replace(s.tmp, self.path.parent / fname)
                moved.append(fname)
            atomic_write(index_path, [json.dumps(doc, indent=1).encode() + b"\n"])
        except BaseException:
            # Shards that replaced an earlier write's stay: its index then refuses them as not its own.
            _remove(*(self.path.parent / f for f in moved if f not in stale))
            self.shards = [s for s in self.shards if s.tmp.exists()]
            self.abort()
            raise
        self.shards = []
        _remove(self.path, *(self.path.parent / f for f in stale - set(names)))  # the single file would shadow
        return [self.path.parent / f for f in names] + [index_path]

    def abort(self):
        for s in self.shards:
            s.discard()
        self.shards = []


def files_listed_by(index_path: Path) -> set[str]:
    """The files a shard index (a model's or a delta's) lists, by plain name; none if it is missing or not
    one. Only these are ever removed as stale: never a file that merely looks like a shard."""
    try:
        names = set(json.loads(Path(index_path).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in names if isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..")}


def _remove(*paths: Path):
    for p in paths:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            p.unlink()


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
