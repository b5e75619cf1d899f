"""pack, unpack and verify at the scale of a real checkpoint: time and peak memory, beside a baseline.

On a synthetic Llama-3-8B-shaped pair (bench/make_scale_pair.py: 32 layers, 16 GB per model in bf16, five
shards, a dense full fine-tune) each command runs as a user runs it, `python -m xorgemm ...` in a process of
its own, whose peak resident set (its VmHWM, which counts mapped file pages too) is recorded beside
the bound the commands promise: 1 GiB + 3 x the largest tensor. Beside them, in the same run, the obvious
alternative: the XOR of every tensor streamed through zstd-3 (all cores), also in a process of its own.
The unpacked fine-tune is then compared with the original: the same files, the same metadata, every tensor
byte for byte.

    python bench/pack.py --scale                     # the 8B pair under bench/.scale (made if missing)
    python bench/pack.py --scale --layers 4          # a 4-layer slice, for a quick look
Writes bench/results/pack_scale.json and .md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

GIB = 1024**3


def measured(*args) -> dict:
    """Runs `xorgemm ARGS` to its end in a process of its own: wall time and peak RSS (its VmHWM)."""
    from xorgemm.testing import run_measured

    m = run_measured(*args, cwd=ROOT)
    if m.code != 0:
        raise SystemExit(f"xorgemm {' '.join(map(str, args))} failed with exit code {m.code}")
    return {"seconds": m.seconds, "peak_rss": m.peak_rss, "cpu_seconds": m.cpu_seconds}


def measured_baseline(base, ft, out) -> dict:
    """The baseline in a process of its own, measured as the commands are."""

    code = ("import resource, sys, pack_scale; pack_scale.xor_zstd_baseline(*sys.argv[1:4]); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) * 1024, "
            "u.ru_utime + u.ru_stime)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(base), str(ft), str(out)], cwd=Path(__file__).parent,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the baseline failed: {p.stderr[-2000:]}")
    peak, cpu = p.stdout.split()[-2:]
    return {"seconds": time.perf_counter() - t, "peak_rss": int(peak), "cpu_seconds": float(cpu)}


def xor_zstd_baseline(base: str, ft: str, out: str, level: int = 3):
    """The baseline (run in its own process): every tensor's XOR with its base, in the fine-tune's order,
    streamed through one zstd stream at `level` on every core."""
    import zstandard

    from xorgemm.format.layout import tensor_bytes
    from xorgemm.packing.sources import open_source

    bsrc, fsrc = open_source(base, "base"), open_source(ft, "finetuned")
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    with open(out, "wb") as f, cctx.stream_writer(f) as w:
        for name in fsrc.names():
            x = tensor_bytes(bsrc.get(name)) ^ tensor_bytes(fsrc.get(name))
            w.write(memoryview(x.numpy()))


def compare_folders(want: Path, got: Path) -> dict:
    """The unpacked folder against the original: the same file names, each file's metadata, the same tensors
    in each, byte for byte (read a tensor at a time)."""
    import torch

    from xorgemm.format.safetensors_io import Header, pread_into

    files = sorted(f.name for f in want.iterdir())
    if files != sorted(f.name for f in got.iterdir()):
        raise SystemExit(f"unpack wrote {sorted(f.name for f in got.iterdir())}, the fine-tune has {files}")
    tensors = 0
    for name in files:
        if not name.endswith(".safetensors"):
            maps = [json.loads((d / name).read_text())["weight_map"] for d in (want, got)]
            if maps[0] != maps[1]:
                raise SystemExit(f"{name}: the weight maps differ")
            continue
        a, b = Header.read(want / name), Header.read(got / name)
        if a.metadata != b.metadata or set(a.entries) != set(b.entries):
            raise SystemExit(f"{name}: metadata or tensor names differ")
        fa, fb = os.open(a.path, os.O_RDONLY), os.open(b.path, os.O_RDONLY)
        for t, (dtype, shape, off, n) in a.entries.items():
            if b.entries[t][:2] != (dtype, shape):
                raise SystemExit(f"{name}: tensor '{t}' has another dtype or shape")
            x, y = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
            pread_into(fa, x, off, a.path, t)
            pread_into(fb, y, b.entries[t][2], b.path, t)
            if not torch.equal(x, y):
                raise SystemExit(f"{name}: tensor '{t}' differs")
            tensors += 1
        os.close(fa)
        os.close(fb)
    return {"files": len(files), "tensors": tensors}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def largest_tensor(folder: Path) -> int:
    from xorgemm.format.safetensors_io import Header

    return max(e[3] for f in folder.glob("*.safetensors") for e in Header.read(f).entries.values())


def main(a, meta) -> tuple[str, dict]:
    from xorgemm.testing import LLAMA3_8B, write_llama_pair

    shape = dict(LLAMA3_8B, layers=a.layers)
    work = Path(a.scale_dir) / f"llama3-8b-{a.layers}l"
    base, ft = work / "base", work / "finetuned"
    if not (ft / "model.safetensors.index.json").is_file() or not (base / "model.safetensors.index.json").is_file():
        print(f"generating the synthetic pair in {work} ...", file=sys.stderr)
        t = time.perf_counter()
        write_llama_pair(work, **shape, progress=True)
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
    model_bytes = sum(f.stat().st_size for f in ft.glob("*.safetensors"))
    largest = largest_tensor(ft)
    bound = GIB + 3 * largest
    delta, unpacked, baseline = work / "ft.xor.safetensors", work / "unpacked", work / "xor.zst"
    rows = {}
    print("pack ...", file=sys.stderr)
    rows["pack"] = measured("pack", "-q", "--base", base, "--finetuned", ft, "-o", delta)
    with_index = delta.with_name(delta.name + ".index.json")
    delta_files = [delta] if delta.exists() else [with_index] + sorted(work.glob("ft-*-of-*.xor.safetensors"))
    rows["pack"]["output_bytes"] = sum(f.stat().st_size for f in delta_files)
    rows["pack"]["files"] = len(delta_files)
    print("unpack ...", file=sys.stderr)
    shutil.rmtree(unpacked, ignore_errors=True)
    rows["unpack"] = measured("unpack", "-q", "--base", base, "--delta", delta, "-o", unpacked)
    rows["unpack"]["output_bytes"] = folder_bytes(unpacked)
    print("comparing the unpacked fine-tune with the original ...", file=sys.stderr)
    rows["unpack"]["identical"] = compare_folders(ft, unpacked)
    shutil.rmtree(unpacked)
    print("verify ...", file=sys.stderr)
    rows["verify"] = measured("verify", "-q", "--base", base, "--delta", delta, "--finetuned", ft)
    rows["inspect (checks every chunk)"] = measured("inspect", delta)
    print("baseline: the whole XOR through streaming zstd-3 ...", file=sys.stderr)
    rows["zstd-3 of the XOR (baseline)"] = measured_baseline(base, ft, baseline)
    rows["zstd-3 of the XOR (baseline)"]["output_bytes"] = baseline.stat().st_size
    baseline.unlink()
    if not a.keep:
        for f in delta_files:
            f.unlink()
    for r in rows.values():
        r["within_bound"] = r["peak_rss"] <= bound
        r["mb_per_s"] = model_bytes / 1e6 / r["seconds"]
    meta = dict(meta, model=shape, model_bytes=model_bytes, largest_tensor=largest, bound=bound,
                threads=len(os.sched_getaffinity(0)))
    return markdown(rows, meta), {"meta": meta, "rows": rows}


def markdown(rows, meta) -> str:
    lines = ["| command | time | MB/s of weights | CPU time | MB/s per CPU second | peak RSS | within 1 GiB + 3 x "
             "largest | output | share of weights |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        out = r.get("output_bytes")
        share = f"{100 * out / meta['model_bytes']:.1f}%" if out and name != "unpack" else ""
        files = f" ({r['files']} files)" if r.get("files", 1) > 1 else ""
        lines.append(f"| {name} | {r['seconds']:.0f} s | {r['mb_per_s']:.0f} | {r['cpu_seconds']:.0f} s | "
                     f"{meta['model_bytes'] / 1e6 / r['cpu_seconds']:.0f} | {r['peak_rss'] / GIB:.2f} GiB | "
                     f"{'yes' if r['within_bound'] else '**no**'} | {f'{out / 1e9:.2f} GB' if out else ''}{files} "
                     f"| {share} |")
    m = meta["model"]
    ident = rows["unpack"]["identical"]
    return ("\n".join(lines) + "\n\n"
            f"A synthetic Llama-3-8B-shaped pair ({m['layers']} layers, hidden {m['hidden']}, MLP {m['intermediate']}, "
            f"GQA {m['kv']}, vocabulary {m['vocab']}): {meta['model_bytes'] / 1e9:.2f} GB per model in bf16, sharded "
            f"at 5 GB, a dense full fine-tune (every weight moved by 1% of its scale). The largest tensor is "
            f"{meta['largest_tensor'] / 1e9:.2f} GB, so the bound is {meta['bound'] / GIB:.2f} GiB. Each command ran "
            f"in a process of its own on {meta['threads']} cores ({meta['cpu']}); peak RSS is its VmHWM, CPU time its "
            f"user + system time on every thread (MB/s per CPU second is the rate per core, to set beside the "
            f"one-core rates of pack_cpu.md, which pack from memory and read no files). unpack "
            f"wrote the fine-tune's {ident['files']} files, {ident['tensors']} tensors identical byte for byte, "
            f"metadata kept. {meta['date']}, torch {meta['torch']}, `{meta['command']}`.\n")
