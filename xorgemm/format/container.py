"""The .xor.safetensors container: a safetensors file holding an index, a chunk table and zstd chunks.

Layout (docs/format.md is the spec):
  __metadata__  {"format": "xorgemm.delta", "format_version": "1", "index_bytes": n, "index_xxh3": h, ...}
  "index"       U8: the index (per-tensor dtype, shape, tile shape, codec mix, span, hashes) as zstd'd JSON
  "chunks"      I64 [n_chunks, 4]: compressed offset, compressed size, raw size, XXH3-64 of the raw bytes
  "payload"     U8 [..]: the chunks, each an independent zstd frame (nvCOMP's batched zstd can take them)

The chunks decompress to one logical *stream*; each tensor's bytes are a span of it (a delta section, see
csrc/format/delta_section.h, or the raw bytes of a tensor stored whole). Every field is validated before
use, so a truncated, corrupted or crafted file is refused with a message naming the file and tensor.
"""
from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash
import zstandard

from xorgemm._native import C
from xorgemm.errors import BaseMismatchError, DeltaFormatError, InputError, where
from xorgemm.format.gpu_decompress import GpuZstdBatch, decompressor_for
from xorgemm.format.layout import (
    CODEC_NAMES,
    DTYPES,
    MAX_TILE_ELEMS,
    TILE_ALIGN,
    Grid,
    dtype_name,
    grid_of,
    tensor_bytes,
)

FORMAT = "xorgemm.delta"
FORMAT_VERSION = 1
KINDS = ("xor", "same", "whole")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # bounds any single decompression, whatever the file claims
HASH_HEX = 16


def digest(data: torch.Tensor | bytes) -> str:
    """XXH3-64 of a tensor's bytes (~10 GB/s): tells a wrong base or a corrupted result apart."""
    buf = tensor_bytes(data).numpy() if isinstance(data, torch.Tensor) else data
    return xxhash.xxh3_64_hexdigest(memoryview(buf))


def sniff_pickle(head: bytes) -> bool:
    """torch.save zip archives and raw pickles (refused, never loaded), from a file's first 9 bytes. A
    safetensors file has '{' at byte 8, whatever its 8-byte header length (which may well start 0x80)."""
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


# ----------------------------------------------------------------------------------------------- writing


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
    """Writes the container atomically: a temporary file in the same folder, fsync, then rename."""
    # The index is a zstd'd JSON tensor, not a metadata string: metadata values are strings, so nested JSON
    # would be escaped, and the index of a large model runs to megabytes.
    raw_index = json.dumps(index, separators=(",", ":")).encode()
    packed_index = zstandard.ZstdCompressor(level=19).compress(raw_index)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "index_bytes": str(len(raw_index)),
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


def atomic_write(path, parts):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class DeltaTensor:
    """One tensor's entry in a delta file; decodes lazily from the file it came from."""

    name: str
    kind: str  # "xor": tiled XOR section; "same": identical to base; "whole": stored whole (new / reshaped)
    dtype: torch.dtype
    shape: tuple[int, ...]
    tile: tuple[int, int] | None
    span: tuple[int, int]  # (offset, length) in the decoded stream
    base_hash: str | None
    ft_hash: str
    tile_counts: tuple[int, ...]  # tiles per codec, in CODEC_NAMES order
    reason: str | None = None  # why a "whole" tensor is whole: "new" or "reshaped"
    file: DeltaFile = field(repr=False, default=None)
    _offsets: torch.Tensor | None = field(repr=False, default=None)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def grid(self) -> Grid:
        return grid_of(self.shape, self.tile, self.dtype)

    def _where(self) -> str:
        return where(self.file.path, self.name)

    def section(self) -> torch.Tensor:
        """The validated delta section (tile table + payloads) as a uint8 tensor."""
        if self.kind != "xor":
            raise InputError(f"{self._where()}: is stored as '{self.kind}', it has no tile section")
        sec = self.file.read_span(*self.span, tensor=self.name)
        if self._offsets is None:
            try:
                self._offsets = C.validate_section(sec, *self.grid.args)
            except C.FormatError as e:
                raise DeltaFormatError(f"{self._where()}: malformed delta section: {e}") from None
        return sec

    def resident(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The section and its tile payload offsets on `device`, ready for the kernels. Bound for a GPU, the
        chunks are decompressed there by nvCOMP when it is installed (xorgemm[cuda]; see gpu_decompress.py)
        and only the tile table comes back to be checked; otherwise zstandard decodes them on the CPU, the
        whole section is validated and copied over. Both give the same bytes."""
        device = torch.device(device)
        if decompressor_for(device) == "cpu":
            sec = self.section()
            return sec.to(device), self._offsets.to(device)
        if self.kind != "xor":
            raise InputError(f"{self._where()}: is stored as '{self.kind}', it has no tile section")
        sec = self.file.read_span_on(*self.span, device, tensor=self.name)
        table = sec[: self.grid.num_tiles * 8].cpu()
        try:
            offsets = C.table_offsets(table, sec.numel(), *self.grid.args)
        except C.FormatError as e:
            raise DeltaFormatError(f"{self._where()}: malformed delta section: {e}") from None
        return sec, offsets.to(device)

    def tile_table(self) -> np.ndarray:
        """Per tile: n_exc, codec, low_bytes (the 8-byte entries of the section's table)."""
        sec = self.section()
        entry = np.dtype([("n_exc", "<u4"), ("codec", "u1"), ("low_bytes", "u1"), ("reserved", "<u2")])
        return np.frombuffer(sec.numpy()[: self.grid.num_tiles * 8], dtype=entry).copy()

    def check_base(self, base: torch.Tensor, *, hash_check: bool = True, base_digest: str | None = None):
        """Refuses a base tensor this delta was not made from (dtype, shape, then content hash; `base_digest`
        is the base's digest() when the caller has it already)."""
        if self.kind == "whole":
            return
        if base is None:
            raise BaseMismatchError(f"{self._where()}: the base has no such tensor")
        if base.dtype != self.dtype or tuple(base.shape) != self.shape:
            raise BaseMismatchError(
                f"{self._where()}: base is {dtype_name_safe(base.dtype)} {list(base.shape)}, the delta was made "
                f"against {dtype_name(self.dtype)} {list(self.shape)}")
        if hash_check:
            got = base_digest if base_digest is not None else digest(base)
            if got != self.base_hash:
                raise BaseMismatchError(
                    f"{self._where()}: base bytes do not match the base this delta was made from (hash "
                    f"{got} != {self.base_hash})")

    def apply(self, base: torch.Tensor | None, *, verify: bool = True) -> torch.Tensor:
        """The fine-tuned tensor, bit for bit, on the base's device (a CUDA base is patched by a GPU kernel);
        `base` may be None for tensors stored whole, which come back on the CPU. `verify=False` skips the
        two content hashes (base in, fine-tune out) for a base already known to be the right one; the chunk
        checksums and the section validation still run."""
        self.check_base(base, hash_check=verify)
        if self.kind == "same":
            out = base.detach().clone().contiguous()
        elif self.kind == "whole":
            raw = self.file.read_span(*self.span, tensor=self.name)
            out = raw.view(self.dtype).reshape(self.shape).clone()
        else:
            sec = self.section()
            base = base.detach().contiguous()
            out_bytes = torch.empty(self.nbytes, dtype=torch.uint8, device=base.device)
            base_bytes = base.reshape(-1).view(torch.uint8)
            if base.is_cuda:
                CUDA = cuda_extension(self._where())
                CUDA.apply_section(sec.to(base.device), self._offsets.to(base.device), base_bytes, out_bytes,
                                   *self.grid.args)
            else:
                C.apply_section(sec, self._offsets, base_bytes, out_bytes, *self.grid.args)
            out = out_bytes.view(self.dtype).reshape(self.shape)
        if verify and digest(out) != self.ft_hash:
            raise DeltaFormatError(f"{self._where()}: reconstructed bytes do not match the fine-tune's recorded "
                                   "hash: the file is corrupted")
        return out

    def xor_bytes(self) -> torch.Tensor:
        """The XOR of base and fine-tuned bytes (flat uint8), decoded from the section."""
        sec = self.section()
        out = torch.zeros(self.nbytes, dtype=torch.uint8)
        C.apply_section(sec, self._offsets, out, out, *self.grid.args)
        return out


def cuda_extension(context: str):
    from xorgemm._native import CUDA

    if CUDA is None:
        raise InputError(f"{context}: the base is on a GPU but xorgemm was built without its CUDA extension "
                         "(rebuild where nvcc and a CUDA build of torch are present)")
    return CUDA


def dtype_name_safe(dtype) -> str:
    try:
        return dtype_name(dtype)
    except ValueError:
        return str(dtype)


class DeltaFile:
    """A validated, lazily decoded .xor.safetensors file. Use `load_delta(path)`."""

    def __init__(self, path):
        self.path = Path(path)
        self._mm = None
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._open()

    # --- parsing and validation

    def _fail(self, msg, tensor=None):
        raise DeltaFormatError(f"{where(self.path, tensor)}: {msg}")

    def _open(self):
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise InputError(f"{self.path}: is not a file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(9)
            if sniff_pickle(head):
                self._fail("is a pickle / torch.save checkpoint; xorgemm never unpickles, expected a .xor.safetensors "
                           "delta")
            if len(head) < 8:
                self._fail("is not a safetensors file (shorter than its 8-byte header length)")
            (hlen,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                self._fail(f"is truncated or not a safetensors file (header of {hlen} bytes, file of {size})")
            try:
                header = json.loads(f.read(hlen).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._fail("is not a safetensors file (its header is not JSON)")
        if not isinstance(header, dict):
            self._fail("is not a safetensors file (its header is not a JSON object)")
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            self._fail("is a safetensors file but not an xorgemm delta (no 'format: xorgemm.delta' metadata)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            self._fail(f"has format version {meta.get('format_version')!r}; "
                       f"this xorgemm reads version {FORMAT_VERSION}")
        self.format_version = FORMAT_VERSION
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
        self._mm = _map(self.path, size)
        self.index = self._read_index(meta, *spans["index"][:2])
        off, n, shape = spans["chunks"]
        if shape[1:] != [4]:
            self._fail("has a chunk table that is not [n, 4]")
        self.chunks = np.frombuffer(self._mm, dtype="<i8", count=n // 8, offset=off).reshape(-1, 4)
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
        problem, raw = decompress_exact(self._mm[off:off + n], raw_len, check)
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
        if ix.get("codecs") != list(CODEC_NAMES):
            self._fail(f"declares codecs {ix.get('codecs')!r}; this xorgemm knows {list(CODEC_NAMES)}")
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
        if not _is_hash(ft_hash) or (kind != "whole" and not _is_hash(base_hash)):
            bad("hashes are missing or malformed")
        tile = None
        counts = tuple(e.get("tiles", (0,) * len(CODEC_NAMES)))
        if kind == "xor":
            tile = e.get("tile")
            if (not _int_list(tile, 1) or len(tile) != 2 or min(tile) <= 0 or tile[0] * tile[1] > MAX_TILE_ELEMS):
                bad(f"tile shape {tile!r} is invalid")
            tile = tuple(tile)
            if numel == 0:
                bad("an empty tensor cannot have a tile section")
            grid = grid_of(shape, tile, dtype)
            if len(counts) != len(CODEC_NAMES) or not all(isinstance(c, int) and c >= 0 for c in counts) \
                    or sum(counts) != grid.num_tiles:
                bad(f"tile counts {list(counts)} do not match the {grid.num_tiles} tiles of shape {list(shape)}")
            if span[1] < grid.num_tiles * 8:
                bad(f"its section of {span[1]} bytes cannot hold {grid.num_tiles} tile entries")
        elif kind == "whole":
            if span[1] != numel * esize:
                bad(f"is stored whole in {span[1]} bytes but {list(shape)} {e['dtype']} needs {numel * esize}")
        elif span[1] != 0:
            bad("is identical to its base but claims stored bytes")
        if kind == "same" and base_hash != ft_hash:
            bad("is marked identical to its base but its hashes differ")
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

    @property
    def compressed_bytes(self) -> int:
        return self._payload_len

    def _chunk(self, i: int, tensor=None) -> bytes:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        off, n, raw_len, check = (int(v) for v in self.chunks[i])
        problem, raw = decompress_exact(self._mm[self._payload_off + off: self._payload_off + off + n], raw_len, check)
        if problem:
            self._fail(f"chunk {i} is corrupted ({problem})", tensor)
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
            chunk = self._chunk(i, tensor)
            start = int(self._raw_starts[i])
            lo, hi = max(offset - start, 0), min(offset + length - start, len(chunk))
            at = start + lo - offset
            dst[at:at + hi - lo] = np.frombuffer(chunk, dtype=np.uint8, count=hi - lo, offset=lo)
        return out

    def read_span_on(self, offset: int, length: int, device, tensor=None) -> torch.Tensor:
        """read_span, decompressed on a GPU by nvCOMP (gpu_decompress.py): the result lives on `device`."""
        if length == 0:
            return torch.empty(0, dtype=torch.uint8, device=device)
        frames, sizes, start = self.span_frames(offset, length)
        raw = GpuZstdBatch(frames, sizes, device, where(self.path, tensor)).decode()
        return raw[start:start + length].clone()  # its own allocation: aligned, and the rest is freed

    def span_frames(self, offset: int, length: int) -> tuple[list, list[int], int]:
        """The compressed chunks (zstd frames, views of the file) covering stream bytes [offset, offset+length),
        their decompressed sizes, and where the span starts in their concatenated output. Unchecked: for a
        decoder that checks sizes itself (nvCOMP's); read_span checks the XXH3 sums."""
        first, last = self._chunk_range(offset, length)
        frames, sizes = [], []
        for i in range(first, last + 1):
            off, n, raw_len, _ = (int(v) for v in self.chunks[i])
            frames.append(self._mm[self._payload_off + off: self._payload_off + off + n])
            sizes.append(raw_len)
        return frames, sizes, offset - int(self._raw_starts[first])

    def _chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        """First and last chunk holding stream bytes [offset, offset+length), length > 0."""
        return (bisect.bisect_right(self._raw_starts, offset) - 1,
                bisect.bisect_right(self._raw_starts, offset + length - 1) - 1)

    def compressed_share(self, name) -> float:
        """On-disk bytes attributable to a tensor: its share of every chunk its span touches."""
        t = self[name]
        off, n = t.span
        if n == 0:
            return 0.0
        total = 0.0
        first, last = self._chunk_range(off, n)
        for i in range(first, last + 1):
            lo, hi = int(self._raw_starts[i]), int(self._raw_starts[i + 1])
            total += self.chunks[i, 1] * (min(hi, off + n) - max(lo, off)) / (hi - lo)
        return total

    def close(self):
        self._cache.clear()
        self.chunks = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"DeltaFile({str(self.path)!r}, {len(self.tensors)} tensors, {self.compressed_bytes} bytes)"


_LOCAL = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """A per-thread decompressor, reused: creating one per 64 KiB chunk costs more than the chunk."""
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def checksum(raw: bytes) -> int:
    """XXH3-64 of a chunk, as the signed 64-bit integer the I64 chunk table stores."""
    h = xxhash.xxh3_64_intdigest(raw)
    return h - (1 << 64) if h >= 1 << 63 else h


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


def _map(path, size):
    if size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _int_list(v, ndim_min, allow_empty=False) -> bool:
    return (isinstance(v, list) and (allow_empty or len(v) >= ndim_min)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


def _is_hash(h) -> bool:
    return isinstance(h, str) and len(h) == HASH_HEX and all(ch in "0123456789abcdef" for ch in h)


def load_delta(path) -> DeltaFile:
    """Opens and validates a .xor.safetensors delta; tensors decode lazily on access."""
    return DeltaFile(path)


def base_fingerprint(base_hashes: dict[str, str]) -> str:
    """One hash for a whole base model: over the sorted (name, base hash) pairs the delta depends on."""
    h = xxhash.xxh3_64()
    for name in sorted(base_hashes):
        h.update(name.encode() + b"\0" + base_hashes[name].encode() + b"\n")
    return h.hexdigest()


__all__ = ["DeltaFile", "DeltaTensor", "StreamWriter", "load_delta", "write_delta_file", "atomic_write", "digest",
           "base_fingerprint", "sniff_pickle", "FORMAT", "FORMAT_VERSION"]
