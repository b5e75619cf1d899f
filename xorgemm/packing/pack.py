"""pack / pack_many: fine-tunes written as lossless XOR deltas against their base, tensor by tensor.

Each tensor is read, encoded and compressed on a worker thread (pipeline.py) and its chunks streamed to
the delta's file in tensor order, so memory holds a few tensors, never a model, and the file is the same
whatever the timing. Past `max_file_bytes` the delta is written as shards (format/writer.py)."""
from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xorgemm._native import C
from xorgemm.errors import InputError, XorgemmError
from xorgemm.format.hashes import base_fingerprint, digest
from xorgemm.format.layout import (
    CODEC_NAMES,
    DEFAULT_TILE,
    VERSION_CODECS,
    context_shift,
    dtype_name,
    grid_of,
    tensor_bytes,
    tile_for,
)
from xorgemm.format.writer import DeltaWriter, Span, check_stream_args, compress_span
from xorgemm.packing.pipeline import bounded_map, memory_budget
from xorgemm.packing.sources import SafetensorsSource, TensorSource, open_source, opened

DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's shard size: a delta past it is written as shards


def parse_size(text) -> int:
    """A size in bytes from an int or text such as '5GB', '500MB', '2GiB' (decimal and binary units, as
    Hugging Face's max_shard_size takes them)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise InputError(f"size {text!r} is not a number of bytes such as 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        n = int(float(m.group(1)) * scale)
    if n < 1:
        raise InputError(f"size {text!r} must be at least one byte")
    return n


@dataclass
class TensorReport:
    name: str
    kind: str
    dtype: str
    shape: tuple
    nbytes: int  # fine-tuned tensor bytes
    stored_bytes: int  # bytes in the decoded stream (section or whole tensor), before zstd
    tile_counts: tuple = (0,) * len(CODEC_NAMES)


@dataclass
class PackReport:
    path: Path
    tensors: list[TensorReport] = field(default_factory=list)
    finetuned_bytes: int = 0
    stream_bytes: int = 0
    file_bytes: int = 0  # every file written: one, or the shards and their index
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.file_bytes / max(1, self.finetuned_bytes)


@dataclass
class _Encoded:
    """One tensor of one fine-tune, ready to be written: its index entry (less its span) and its chunks."""

    entry: dict
    span: Span | None
    counts: tuple
    nbytes: int


class _DeltaBuilder:
    """One fine-tune's delta being written. Each tensor is encoded (`encode`, on any thread) against its base
    tensor, then written in order (`commit`), then the file is completed (`finish`)."""

    def __init__(self, fsrc: TensorSource, out_path: Path, *, tile, level: int, chunk_bytes: int,
                 conditioned: bool, max_shard_bytes: int):
        self.fsrc, self.tile, self.conditioned = fsrc, tile, conditioned
        self.level, self.chunk_bytes = level, chunk_bytes
        self.writer = DeltaWriter(out_path, max_file_bytes=max_shard_bytes, chunk_bytes=chunk_bytes,
                                  level=level)
        self.report = PackReport(Path(out_path))
        layout = fsrc.layout()
        self.file_of, self.file_meta = layout if layout else ({}, {})

    def nbytes(self, name: str) -> int:
        return _nbytes(*self.fsrc.meta(name))

    def encode(self, name: str, bsrc: TensorSource, base_tensor) -> _Encoded:
        """Fine-tuned tensor `name`, encoded; `base_tensor()` gives the base's (bytes, digest), read once by
        the caller however many fine-tunes share it. Changes nothing: safe on a worker thread."""
        fsrc = self.fsrc
        fdtype, fshape = fsrc.meta(name)
        try:
            entry = {"dtype": dtype_name(fdtype), "shape": list(fshape)}
        except InputError as e:
            raise InputError(f"{fsrc.label}: tensor '{name}': {e}") from None
        ft = tensor_bytes(fsrc.get(name))
        counts, data = (0,) * len(CODEC_NAMES), None
        if name not in bsrc:
            entry.update(kind="whole", reason="new")
        else:
            bdtype, bshape = bsrc.meta(name)
            if bdtype != fdtype:
                raise InputError(f"{fsrc.label}: tensor '{name}' is {dtype_name(fdtype)} but the base "
                                 f"({bsrc.label}) has {dtype_name(bdtype)}; cast one of them explicitly first")
            if bshape != fshape:
                entry.update(kind="whole", reason="reshaped")
            else:
                bb, entry["base"] = base_tensor()
                if torch.equal(bb, ft):
                    entry["kind"] = "same"
                else:
                    t = tile_for(fshape, self.tile)
                    grid = grid_of(fshape, t, fdtype)
                    shift = context_shift(fdtype, fshape) if self.conditioned else -1
                    data = C.encode_section(bb, ft, grid, shift)
                    counts = tuple(C.codec_counts(data, grid))
                    entry.update(kind="xor", tile=list(t), tiles=list(counts))
        entry["ft"] = digest(ft)
        if entry["kind"] == "whole":
            data = ft
        ft = bb = None  # noqa: F841  freed before the chunks are made: in flight, at most 3 x the tensor
        if name in self.file_of:
            entry["file"] = self.file_of[name]
        span = compress_span(data.numpy(), self.chunk_bytes, self.level) if data is not None else None
        return _Encoded(entry, span, counts, _nbytes(fdtype, fshape))

    def commit(self, name: str, enc: _Encoded):
        self.writer.add(name, enc.entry, enc.span)
        e = enc.entry
        self.report.tensors.append(TensorReport(name, e["kind"], e["dtype"], tuple(e["shape"]), enc.nbytes,
                                                e["span"][1], enc.counts))
        self.report.finetuned_bytes += enc.nbytes

    def _index(self, entries: dict) -> dict:
        """A container's index, but its stream size and tensors: in the oldest format version whose codecs
        hold its tiles (a file without conditioned tiles stays readable by an xorgemm that predates them)."""
        version = min(v for v, names in VERSION_CODECS.items()
                      if all(not any(e.get("tiles", [])[len(names):]) for e in entries.values()))
        codecs = list(VERSION_CODECS[version])
        for e in entries.values():
            if "tiles" in e:
                e["tiles"] = e["tiles"][:len(codecs)]
        hashes = {n: e["base"] for n, e in entries.items() if "base" in e}
        index = {"chunk_bytes": self.chunk_bytes, "zstd_level": self.level, "codecs": codecs,
                 "base_fingerprint": base_fingerprint(hashes)}
        if entries and all("file" in e for e in entries.values()):  # the fine-tune's files, for unpack
            index["files"] = {f: self.file_meta[f] for f in sorted({e["file"] for e in entries.values()})}
        return index

    def finish(self) -> PackReport:
        """Writes the file or shards (atomically) and returns the report."""
        self.report.files = self.writer.finish(self._index)
        self.report.stream_bytes = self.writer.written_stream_bytes
        self.report.file_bytes = sum(f.stat().st_size for f in self.report.files)
        return self.report

    def abort(self):
        self.writer.abort()


def pack(base, finetuned, out_path, *, tile=DEFAULT_TILE, level: int = 3, chunk_bytes: int = 64 * 1024,
         progress: bool = False, conditioned: bool = True,
         max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> PackReport:
    """Writes `finetuned` as an XOR delta against `base` to `out_path` (a .xor.safetensors file).

    `base` and `finetuned` are state dicts, modules, .safetensors files or Hugging Face model folders.
    Tensors equal to the base cost an index entry; tensors new in the fine-tune or with another shape are
    stored whole. A dtype that differs from the base's is refused: casting is the caller's choice.
    `conditioned=False` keeps to the XOR codecs (format version 1: what an older xorgemm reads, and the
    benchmarks' baseline); by default tiles may use the base-conditioned codec where it is smaller.
    A delta whose payload would pass `max_shard_size` (bytes, or text such as '5GB') is written as shards of
    whole tensors, NAME-0000i-of-0000n.xor.safetensors, with NAME.xor.safetensors.index.json;
    `load_delta(out_path)` reads either form. Memory holds a few tensors at a time (see pipeline.py),
    whatever the model's size.
    """
    t0 = time.perf_counter()
    max_shard_bytes = _check_args(tile, level, chunk_bytes, max_shard_size)
    out_path = _output_file(out_path)
    with opened(base, "base") as bsrc, opened(finetuned, "finetuned") as fsrc, _naming(out_path):
        report = _pack(bsrc, fsrc, out_path, tile=tile, level=level, chunk_bytes=chunk_bytes, progress=progress,
                       conditioned=conditioned, max_shard_bytes=max_shard_bytes)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _naming(out_path):
    """A write's OSError (a full disk) names no file: say which output it was."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise InputError(f"{out_path}: cannot be written ({e.strerror or e})") from None


def _pack(bsrc, fsrc, out_path, *, tile, level, chunk_bytes, progress, conditioned, max_shard_bytes) -> PackReport:
    builder = _DeltaBuilder(fsrc, out_path, tile=tile, level=level, chunk_bytes=chunk_bytes,
                            conditioned=conditioned, max_shard_bytes=max_shard_bytes)
    try:
        sizes = {n: builder.nbytes(n) for n in fsrc.names()}

        def encode(name):
            return builder.encode(name, bsrc, lambda: _base_bytes(bsrc, name))

        # In flight per tensor: the base's and the fine-tune's bytes, then the section and its chunks.
        budget = memory_budget(3 * max(sizes.values(), default=0))
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="pack", disable=_quiet(progress),
                  leave=False) as bar:
            for name, enc in bounded_map(encode, sizes, lambda n: 3 * sizes[n], budget=budget):
                builder.commit(name, enc)
                bar.update(enc.nbytes)
        return builder.finish()
    except BaseException:
        builder.abort()
        raise


def _check_args(tile, level, chunk_bytes, max_shard_size) -> int:
    """Refuses bad settings before any work; returns the shard size in bytes."""
    tile_for((1, 1), tile)
    check_stream_args(chunk_bytes, level)
    return parse_size(max_shard_size)


def _output_file(out_path) -> Path:
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise InputError(f"{out_path}: the folder {out_path.parent} does not exist")
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a folder; the output must be a file path")
    return out_path


def _base_bytes(bsrc: TensorSource, name: str):
    bb = tensor_bytes(bsrc.get(name))
    return bb, digest(bb)


def finetune_name(src) -> str:
    """The name a fine-tune's delta takes in pack_many: its folder's name, or its file's without
    `.safetensors`."""
    path = Path(src)
    return path.name[:-len(".safetensors")] if path.is_file() and path.name.endswith(".safetensors") else path.name


@dataclass
class ManyPackReport:
    reports: dict[str, PackReport] = field(default_factory=dict)  # the fine-tunes written
    failed: dict[str, str] = field(default_factory=dict)  # the others: name -> the error, one line
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def pack_many(base, finetuned, out_dir, *, tile=DEFAULT_TILE, level: int = 3, chunk_bytes: int = 64 * 1024,
              progress: bool = False, conditioned: bool = True,
              max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> ManyPackReport:
    """Packs several fine-tunes of one base, reading each base tensor once: `finetuned` is a list of paths
    (each delta named after its folder or file: OUT_DIR/<name>.xor.safetensors) or a {name: source} dict.
    A fine-tune that fails (unreadable, another dtype, a tensor the base lacks in a way pack refuses) is
    reported in the result's `failed` and skipped; the others are written. `out_dir` is created if
    missing (its parent must exist). Memory is bounded as pack's is, however many fine-tunes: each tensor
    of each fine-tune is a task of its own, and a tensor's base is kept only while its fine-tunes need it."""
    t0 = time.perf_counter()
    max_shard_bytes = _check_args(tile, level, chunk_bytes, max_shard_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; with several fine-tunes the output is a folder")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir}: the folder {out_dir.parent} does not exist")
    sources = dict(finetuned) if isinstance(finetuned, dict) else {finetune_name(f): f for f in finetuned}
    if not isinstance(finetuned, dict) and len(sources) != len(finetuned):
        names = [finetune_name(f) for f in finetuned]
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"fine-tunes {dup} would write the same delta name; pass a {{name: source}} dict")
    out_dir.mkdir(exist_ok=True)
    with opened(base, "base") as bsrc, _naming(out_dir):
        result = _pack_many(bsrc, sources, out_dir, tile=tile, level=level, chunk_bytes=chunk_bytes,
                            progress=progress, conditioned=conditioned, max_shard_bytes=max_shard_bytes)
    result.seconds = time.perf_counter() - t0
    return result


def _pack_many(bsrc, sources, out_dir, *, tile, level, chunk_bytes, progress, conditioned,
               max_shard_bytes) -> ManyPackReport:
    result = ManyPackReport()
    builders: dict[str, _DeltaBuilder] = {}
    opened_here: list[TensorSource] = []  # closed at the end, written or not
    sizes: dict[str, dict[str, int]] = {}
    for name, src in sources.items():
        b = None
        try:
            fsrc = open_source(src, "finetuned")
            if fsrc is not src:
                opened_here.append(fsrc)
            b = _DeltaBuilder(fsrc, out_dir / f"{name}.xor.safetensors", tile=tile,
                              level=level, chunk_bytes=chunk_bytes, conditioned=conditioned,
                              max_shard_bytes=max_shard_bytes)
            sizes[name] = {n: b.nbytes(n) for n in b.fsrc.names()}
            builders[name] = b
        except XorgemmError as e:
            result.failed[name] = str(e)
            if b is not None:
                b.abort()

    def fail(name, error):
        result.failed[name] = str(error)
        builders.pop(name).abort()

    # One task per (tensor, fine-tune), in tensor order: each fine-tune's chunks are written as soon as they
    # are made, and a tensor's base is read once, kept while its fine-tunes need it (a count), then freed.
    tasks = [(t, name) for t in dict.fromkeys(n for s in sizes.values() for n in s) for name in sizes
             if t in sizes[name]]
    waiting = {t: sum(t in s for s in sizes.values()) for t, _ in tasks}
    bases: dict[str, list] = {}
    lock = threading.Lock()

    def base_tensor(tname):
        with lock:
            cell = bases.setdefault(tname, [threading.Lock(), None])
        with cell[0]:  # the first task to need it reads it; the others wait for that read
            if cell[1] is None:
                cell[1] = _base_bytes(bsrc, tname)
            return cell[1]

    def encode(task):
        tname, name = task
        try:
            b = builders.get(name)
            return b.encode(tname, bsrc, lambda: base_tensor(tname)) if b is not None else None
        except XorgemmError as e:
            return e
        finally:
            with lock:
                waiting[tname] -= 1
                if not waiting[tname]:
                    bases.pop(tname, None)

    # In flight per task: the base (kept for the next fine-tune), the fine-tune's bytes, its section and chunks.
    cost = lambda task: 3 * sizes[task[1]][task[0]]  # noqa: E731
    bars = {name: tqdm(total=sum(sizes[name].values()), unit="B", unit_scale=True, desc=name, position=i,
                       disable=_quiet(progress), leave=False) for i, name in enumerate(builders)}
    try:
        budget = memory_budget(max(map(cost, tasks), default=0))
        for (tname, name), enc in bounded_map(encode, tasks, cost, budget=budget):
            if name not in builders or enc is None:
                continue  # failed on an earlier tensor
            if isinstance(enc, XorgemmError):
                fail(name, enc)
                continue
            builders[name].commit(tname, enc)
            bars[name].update(enc.nbytes)
        for name in list(builders):
            try:
                result.reports[name] = builders[name].finish()
            except XorgemmError as e:
                fail(name, e)
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        for bar in bars.values():
            bar.close()
        for fsrc in opened_here:
            if isinstance(fsrc, SafetensorsSource):
                fsrc.close()
    return result


def _quiet(progress: bool):
    """tqdm's `disable`: None shows the bar on a terminal only."""
    return None if progress else True


def _nbytes(dtype, shape) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n
