"""Disk ratio and CPU throughput of xorgemm pack/unpack, beside the same run's baselines.

For each delta (the seed notebook's scenario, synthetic sparse/structured/partial/dense deltas, real
fine-tunes of all-MiniLM-L6-v2) it reports, as a share of the fine-tuned weights' bytes:
  xorgemm     the whole .xor.safetensors file (index included) at the default zstd level 3, and at 19
  resident    the decoded sections: what a GPU holds (tile tables + payloads)
  XOR-only    the same two with the XOR codecs alone (format version 1: the codecs before the
              base-conditioned one), packed in the same run
  zstd whole  zstd of the concatenated XOR of all tensors (one frame), levels 3 and 19
  xz diff     xz -9 of the integer differences ft - base of every float tensor (the study's best CPU codec)
  floor       an entropy estimate: the plug-in H(d | base exponent) of those differences per tensor (fp32:
              of their bit length and next 3 bits, the lower bits at 1 bit each), other tensors' XOR bytes
              at zstd-19; in-sample, so slightly optimistic
  planes-19   the XOR split into byte planes per tensor, then zstd-19 (the best known disk ratio)
  zipnn       zipnn (byte grouping + entropy coding) over the same XOR bytes, single thread; its own
              delta mode is not implemented in the package, so this is how it compresses a delta
and pack / unpack throughput on one core (torch and zstd single-threaded) beside zstd-3 alone.

    python bench/pack.py                  # everything; the first run fine-tunes MiniLM (~3 min, cached)
    python bench/pack.py --no-real        # synthetic and seed deltas only (~1 min)
    python bench/pack.py --update-docs    # also rewrite the tables in docs/format.md and README.md
Writes bench/results/pack_cpu.json and .md. The real fine-tunes come from examples/real_finetune.py.
"""
from __future__ import annotations

import argparse
import datetime
import lzma
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from common import RESULTS, ROOT, command_line, cpu_name, replace_region, write_results

import xorgemm
from xorgemm.format.layout import tensor_bytes
from xorgemm.testing import perturb, seed_scenario, state_dict_of, whole_xor

DOCS = ROOT / "docs" / "format.md"


# ------------------------------------------------------------------------------------------ deltas


def synthetic_model(dtype, seed=0):
    """A Llama-shaped block at small width (4.5M parameters), weights at a typical init scale."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (4000, 512), "attn.qkv.weight": (1536, 512), "attn.o.weight": (512, 512),
              "mlp.up.weight": (1408, 512), "mlp.down.weight": (512, 1408), "norm.weight": (512,)}
    return {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}


def synthetic(kind, dtype):
    base = synthetic_model(dtype)
    if kind == "partial":  # only the attention tensors tuned, densely; the rest frozen
        ft = {k: perturb(v, "dense", seed=i) if k.startswith("attn.") else v.clone()
              for i, (k, v) in enumerate(base.items())}
    elif kind == "dense":
        ft = {k: perturb(v, "dense", seed=i) for i, (k, v) in enumerate(base.items())}
    else:  # sparse / structured: 3% of elements or of tiles, changed by ~5% of the weights' scale
        ft = {k: perturb(v, kind, frac=0.03, magnitude=1e-3, seed=i) for i, (k, v) in enumerate(base.items())}
    return base, ft


def real(only, dtype, lr=1e-4):
    from real_finetune import Recipe, real_finetune  # examples/real_finetune.py, on the path from common
    from safetensors.torch import load_file

    b, f = real_finetune(dtype, Recipe(lr=lr, only=only), log=lambda m: print(m, file=sys.stderr))
    return load_file(b), load_file(f)


def scenarios(with_real: bool):
    def seed():
        b, f = seed_scenario()
        return state_dict_of(b), state_dict_of(f)

    yield "seed notebook: tiny layer, 3% of elements", "fp32", seed
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        yield "synthetic: 3% of elements", dt, lambda d=dtype: synthetic("sparse", d)
        yield "synthetic: 3% of 64x64 tiles", dt, lambda d=dtype: synthetic("structured", d)
        yield "synthetic: attention tuned, rest frozen", dt, lambda d=dtype: synthetic("partial", d)
        yield "synthetic: dense, 1% noise", dt, lambda d=dtype: synthetic("dense", d)
    if with_real:
        yield "MiniLM full FT, lr 1e-4, 300 steps", "bf16", lambda: real("all", "bf16")
        yield "MiniLM full FT, lr 1e-4, 300 steps", "fp32", lambda: real("all", "fp32")
        yield "MiniLM full FT, lr 2e-5, 300 steps", "bf16", lambda: real("all", "bf16", lr=2e-5)
        yield "MiniLM attention-only FT, lr 1e-4", "bf16", lambda: real("attention", "bf16")


# ------------------------------------------------------------------------------------------ baselines


def planes(base, ft) -> bytes:
    out = []
    for k in ft:
        if k in base and base[k].shape == ft[k].shape:
            x = (tensor_bytes(base[k]) ^ tensor_bytes(ft[k])).numpy().reshape(-1, ft[k].element_size())
            out.append(np.ascontiguousarray(x.T).tobytes())
    return b"".join(out)


_INT = {torch.float32: (torch.int32, 23, 32), torch.float16: (torch.int16, 10, 16),
        torch.bfloat16: (torch.int16, 7, 16)}


def differences(base, ft):
    """Per float tensor: (its differences ft - base mod 2^bits as int64, its base exponents, bits)."""
    for k, f in ft.items():
        b = base.get(k)
        if b is None or b.shape != f.shape or f.dtype not in _INT:
            continue
        it, shift, bits = _INT[f.dtype]
        mask = (1 << bits) - 1
        bb = b.contiguous().view(it).reshape(-1).numpy().astype(np.int64) & mask
        fb = f.contiguous().view(it).reshape(-1).numpy().astype(np.int64) & mask
        yield (fb - bb) & mask, (bb >> shift) & 0xFF, bits


def xz_of_differences(base, ft) -> int:
    parts = [d.astype(np.uint32 if bits == 32 else np.uint16).tobytes() for d, _, bits in differences(base, ft)]
    return len(lzma.compress(b"".join(parts), preset=9)) if parts else 0


def entropy_floor(base, ft) -> float:
    """Bytes of the plug-in H(d | base exponent), per tensor (see the module docstring)."""
    total_bits = 0.0
    for d, exp, bits in differences(base, ft):
        z = ((d << 1) ^ np.where(d >> (bits - 1) & 1, (1 << bits) - 1, 0)) & ((1 << bits) - 1)  # zig-zag
        if bits == 16:
            sym, low = z, 0
        else:  # (bit length, the next 3 bits) as the symbol, the bits below at one bit each
            length = np.zeros_like(z)
            nz = z > 0
            length[nz] = np.floor(np.log2(z[nz])).astype(np.int64) + 1
            drop = np.maximum(length - 4, 0)
            sym = (length << 3) | ((z >> drop) & 7)
            low = int(drop.sum())
        key = (exp << 33) | sym
        _, joint = np.unique(key, return_counts=True)
        _, per_exp = np.unique(exp, return_counts=True)
        h = -(joint * np.log2(joint)).sum() + (per_exp * np.log2(per_exp)).sum()  # n H(sym | exp)
        total_bits += h + low
    others = b"".join(((tensor_bytes(base[k]) ^ tensor_bytes(v)).numpy().tobytes() for k, v in ft.items()
                       if k in base and base[k].shape == v.shape and v.dtype not in _INT))
    return total_bits / 8 + (len(zstandard.ZstdCompressor(level=19).compress(others)) if others else 0)


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def zipnn_ratio(xor: bytes, dtype: str):
    try:
        import warnings

        warnings.simplefilter("ignore")
        import zipnn
    except ImportError:
        return None, None
    kw = dict(input_format="byte", bytearray_dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], threads=1)
    comp = zipnn.ZipNN(**kw).compress(xor)
    lossless = bytes(zipnn.ZipNN(**kw).decompress(comp)) == xor
    return len(comp), lossless


def measure(name, dtype, make, levels19: bool):
    base, ft = make()
    nbytes = sum(v.numel() * v.element_size() for v in ft.values())
    changed = sum(int((tensor_bytes(base[k]).view(-1, v.element_size())
                       != tensor_bytes(v).view(-1, v.element_size())).any(1).sum())
                  for k, v in ft.items()) / sum(v.numel() for v in ft.values())
    xor = whole_xor(base, ft)
    row = {"delta": name, "dtype": dtype, "weights_bytes": nbytes, "changed_elements": changed}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.xor.safetensors"
        rep, t_pack = timed(lambda: xorgemm.pack(base, ft, path), repeat=2)
        out, t_unpack = timed(lambda: xorgemm.unpack(base, path), repeat=2)
        assert all(torch.equal(tensor_bytes(out[k]), tensor_bytes(ft[k])) for k in ft), "round trip must be exact"
        row.update(xorgemm=rep.file_bytes, resident=rep.stream_bytes, pack_mb_s=nbytes / t_pack / 1e6,
                   unpack_mb_s=nbytes / t_unpack / 1e6)
        plain = xorgemm.pack(base, ft, path, conditioned=False)
        row.update(xor_only=plain.file_bytes, xor_only_resident=plain.stream_bytes)
        if levels19:
            row["xorgemm_19"] = xorgemm.pack(base, ft, path, level=19).file_bytes
    z3 = zstandard.ZstdCompressor(level=3)
    comp3, t_z3 = timed(lambda: z3.compress(xor), repeat=2)
    _, t_d3 = timed(lambda: zstandard.ZstdDecompressor().decompress(comp3), repeat=2)
    row.update(zstd_3=len(comp3), zstd3_pack_mb_s=len(xor) / t_z3 / 1e6, zstd3_unpack_mb_s=len(xor) / t_d3 / 1e6)
    if levels19:
        row["zstd_19"] = len(zstandard.ZstdCompressor(level=19).compress(xor))
        row["planes_19"] = len(zstandard.ZstdCompressor(level=19).compress(planes(base, ft)))
    row["zipnn"], row["zipnn_lossless"] = zipnn_ratio(xor, dtype)
    row["xz_diff"] = xz_of_differences(base, ft)
    row["floor"] = entropy_floor(base, ft)
    return row


# ------------------------------------------------------------------------------------------ report


def pct(row, key):
    v = row.get(key)
    return "-" if v is None else f"{100 * v / row['weights_bytes']:.1f}%"


def markdown(rows, meta) -> str:
    lines = [
        "| delta | dtype | weights | changed | **xorgemm** (zstd-3) | xorgemm (zstd-19) | resident | XOR-only "
        "disk / resident | zstd-3 whole | zstd-19 whole | planes zstd-19 | xz diff | floor | zipnn | pack MB/s | "
        "unpack MB/s | zstd-3 alone MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        zipnn = pct(r, "zipnn") + ("" if r.get("zipnn_lossless") in (True, None) else " (not lossless)")
        lines.append(
            f"| {r['delta']} | {r['dtype']} | {r['weights_bytes'] / 2**20:.2f} MiB | "
            f"{100 * r['changed_elements']:.1f}% | "
            f"**{pct(r, 'xorgemm')}** | {pct(r, 'xorgemm_19')} | {pct(r, 'resident')} | "
            f"{pct(r, 'xor_only')} / {pct(r, 'xor_only_resident')} | {pct(r, 'zstd_3')} | {pct(r, 'zstd_19')} | "
            f"{pct(r, 'planes_19')} | {pct(r, 'xz_diff')} | {pct(r, 'floor')} | {zipnn} | {r['pack_mb_s']:.0f} | "
            f"{r['unpack_mb_s']:.0f} | {r['zstd3_pack_mb_s']:.0f} / {r['zstd3_unpack_mb_s']:.0f} |")
    lines.append("")
    lines.append(f"Sizes are shares of the fine-tuned weights' bytes (lower is better); throughput is one core "
                 f"({meta['cpu']}), best of 2. Made by `{meta['command']}` on {meta['date']} "
                 f"(torch {meta['torch']}, zstandard {meta['zstandard']}).")
    return "\n".join(lines) + "\n"


def machine_meta(argv):
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name("unknown CPU"),
            "python": platform.python_version(), "torch": torch.__version__, "zstandard": zstandard.__version__,
            "xorgemm": xorgemm.__version__, "command": command_line("bench/pack.py", argv, drop=("--update-docs",))}


def summary(rows, meta) -> str:
    """The README's short table: the headline ratio beside zstd-19 of the whole XOR, and throughput."""
    lines = ["| delta | dtype | xorgemm | resident | zstd-19 of the whole XOR | pack MB/s | unpack MB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['delta']} | {r['dtype']} | **{pct(r, 'xorgemm')}** | {pct(r, 'resident')} | "
                     f"{pct(r, 'zstd_19')} | {r['pack_mb_s']:.0f} | {r['unpack_mb_s']:.0f} |")
    return "\n".join(lines) + f"\n\n{meta['cpu']}, one core, {meta['date']}, `{meta['command']}`.\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-real", action="store_true", help="skip the real MiniLM fine-tunes (no transformers needed)")
    p.add_argument("--no-19", action="store_true", help="skip the slow zstd-19 columns")
    p.add_argument("--out", default=str(RESULTS / "pack_cpu"), help="results path without suffix (.json, .md)")
    p.add_argument("--update-docs", action="store_true",
                   help="rewrite the tables in docs/format.md and README.md from this run")
    p.add_argument("--scale", action="store_true",
                   help="instead: pack, unpack and verify a synthetic Llama-3-8B pair, timed, with peak memory "
                        "(bench/pack_scale.py); writes bench/results/pack_scale.*")
    p.add_argument("--layers", type=int, default=32, help="--scale: decoder layers of the synthetic model")
    p.add_argument("--scale-dir", default=str(ROOT / "bench" / ".scale"),
                   help="--scale: where the synthetic pair is made (about 2 x 16 GB) and kept for the next run")
    p.add_argument("--keep", action="store_true", help="--scale: keep the delta")
    a = p.parse_args(argv)
    if not a.scale:  # the table is per core: pack and unpack on one thread, as torch and zstd run here
        os.environ["XORGEMM_THREADS"] = "1"
    meta = machine_meta(argv)
    if a.scale:
        import pack_scale

        table, payload = pack_scale.main(a, meta)
        print(table)
        out = RESULTS / ("pack_scale" if a.layers == 32 else f"pack_scale_{a.layers}l")
        write_results(out, "xorgemm pack / unpack / verify at 8B scale: time and peak memory", table, **payload)
        return None
    rows = []
    for name, dtype, make in scenarios(not a.no_real):
        print(f"measuring {name} ({dtype}) ...", file=sys.stderr)
        rows.append(measure(name, dtype, make, not a.no_19))
    table = markdown(rows, meta)
    print(table)
    write_results(a.out, "xorgemm pack/unpack on the CPU", table, meta=meta, rows=rows)
    if a.update_docs:
        replace_region(DOCS, "pack-table", table)
        replace_region(ROOT / "README.md", "pack-summary", summary(rows, meta))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
