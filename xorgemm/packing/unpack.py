"""unpack / verify: a delta applied to its base, bit for bit, tensor by tensor.

`unpack_to` writes the fine-tune as .safetensors the way it came: the files pack recorded (a sharded
model's shards and index, each file's metadata), else the base's files, else one file; or shards of at most
`max_shard_size`. Each tensor is rebuilt on a worker thread and written at its place in its file as soon as
it is ready (pipeline.py), so memory holds a few tensors, never the model."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from xorgemm.errors import BaseMismatchError, InputError
from xorgemm.format.layout import dtype_name, tensor_bytes
from xorgemm.format.reader import DeltaFile, load_delta
from xorgemm.format.safetensors_io import Writer
from xorgemm.format.writer import _remove, _umask, atomic_path, atomic_write, files_listed_by, shard_name
from xorgemm.packing.pack import parse_size
from xorgemm.packing.pipeline import bounded_map, memory_budget
from xorgemm.packing.sources import TensorSource, opened

INDEX_NAME = "model.safetensors.index.json"  # a sharded Hugging Face model's index
SINGLE_NAME = "model.safetensors"  # an unsharded one's file
DEFAULT_METADATA = {"format": "pt"}  # what transformers expects of a .safetensors file it loads


@contextlib.contextmanager
def _open_delta(delta):
    """A DeltaFile for a path or DeltaFile; one opened here is closed afterwards."""
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
        raise BaseMismatchError(f"{dt.where()}: the base ({bsrc.label}) has no such tensor; this delta was made "
                                "against another model")
    return bsrc.get(name)


def _rebuild(d, bsrc: TensorSource, name: str) -> torch.Tensor:
    return d[name].apply(_base_tensor(bsrc, d, name), base_label=bsrc.label)


def _quiet(progress: bool):
    return None if progress else True


def unpack(base, delta, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """The fine-tuned state dict, bit for bit, from `base` and a delta (path or DeltaFile), in memory. To
    write it to disk without holding it, use unpack_to."""
    with opened(base, "base") as bsrc, _open_delta(delta) as d:
        return {name: _rebuild(d, bsrc, name)
                for name in tqdm(list(d), desc="unpack", unit="tensor", disable=_quiet(progress), leave=False)}


@dataclass
class UnpackReport:
    files: list[Path] = field(default_factory=list)  # the .safetensors written, then the index if any
    tensors: int = 0
    nbytes: int = 0  # tensor bytes written
    seconds: float = 0.0


def _common_metadata(metas) -> dict[str, str]:
    metas = list(metas)
    if not metas:
        return dict(DEFAULT_METADATA)
    return {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas[1:])}


def _plan(d: DeltaFile, bsrc: TensorSource, max_shard_size: int | None) -> dict[str, tuple[list[str], dict]]:
    """{file name: (its tensors, its metadata)}: shards of at most max_shard_size; else the fine-tune's files
    as pack recorded them; else the base's (a tensor the base lacks goes with the last); else one file."""
    names = list(d)
    if max_shard_size is not None:
        groups = shard_groups({n: d[n].nbytes for n in names}, max_shard_size)
        meta = _common_metadata(d.layout_files.values()) if d.layout_files else dict(DEFAULT_METADATA)
        if len(groups) == 1:
            return {SINGLE_NAME: (groups[0], meta)}
        return {shard_name("model", i + 1, len(groups)) + ".safetensors": (g, meta) for i, g in enumerate(groups)}
    if d.tensor_files:
        file_of, metas = d.tensor_files, d.layout_files
    elif bsrc.layout() is not None:
        base_of, metas = bsrc.layout()
        last = sorted(set(base_of.values()))[-1] if base_of else SINGLE_NAME
        file_of = {n: base_of.get(n, last) for n in names}
    else:
        file_of, metas = dict.fromkeys(names, SINGLE_NAME), {}
    plan: dict[str, tuple[list[str], dict]] = {}
    for n in names:
        f = file_of[n]
        plan.setdefault(f, ([], dict(metas.get(f) or DEFAULT_METADATA)))[0].append(n)
    return plan


def shard_groups(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensors in their order cut into shards of at most max_shard_size bytes, as transformers cuts them (a
    tensor larger than that alone in its own)."""
    groups, size = [[]], 0
    for n, b in sizes.items():
        if groups[-1] and size + b > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    return groups


def unpack_to(base, delta, out, *, max_shard_size=None, progress: bool = False) -> UnpackReport:
    """Rebuilds the fine-tune from `base` and `delta` and writes it, each file atomically, holding a few tensors
    at a time. `out` ending in .safetensors: one file. Otherwise a folder (created if missing) that receives
    the fine-tune's own files, with model.safetensors.index.json when there are several (see _plan); with
    `max_shard_size` (bytes, or text such as '5GB'), shards model-0000i-of-0000n.safetensors of at most that
    size instead."""
    t0 = time.perf_counter()
    out = Path(out)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    single = out.name.endswith(".safetensors")
    if single and limit is not None:
        raise InputError(f"{out}: a shard size asks for a folder of shards, but the output names one .safetensors "
                         "file")
    folder = out.parent if single else out
    if not out.parent.is_dir():
        raise InputError(f"{out}: the folder {out.parent} does not exist")
    if single and out.is_dir():
        raise InputError(f"{out}: is a folder; name a .safetensors file, or a folder without the suffix")
    if not single and out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; the fine-tune's files are written into a folder (or name a "
                         ".safetensors file to write one)")
    report = UnpackReport()
    with opened(base, "base") as bsrc, _open_delta(delta) as d:
        plan = _plan(d, bsrc, limit)
        if single:
            plan = {out.name: (list(d), _common_metadata(m for _, m in plan.values()))}
        folder.mkdir(exist_ok=True)
        writers: dict[str, Writer] = {}
        where: dict[str, Writer] = {}
        try:
            for fname, (names, meta) in plan.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", suffix=".tmp", dir=folder)
                os.close(fd)
                try:
                    w = writers[fname] = Writer(tmp, {n: (dtype_name(d[n].dtype), d[n].shape) for n in names}, meta)
                except BaseException:
                    os.unlink(tmp)
                    raise
                where.update(dict.fromkeys(names, w))

            def rebuild(name):
                where[name].write(name, _rebuild(d, bsrc, name))  # written here, on the worker: then freed
                return d[name].nbytes

            sizes = {n: d[n].nbytes for n in d}
            budget = memory_budget(3 * max(sizes.values(), default=0))  # base, section, rebuilt tensor
            with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="unpack",
                      disable=_quiet(progress), leave=False) as bar:
                for _, n in bounded_map(rebuild, sizes, lambda n: 3 * sizes[n], budget=budget):
                    bar.update(n)
                    report.tensors += 1
                    report.nbytes += n
            for w in writers.values():
                w.close()
                os.chmod(w.path, 0o666 & ~_umask())
            stale = files_listed_by(folder / INDEX_NAME) if not single else set()
            for fname, w in writers.items():
                os.replace(w.path, folder / fname)
                report.files.append(folder / fname)
        except BaseException as e:
            for w in writers.values():
                w.discard()
            if isinstance(e, OSError) and e.filename is None:  # a write's error (disk full) names no file
                raise InputError(f"{out}: cannot be written ({e.strerror or e})") from None
            raise
    if not single:
        index = folder / INDEX_NAME
        if len(plan) > 1 or SINGLE_NAME not in plan:  # transformers finds one file by this name, else by an index
            doc = {"metadata": {"total_size": report.nbytes},
                   "weight_map": {n: f for f, (names, _) in plan.items() for n in sorted(names)}}
            atomic_write(index, [json.dumps(doc, indent=2).encode() + b"\n"])
            report.files.append(index)
            # An earlier write's model.safetensors would be loaded instead of the index, its shards beside it.
            _remove(*(folder / f for f in (stale | {SINGLE_NAME}) - set(plan)))
        else:  # an earlier sharded write's index would be read instead of this file
            _remove(index, *(folder / f for f in stale - set(plan)))
    report.seconds = time.perf_counter() - t0
    return report


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
    """Reconstructs every tensor and compares it byte for byte with the fine-tune, a few tensors at a time."""
    rep = VerifyReport()
    with opened(base, "base") as bsrc, opened(finetuned, "finetuned") as fsrc, _open_delta(delta) as d:
        fnames = set(fsrc.names())
        rep.missing_in_delta = sorted(fnames - set(d))
        rep.extra_in_delta = sorted(set(d) - fnames)
        sizes = {n: d[n].nbytes for n in d if n in fnames}

        def same(name):
            got, want = _rebuild(d, bsrc, name), fsrc.get(name)
            return (got.dtype == want.dtype and got.shape == want.shape
                    and torch.equal(tensor_bytes(got), tensor_bytes(want)))

        budget = memory_budget(3 * max(sizes.values(), default=0))  # base, rebuilt tensor, fine-tune
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="verify", disable=_quiet(progress),
                  leave=False) as bar:
            for name, ok in bounded_map(same, sizes, lambda n: 3 * sizes[n], budget=budget):
                rep.checked += 1
                if not ok:
                    rep.mismatched.append(name)
                bar.update(sizes[name])
    return rep


def save_state_dict(sd: dict[str, torch.Tensor], path):
    """Writes a state dict as .safetensors atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
