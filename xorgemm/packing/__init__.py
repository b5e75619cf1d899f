"""pack / unpack / verify: a fine-tune as a lossless XOR delta against its base, and back, bit for bit.

The checkpoints come in through sources.py (state dicts, modules, .safetensors files, model folders)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from xorgemm._native import C
from xorgemm.errors import BaseMismatchError, InputError, XorgemmError
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
from xorgemm.format.reader import DeltaFile, load_delta
from xorgemm.format.writer import StreamWriter, atomic_path, write_delta_file
from xorgemm.packing.sources import TensorSource, open_source


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
    file_bytes: int = 0
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.file_bytes / max(1, self.finetuned_bytes)


class _DeltaBuilder:
    """One fine-tune's delta being written: its stream, its index entries and its report. Tensors are added
    one at a time (`add`), each against its base tensor, then the file is written (`finish`)."""

    def __init__(self, fsrc: TensorSource, out_path: Path, *, tile, level: int, chunk_bytes: int,
                 conditioned: bool):
        self.fsrc, self.tile, self.conditioned = fsrc, tile, conditioned
        self.writer = StreamWriter(chunk_bytes=chunk_bytes, level=level)
        self.report = PackReport(out_path)
        self.entries, self.base_hashes = {}, {}

    def add(self, name: str, bsrc: TensorSource, base_tensor):
        """Adds fine-tuned tensor `name`; `base_tensor()` gives the base's (bytes, digest), read once by the
        caller however many fine-tunes share it."""
        fsrc = self.fsrc
        fdtype, fshape = fsrc.meta(name)
        try:
            entry = {"dtype": dtype_name(fdtype), "shape": list(fshape)}
        except InputError as e:
            raise InputError(f"{fsrc.label}: tensor '{name}': {e}") from None
        ft = fsrc.get(name)
        counts = (0,) * len(CODEC_NAMES)
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
                bb, bdigest = base_tensor()
                fb = tensor_bytes(ft)
                entry["base"] = self.base_hashes[name] = bdigest
                if torch.equal(bb, fb):
                    entry["kind"] = "same"
                else:
                    t = tile_for(fshape, self.tile)
                    grid = grid_of(fshape, t, fdtype)
                    shift = context_shift(fdtype, fshape) if self.conditioned else -1
                    section = C.encode_section(bb, fb, grid, shift)
                    counts = tuple(C.codec_counts(section, grid))
                    entry.update(kind="xor", tile=list(t), tiles=list(counts))
                    entry["span"] = list(self.writer.append(section.numpy()))
        if entry["kind"] == "whole":
            entry["span"] = list(self.writer.append(tensor_bytes(ft).numpy()))
        entry.setdefault("span", [0, 0])
        entry["ft"] = digest(ft)
        self.entries[name] = entry
        nbytes = _nbytes(fdtype, fshape)
        self.report.tensors.append(TensorReport(name, entry["kind"], entry["dtype"], tuple(fshape), nbytes,
                                                entry["span"][1], counts))
        self.report.finetuned_bytes += nbytes
        return nbytes

    def finish(self, level: int, chunk_bytes: int) -> PackReport:
        """Writes the file (atomically) and returns the report."""
        writer, entries = self.writer, self.entries
        table, payload = writer.finish()
        # The oldest format version whose codecs hold every tile: a file without conditioned tiles stays
        # readable by an xorgemm that predates them.
        version = min(v for v, names in VERSION_CODECS.items()
                      if all(not any(e.get("tiles", [])[len(names):]) for e in entries.values()))
        codecs = list(VERSION_CODECS[version])
        for e in entries.values():
            if "tiles" in e:
                e["tiles"] = e["tiles"][:len(codecs)]
        index = {"stream_bytes": writer.stream_bytes, "chunk_bytes": chunk_bytes, "zstd_level": level,
                 "codecs": codecs, "base_fingerprint": base_fingerprint(self.base_hashes), "tensors": entries}
        write_delta_file(self.report.path, index, table, payload)
        self.report.stream_bytes = writer.stream_bytes
        self.report.file_bytes = self.report.path.stat().st_size
        return self.report


def _output_file(out_path) -> Path:
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise InputError(f"{out_path}: the folder {out_path.parent} does not exist")
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a folder; the output must be a file path")
    return out_path


def pack(base, finetuned, out_path, *, tile=DEFAULT_TILE, level: int = 3, chunk_bytes: int = 64 * 1024,
         progress: bool = False, conditioned: bool = True) -> PackReport:
    """Writes `finetuned` as an XOR delta against `base` to `out_path` (a .xor.safetensors file).

    `base` and `finetuned` are state dicts, modules, .safetensors files or Hugging Face model folders.
    Tensors equal to the base cost an index entry; tensors new in the fine-tune or with another shape are
    stored whole. A dtype that differs from the base's is refused: casting is the caller's choice.
    `conditioned=False` keeps to the XOR codecs (format version 1: what an older xorgemm reads, and the
    benchmarks' baseline); by default tiles may use the base-conditioned codec where it is smaller.
    """
    t0 = time.perf_counter()
    out_path = _output_file(out_path)
    tile_for((1, 1), tile)  # refuses a bad tile shape before any work
    bsrc = open_source(base, "base")
    fsrc = open_source(finetuned, "finetuned")
    builder = _DeltaBuilder(fsrc, out_path, tile=tile, level=level, chunk_bytes=chunk_bytes,
                            conditioned=conditioned)
    names = fsrc.names()
    total = sum(_nbytes(*fsrc.meta(n)) for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="pack", disable=_quiet(progress), leave=False) as bar:
        for name in names:
            bar.update(builder.add(name, bsrc, lambda name=name: _base_bytes(bsrc, name)))
    report = builder.finish(level, chunk_bytes)
    report.seconds = time.perf_counter() - t0
    return report


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
              progress: bool = False, conditioned: bool = True) -> ManyPackReport:
    """Packs several fine-tunes of one base, reading each base tensor once: `finetuned` is a list of paths
    (each delta named after its folder or file: OUT_DIR/<name>.xor.safetensors) or a {name: source} dict.
    A fine-tune that fails (unreadable, another dtype, a tensor the base lacks in a way pack refuses) is
    reported in the result's `failed` and skipped; the others are written. `out_dir` is created if
    missing (its parent must exist)."""
    t0 = time.perf_counter()
    tile_for((1, 1), tile)
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
    bsrc = open_source(base, "base")
    result = ManyPackReport()
    builders: dict[str, _DeltaBuilder] = {}
    for name, src in sources.items():
        try:
            builders[name] = _DeltaBuilder(open_source(src, "finetuned"), out_dir / f"{name}.xor.safetensors",
                                           tile=tile, level=level, chunk_bytes=chunk_bytes, conditioned=conditioned)
        except XorgemmError as e:
            result.failed[name] = str(e)
    order = list(dict.fromkeys(n for b in builders.values() for n in b.fsrc.names()))
    bars = {name: tqdm(total=sum(_nbytes(*b.fsrc.meta(n)) for n in b.fsrc.names()), unit="B", unit_scale=True,
                       desc=name, position=i, disable=_quiet(progress), leave=False)
            for i, (name, b) in enumerate(builders.items())}
    try:
        for tname in order:
            cached = []  # the base tensor's bytes and digest, read at most once for every fine-tune

            def base_tensor(tname=tname, cached=cached):
                if not cached:
                    cached.append(_base_bytes(bsrc, tname))
                return cached[0]

            for name, b in list(builders.items()):
                if tname not in b.fsrc:
                    continue
                try:
                    bars[name].update(b.add(tname, bsrc, base_tensor))
                except XorgemmError as e:
                    result.failed[name] = str(e)
                    del builders[name]
        for name, b in builders.items():
            try:
                result.reports[name] = b.finish(level, chunk_bytes)
            except XorgemmError as e:
                result.failed[name] = str(e)
    finally:
        for bar in bars.values():
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _quiet(progress: bool):
    """tqdm's `disable`: None shows the bar on a terminal only."""
    return None if progress else True


def _nbytes(dtype, shape) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


@contextlib.contextmanager
def _open_delta(delta):
    """A DeltaFile for a path or DeltaFile; one opened here is closed (its map released) afterwards."""
    if isinstance(delta, DeltaFile):
        yield delta
    else:
        with load_delta(delta) as d:
            yield d


def _base_tensor(bsrc: TensorSource, delta, name):
    dt = delta[name]
    if dt.kind == "whole":
        return None
    if name not in bsrc:
        raise BaseMismatchError(f"{delta.path}: tensor '{name}': the base ({bsrc.label}) has no such tensor; this "
                                "delta was made against another model")
    return bsrc.get(name)


def unpack(base, delta, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """The fine-tuned state dict, bit for bit, from `base` and a delta file (path or DeltaFile)."""
    bsrc = open_source(base, "base")
    out = {}
    with _open_delta(delta) as d:
        for name in tqdm(list(d), desc="unpack", unit="tensor", disable=_quiet(progress), leave=False):
            out[name] = d[name].apply(_base_tensor(bsrc, d, name), base_label=bsrc.label)
    return out


@dataclass
class VerifyReport:
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing_in_delta: list[str] = field(default_factory=list)
    extra_in_delta: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing_in_delta or self.extra_in_delta)


def verify(base, delta, finetuned, *, progress: bool = False) -> VerifyReport:
    """Reconstructs every tensor and compares it byte for byte with the fine-tune."""
    bsrc = open_source(base, "base")
    fsrc = open_source(finetuned, "finetuned")
    rep = VerifyReport()
    fnames = set(fsrc.names())
    with _open_delta(delta) as d:
        rep.missing_in_delta = sorted(fnames - set(d))
        rep.extra_in_delta = sorted(set(d) - fnames)
        todo = [n for n in d if n in fnames]
        for name in tqdm(todo, desc="verify", unit="tensor", disable=_quiet(progress), leave=False):
            got = d[name].apply(_base_tensor(bsrc, d, name), base_label=bsrc.label)
            want = fsrc.get(name)
            same = (got.dtype == want.dtype and got.shape == want.shape
                    and torch.equal(tensor_bytes(got), tensor_bytes(want)))
            rep.checked += 1
            if not same:
                rep.mismatched.append(name)
    return rep


def save_state_dict(sd: dict[str, torch.Tensor], path):
    """Writes a state dict as .safetensors atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp)


__all__ = ["pack", "pack_many", "unpack", "verify", "save_state_dict", "PackReport", "ManyPackReport", "VerifyReport",
           "XorgemmError"]
