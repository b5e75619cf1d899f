"""Reading a delta: DeltaFile, validated completely when opened, decoded lazily.

A delta is one .xor.safetensors container, or several (shards) listed by a NAME.xor.safetensors.index.json.
A container's layout (docs/format.md is the spec):
  __metadata__  {"format": "xorgemm.delta", "format_version": "1", "index_bytes": n, "index_xxh3": h, ...}
  "index"       U8: the index (per-tensor dtype, shape, tile shape, codec mix, span, hashes) as zstd'd JSON
  "chunks"      I64 [n_chunks, 4]: compressed offset, compressed size, raw size, XXH3-64 of the raw bytes
  "payload"     U8 [..]: the chunks, each an independent zstd frame (nvCOMP's batched zstd can take them)

The chunks decompress to one logical *stream*; each tensor's bytes are a span of it (a delta section, see
csrc/format/delta_section.h, or the raw bytes of a tensor stored whole). Every field is validated before
use, so a truncated, corrupted or crafted file is refused with a message naming the file and tensor.
The file is read with pread, never mapped: a mapped page stays in the process's resident set, and
reading a 10 GB delta through a map would hold 10 GB.
"""
from __future__ import annotations

import bisect
import json
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import zstandard

from xorgemm.errors import DeltaFormatError, InputError, where
from xorgemm.format.hashes import base_fingerprint, checksum, is_hash
from xorgemm.format.layout import (
    CODEC_NAMES,
    DTYPES,
    FORMAT,
    KINDS,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    TILE_ALIGN,
    VERSION_CODECS,
    grid_of,
)
from xorgemm.format.tensor import DeltaTensor


def sniff_pickle(head: bytes) -> bool:
    """torch.save zip archives and raw pickles (refused, never loaded), from a file's first 9 bytes. A
    safetensors file has '{' at byte 8, whatever its 8-byte header length (which may well start 0x80)."""
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


class _Tensors:
    """A delta's tensors by name (`self.tensors`), read as a mapping; a missing name's KeyError names the file."""

    tensors: dict[str, DeltaTensor]
    path: Path

    def __getitem__(self, name) -> DeltaTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{name}' in this delta") from None

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


class DeltaShard(_Tensors):
    """One validated .xor.safetensors container: a whole delta, or one shard of a sharded one."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # --- parsing and validation

    def _fail(self, msg, tensor=None):
        raise DeltaFormatError(f"{where(self.path, tensor)}: {msg}")

    def _open(self):
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise InputError(f"{self.path}: is not a file")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"{self.path}: cannot be opened ({e.strerror})") from None
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 9, 0)
        if sniff_pickle(head):
            self._fail("is a pickle / torch.save checkpoint; xorgemm never unpickles, expected a .xor.safetensors "
                       "delta")
        if len(head) < 8:
            self._fail("is not a safetensors file (shorter than its 8-byte header length)")
        (hlen,) = struct.unpack("<Q", head[:8])
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            self._fail(f"is truncated or not a safetensors file (header of {hlen} bytes, file of {size})")
        try:
            header = json.loads(self._pread(8, hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._fail("is not a safetensors file (its header is not JSON)")
        if not isinstance(header, dict):
            self._fail("is not a safetensors file (its header is not a JSON object)")
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            self._fail("is a safetensors file but not an xorgemm delta (no 'format: xorgemm.delta' metadata)")
        versions = {str(v): v for v in VERSION_CODECS}
        if meta.get("format_version") not in versions:
            self._fail(f"has format version {meta.get('format_version')!r}; "
                       f"this xorgemm reads versions {', '.join(versions)}")
        self.format_version = versions[meta["format_version"]]
        data_start = 8 + hlen
        data_len = size - data_start
        spans = {}
        for name, dtype, ndim in (("index", "U8", 1), ("chunks", "I64", 2), ("payload", "U8", 1)):
            info = header.get(name)
            ok = (isinstance(info, dict) and info.get("dtype") == dtype and _int_list(info.get("shape"), ndim)
                  and _int_list(info.get("data_offsets"), 1) and len(info["data_offsets"]) == 2)
            if not ok:
                self._fail(f"has a missing or malformed '{name}' entry in its header")
            a, b = info["data_offsets"]
            nbytes = (8 if dtype == "I64" else 1) * int(np.prod(info["shape"]))
            if not 0 <= a <= b or b - a != nbytes:
                self._fail(f"header entry '{name}' has offsets {a}..{b} that do not match its shape")
            if b > data_len:
                self._fail(f"is truncated: '{name}' ends at byte {data_start + b} of a {size}-byte file")
            spans[name] = (data_start + a, b - a, info["shape"])
        self.index = self._read_index(meta, *spans["index"][:2])
        off, n, shape = spans["chunks"]
        if shape[1:] != [4]:
            self._fail("has a chunk table that is not [n, 4]")
        if n > 64 * MAX_HEADER_BYTES:
            self._fail(f"has a chunk table of {n} bytes")
        self.chunks = np.frombuffer(self._pread(off, n), dtype="<i8").reshape(-1, 4)
        self._payload_off, self._payload_len, _ = spans["payload"]
        self._validate_index()
        self._validate_chunks()

    def _read_index(self, meta, off, n):
        try:
            raw_len, check = int(meta.get("index_bytes", "")), int(meta.get("index_xxh3", ""))
        except ValueError:
            self._fail("has no valid index_bytes / index_xxh3 metadata")
        if not 0 < raw_len <= MAX_HEADER_BYTES:
            self._fail(f"declares an index of {raw_len} bytes (at most {MAX_HEADER_BYTES})")
        problem, raw = decompress_exact(self._pread(off, n), raw_len, check)
        if problem:
            self._fail(f"has a corrupted index ({problem})")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._fail("has an index that is not JSON")

    def _validate_index(self):
        ix = self.index
        if not isinstance(ix, dict):
            self._fail("has an index that is not a JSON object")
        for key in ("stream_bytes", "chunk_bytes", "zstd_level"):
            if not isinstance(ix.get(key), int) or ix[key] < 0:
                self._fail(f"index field '{key}' is missing or not a non-negative integer")
        codecs = list(VERSION_CODECS[self.format_version])
        if ix.get("codecs") != codecs:
            self._fail(f"declares codecs {ix.get('codecs')!r}; format version {self.format_version} has {codecs}")
        if not 0 < ix["chunk_bytes"] <= MAX_CHUNK_BYTES:
            self._fail(f"declares a chunk size of {ix['chunk_bytes']} bytes (at most {MAX_CHUNK_BYTES})")
        self.stream_bytes = ix["stream_bytes"]
        self.base_fingerprint = ix.get("base_fingerprint")
        tensors = ix.get("tensors")
        if not isinstance(tensors, dict):
            self._fail("index has no 'tensors' object")
        self.tensors: dict[str, DeltaTensor] = {}
        for name, e in tensors.items():
            self.tensors[name] = self._parse_tensor(name, e)
        self._validate_layout(ix, tensors)

    def _validate_layout(self, ix, tensors):
        """The fine-tune's file layout, when pack recorded one: "files" (file name -> its safetensors metadata)
        and each tensor's "file"; unpack writes the same files."""
        files = ix.get("files")
        self.layout_files: dict[str, dict[str, str]] = {}
        self.tensor_files: dict[str, str] = {}
        if files is None:
            return
        if not isinstance(files, dict):
            self._fail("index field 'files' is not an object")
        for fname, meta in files.items():
            if not is_plain_file_name(fname, ".safetensors"):
                self._fail(f"index field 'files' names {fname!r}, not a plain .safetensors file name")
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                self._fail(f"index field 'files': the metadata of {fname!r} is not a map of strings")
        self.layout_files = files
        for name, e in tensors.items():
            fname = e.get("file")
            if fname not in files:
                self._fail(f"index entry is invalid: its file {fname!r} is not one of the index's 'files'", name)
            self.tensor_files[name] = fname

    def _parse_tensor(self, name, e) -> DeltaTensor:
        bad = lambda msg: self._fail(f"index entry is invalid: {msg}", name)  # noqa: E731
        if not isinstance(e, dict):
            bad("not an object")
        kind = e.get("kind")
        if kind not in KINDS:
            bad(f"kind {kind!r} is not one of {KINDS}")
        if e.get("dtype") not in DTYPES:
            bad(f"dtype {e.get('dtype')!r} is unknown")
        dtype = DTYPES[e["dtype"]]
        shape = e.get("shape")
        if not _int_list(shape, 1, allow_empty=True) or any(s < 0 for s in shape) or len(shape) > 8:
            bad(f"shape {shape!r} is not a list of non-negative integers")
        shape = tuple(shape)
        numel = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if numel > 1 << 44:
            bad(f"shape {list(shape)} is out of range")
        esize = torch.empty((), dtype=dtype).element_size()
        span = e.get("span")
        if not _int_list(span, 1) or len(span) != 2 or span[0] < 0 or span[1] < 0 or span[0] % TILE_ALIGN:
            bad(f"span {span!r} is not an aligned [offset, length] pair")
        if span[0] + span[1] > self.stream_bytes:
            bad(f"span {span} lies outside the {self.stream_bytes}-byte stream")
        ft_hash = e.get("ft")
        base_hash = e.get("base")
        if not is_hash(ft_hash) or (kind != "whole" and not is_hash(base_hash)):
            bad("hashes are missing or malformed")
        tile = None
        declared = len(VERSION_CODECS[self.format_version])
        counts = tuple(e.get("tiles", (0,) * declared))
        if kind == "xor":
            tile = e.get("tile")
            if not _int_list(tile, 1) or len(tile) != 2:
                bad(f"tile shape {tile!r} is invalid")
            tile = tuple(tile)
            if numel == 0:
                bad("an empty tensor cannot have a tile section")
            try:
                grid = grid_of(shape, tile, dtype)  # the native grid refuses tile shapes the format cannot hold
            except (ValueError, TypeError, OverflowError) as err:  # FormatError, or integers beyond int64
                bad(f"tile shape {list(tile)} over shape {list(shape)}: {err}")
            if len(counts) != declared or not all(isinstance(c, int) and c >= 0 for c in counts) \
                    or sum(counts) != grid.num_tiles:
                bad(f"tile counts {list(counts)} do not match the {grid.num_tiles} tiles of shape {list(shape)}")
            if span[1] < grid.table_bytes:
                bad(f"its section of {span[1]} bytes cannot hold {grid.num_tiles} tile entries")
        elif kind == "whole":
            if span[1] != numel * esize:
                bad(f"is stored whole in {span[1]} bytes but {list(shape)} {e['dtype']} needs {numel * esize}")
        elif span[1] != 0:
            bad("is identical to its base but claims stored bytes")
        if kind == "same" and base_hash != ft_hash:
            bad("is marked identical to its base but its hashes differ")
        counts = counts + (0,) * (len(CODEC_NAMES) - len(counts))  # an older version's list: the rest are none
        return DeltaTensor(name, kind, dtype, shape, tile, (span[0], span[1]), base_hash, ft_hash, counts,
                           e.get("reason"), file=self)

    def _validate_chunks(self):
        c = self.chunks
        if c.shape[0] == 0:
            if self.stream_bytes or self._payload_len:
                self._fail("has no chunks but a non-empty stream")
            self._raw_starts = np.zeros(1, dtype=np.int64)
            return
        comp_off, comp_len, raw_len = (c[:, i] for i in range(3))
        expected_off = np.concatenate([[0], np.cumsum(comp_len)[:-1]])
        if (comp_len <= 0).any() or (comp_off != expected_off).any() or int(comp_len.sum()) != self._payload_len:
            self._fail("has a chunk table whose compressed offsets/sizes do not tile the payload")
        if (raw_len <= 0).any() or (raw_len > self.index["chunk_bytes"]).any():
            self._fail(f"has a chunk whose decompressed size exceeds the declared {self.index['chunk_bytes']} bytes")
        if int(raw_len.sum()) != self.stream_bytes:
            self._fail(f"chunks decompress to {int(raw_len.sum())} bytes, the index says {self.stream_bytes}")
        self._raw_starts = np.concatenate([[0], np.cumsum(raw_len)])

    # --- access

    @property
    def compressed_bytes(self) -> int:
        return self._payload_len

    def _pread(self, offset: int, n: int) -> bytes:
        if self._fd is None:
            raise InputError(f"{self.path}: is closed")
        try:
            data = os.pread(self._fd, n, offset)
            while len(data) < n:  # a short read: a regular file returns less only at its end
                more = os.pread(self._fd, n - len(data), offset + len(data))
                if not more:
                    self._fail(f"is truncated (it ends before byte {offset + n})")
                data += more
        except OSError as e:
            raise InputError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        return data

    def _frame(self, i: int) -> bytes:
        off, n = int(self.chunks[i, 0]), int(self.chunks[i, 1])
        return self._pread(self._payload_off + off, n)

    def _chunk(self, i: int, tensor=None, keep: bool = True) -> bytes:
        """Chunk i decompressed and checked. The last few are kept: small tensors share chunks."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        raw_len, check = int(self.chunks[i, 2]), int(self.chunks[i, 3])
        problem, raw = decompress_exact(self._frame(i), raw_len, check)
        if problem:
            self._fail(f"chunk {i} is corrupted ({problem})", tensor)
        if keep:
            with self._lock:
                self._cache[i] = raw
                if len(self._cache) > 4:
                    self._cache.popitem(last=False)
        return raw

    def read_span(self, offset: int, length: int, tensor=None) -> torch.Tensor:
        """Bytes [offset, offset+length) of the decoded stream, decompressing only the chunks they touch."""
        if length == 0:
            return torch.empty(0, dtype=torch.uint8)
        first, last = self._chunk_range(offset, length)
        out = torch.empty(length, dtype=torch.uint8)
        dst = out.numpy()
        for i in range(first, last + 1):
            chunk = self._chunk(i, tensor, keep=i in (first, last))  # inner chunks belong to this span alone
            start = int(self._raw_starts[i])
            lo, hi = max(offset - start, 0), min(offset + length - start, len(chunk))
            at = start + lo - offset
            dst[at:at + hi - lo] = np.frombuffer(chunk, dtype=np.uint8, count=hi - lo, offset=lo)
        return out

    def span_frames(self, offset: int, length: int) -> tuple[list, list[int], int]:
        """The compressed chunks (zstd frames, views of the file) covering stream bytes [offset, offset+length),
        their decompressed sizes, and where the span starts in their concatenated output. Unchecked: for a
        decoder that checks sizes itself (nvCOMP's, xorgemm.resident); read_span checks the XXH3 sums."""
        first, last = self._chunk_range(offset, length)
        frames = [self._frame(i) for i in range(first, last + 1)]
        sizes = [int(self.chunks[i, 2]) for i in range(first, last + 1)]
        return frames, sizes, offset - int(self._raw_starts[first])

    def _chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        """First and last chunk holding stream bytes [offset, offset+length), length > 0."""
        return (bisect.bisect_right(self._raw_starts, offset) - 1,
                bisect.bisect_right(self._raw_starts, offset + length - 1) - 1)

    def check_chunks(self):
        """Decompresses every chunk once and checks its size and XXH3 checksum (read_span checks only the chunks
        it touches, when it touches them): the whole file's integrity, up front."""
        for i in range(self.chunks.shape[0]):
            self._chunk(i, keep=False)

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])

    def compressed_share(self, name) -> float:
        """On-disk bytes attributable to a tensor: its share of every chunk its span touches."""
        off, n = self[name].span
        if n == 0:
            return 0.0
        total = 0.0
        first, last = self._chunk_range(off, n)
        for i in range(first, last + 1):
            lo, hi = int(self._raw_starts[i]), int(self._raw_starts[i + 1])
            total += self.chunks[i, 1] * (min(hi, off + n) - max(lo, off)) / (hi - lo)
        return total

    def close(self):
        if getattr(self, "_fd", None) is not None:
            self._cache.clear()
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def __repr__(self):
        return f"DeltaShard({str(self.path)!r}, {len(self.tensors)} tensors, {self.compressed_bytes} bytes)"


_LOCAL = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """A per-thread decompressor, reused: creating one per 64 KiB chunk costs more than the chunk."""
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def decompress_exact(frame: bytes, raw_len: int, check: int) -> tuple[str | None, bytes]:
    """Decompresses one zstd frame that must yield exactly raw_len bytes with this checksum. The frame's own
    size claim is checked first, so a crafted frame cannot make us allocate more than raw_len."""
    try:
        claimed = zstandard.get_frame_parameters(frame).content_size
        if claimed not in (raw_len, zstandard.CONTENTSIZE_UNKNOWN):
            return f"frame claims {claimed} decompressed bytes, the table says {raw_len}", b""
        raw = _dctx().decompress(frame, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        return f"zstd: {e}", b""
    if len(raw) != raw_len or checksum(raw) != check:
        return "checksum mismatch", b""
    return None, raw


def is_plain_file_name(name, suffix: str) -> bool:
    """A file name with no folder part (so a crafted index cannot point outside its folder)."""
    return (isinstance(name, str) and name.endswith(suffix) and len(name) > len(suffix) and "/" not in name
            and "\\" not in name and name not in (".", "..") and "\0" not in name)


def _int_list(v, ndim_min, allow_empty=False) -> bool:
    return (isinstance(v, list) and (allow_empty or len(v) >= ndim_min)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


class DeltaFile(_Tensors):
    """A validated, lazily decoded delta: one .xor.safetensors file, or the shards a
    NAME.xor.safetensors.index.json lists (pack writes those past a size limit). Use `load_delta(path)`.
    Each tensor decodes from the file that holds it, which its messages name."""

    def __init__(self, path):
        self.path = Path(path)
        self.shards: list[DeltaShard] = []
        index = _shard_index_of(self.path)
        try:
            if index is None:
                self.shards.append(DeltaShard(self.path))
            else:
                self.path = index
                self._open_shards()
        except BaseException:
            self.close()
            raise
        first = self.shards[0]
        self.format_version = max(s.format_version for s in self.shards)
        self.stream_bytes = sum(s.stream_bytes for s in self.shards)
        self.tensors: dict[str, DeltaTensor] = {}
        self.layout_files: dict[str, dict[str, str]] = {}
        self.tensor_files: dict[str, str] = {}
        for s in self.shards:
            self.tensors.update(s.tensors)
            self.layout_files.update(s.layout_files)
            self.tensor_files.update(s.tensor_files)
        if len(self.tensor_files) != len(self.tensors):  # a layout covers every tensor or none
            self.layout_files, self.tensor_files = {}, {}
        self.base_fingerprint = first.base_fingerprint if index is None else self._fingerprint

    @property
    def sharded(self) -> bool:
        return self.path.name.endswith(".index.json")

    def _open_shards(self):
        """Opens every shard the index lists and checks they hold exactly the tensors it maps to them, made
        from one base."""
        fail = lambda msg: _raise(DeltaFormatError(f"{self.path}: {msg}"))  # noqa: E731
        try:
            if self.path.stat().st_size > MAX_HEADER_BYTES:
                fail(f"is larger than a shard index may be ({MAX_HEADER_BYTES} bytes)")
            doc = json.loads(self.path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            fail("is not a JSON shard index")
        except OSError as e:
            raise InputError(f"{self.path}: cannot be read ({e.strerror})") from None
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fail(f"is not the shard index of an xorgemm delta (no metadata 'format: {FORMAT}')")
        if not isinstance(weight_map, dict) or not weight_map:
            fail("has no 'weight_map' of tensors to shard files")
        shards: dict[str, set] = {}
        for tname, fname in weight_map.items():
            if not is_plain_file_name(fname, ".xor.safetensors"):
                fail(f"maps tensor '{tname}' to {fname!r}, not a .xor.safetensors file name in its folder")
            shards.setdefault(fname, set()).add(tname)
        for fname, names in shards.items():
            shard = DeltaShard(self.path.parent / fname)
            self.shards.append(shard)
            if set(shard.tensors) != names:
                odd = sorted(set(shard.tensors) ^ names)[0]
                fail(f"shard {fname} does not hold the tensors the index maps to it (e.g. '{odd}')")
        hashes = {n: t.base_hash for s in self.shards for n, t in s.tensors.items() if t.kind != "whole"}
        self._fingerprint = base_fingerprint(hashes)
        if meta.get("base_fingerprint") != self._fingerprint:
            fail("its shards were made from another base than the index records (base_fingerprint differs)")

    @property
    def compressed_bytes(self) -> int:
        return sum(s.compressed_bytes for s in self.shards)

    @property
    def file_bytes(self) -> int:
        """The delta's size on disk: its file, or its shards and their index."""
        n = sum(s.path.stat().st_size for s in self.shards)
        return n + (self.path.stat().st_size if self.sharded else 0)

    @property
    def n_chunks(self) -> int:
        return sum(s.n_chunks for s in self.shards)

    def check_chunks(self):
        """Decompresses every chunk of every shard once and checks its size and XXH3 checksum."""
        for s in self.shards:
            s.check_chunks()

    def compressed_share(self, name) -> float:
        return self[name].file.compressed_share(name)

    def close(self):
        for s in self.shards:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"DeltaFile({str(self.path)!r}, {len(self.tensors)} tensors, {self.compressed_bytes} bytes)"


def shard_index_path(path) -> Path:
    """Where a sharded delta written to `path` (NAME.xor.safetensors) keeps its index."""
    path = Path(path)
    return path.with_name(path.name + ".index.json")


def _shard_index_of(path: Path) -> Path | None:
    """The shard index `path` stands for, or None for a single file: the index itself, or NAME.xor.safetensors
    when only NAME.xor.safetensors.index.json exists."""
    if path.name.endswith(".index.json"):
        return path
    if not path.exists() and shard_index_path(path).is_file():
        return shard_index_path(path)
    return None


def _raise(e):
    raise e


def load_delta(path) -> DeltaFile:
    """Opens and validates a delta (a .xor.safetensors file, or the shard index of a sharded one; the path
    NAME.xor.safetensors names either); tensors decode lazily on access."""
    return DeltaFile(path)
