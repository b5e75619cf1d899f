"""Kernel microbenchmarks: xorgemm's fused decode-XOR-matmul against the same run's baselines.

For each weight shape (N out x K in features), token count M, dtype and delta kind it times, median of
many runs after warm-up, each run reading weights the last cache level does not hold (common.rotation):
  dense    F.linear on the fine-tuned weight (cuBLAS on a GPU): the speed to match
  unfused  the seed's naive way: decompress the whole delta (zstd chunks), XOR it onto the base, F.linear
  xorgemm  XorLinear: tiles decoded and patched inside the matmul, never the whole weight
and checks xorgemm against F.linear in float64 (normwise relative error: fp32 < 1e-5, bf16/fp16 < 1e-2).
On the CPU it also times both paths of the op, forced (XORGEMM_CPU_PATH): `fused` (one pass, the delta
applied as the base streams) and `blocks` (patched blocks and ATen's GEMM), with the floor (1 + r) x dense
(r: the resident delta over the weight) and the issue's targets; then the crossover between the paths per
dtype (the largest M at which fused wins), against the one the op uses (csrc/cpu/fused_linear.cpp); and
D = 4 fine-tunes, one row each, in one call against 4 dense GEMVs; and a dense delta at M = 1 in both CPU
resident forms (XORGEMM_CPU_RESIDENT).

    python bench/gemm.py                         # CPU defaults (smaller shapes)
    python bench/gemm.py --device cuda           # Llama-class shapes on a GPU
    python bench/gemm.py --shapes 4096x4096 --m 256 --dtypes fp32 --kinds sparse --plot
Writes bench/results/gemm_<device>.json and .md (and .png with --plot); --update-readme also rewrites the README's
summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path

import perf_model
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    ROOT,
    Timer,
    command_line,
    copy_bandwidth,
    cpu_name,
    driver_version,
    parse_shapes,
    rel_err,
    replace_region,
    rotation,
    timestamp,
    write_results,
)

import xorgemm
from xorgemm import XorLinear
from xorgemm._native import C
from xorgemm.resident import cpu_resident_form
from xorgemm.resident.gpu_decompress import GpuZstdBatch, nvcomp_available
from xorgemm.testing import FLOAT_DTYPES, perturb

TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
DEFAULTS = {
    "cpu": {"shapes": ["4096x4096", "1024x4096"], "m": [1, 4, 16, 64, 256], "dtypes": ["fp32", "bf16"]},
    "cuda": {"shapes": ["4096x4096", "14336x4096", "4096x14336", "8192x28672"], "m": [1, 4, 16, 64, 256, 2048],
             "dtypes": ["bf16", "fp16"]},
}
KINDS = ["sparse", "structured", "partial", "dense"]
# The targets on the CPU, as ratios to dense F.linear: M <= 16 within 1.2 x the floor (1 + r); at
# M = 256 1.15x for sparse deltas (sparse, structured) and 1.3x for dense ones (partial: a third of the rows
# tuned densely, dense); D fine-tunes one row each within 1.3 x (1 + D r) x one dense GEMV.
SPARSE_KINDS = ("sparse", "structured")


def cpu_target(row) -> float | None:
    if row["m"] <= 16:
        return 1.2 * (1 + row["delta_bytes"] / row["weight_bytes"])
    if row["m"] == 256:
        return 1.15 if row["kind"] in SPARSE_KINDS else 1.3
    return None


@contextlib.contextmanager
def cpu_path(path: str):
    """XORGEMM_CPU_PATH set to `path` (read by the op at each call) for the block."""
    old = os.environ.get("XORGEMM_CPU_PATH")
    os.environ["XORGEMM_CPU_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["XORGEMM_CPU_PATH"]
        else:
            os.environ["XORGEMM_CPU_PATH"] = old


def make_finetune(base, kind, seed):
    """The delta kinds of the pack benchmark: 3% of elements / tiles changed by ~5% of the weights' scale,
    the first third of the rows tuned densely, or every element changed by 1% noise."""
    if kind == "partial":
        return perturb(base, "partial", frac=1 / 3, magnitude=1e-3, seed=seed)
    if kind == "dense":
        return perturb(base, "dense", magnitude=1e-2, seed=seed)
    return perturb(base, kind, frac=0.03, magnitude=1e-3, seed=seed)


class UnfusedNvcomp:
    """The unfused GPU baseline: nvCOMP decompresses the whole delta (its zstd chunks resident on the GPU),
    the apply kernel XORs it onto the base into a full fine-tuned weight, cuBLAS multiplies."""

    def __init__(self, delta_tensor, base_d):
        frames, sizes, self.start = delta_tensor.file.span_frames(*delta_tensor.span)
        self.batch = GpuZstdBatch(frames, sizes, base_d.device, delta_tensor.name)
        self.length = delta_tensor.span[1]
        self.offsets = delta_tensor.section()[1].to(base_d.device)
        self.tile = delta_tensor.tile
        self.base = base_d
        self.out = torch.empty_like(base_d)

    def __call__(self, x):
        raw = self.batch.decode(check=False)  # no waiting on the GPU inside the timed call
        section = raw[self.start:self.start + self.length]
        torch.ops.xorgemm.apply_section(section, self.offsets, self.base, self.out, *self.tile)
        return F.linear(x, self.out)


def bench_case(shape, ms, dtype_name, kind, device, timer, workdir, copy_gbs, model=None):
    """Rows for one weight shape, dtype and delta kind, at every token count in `ms`."""
    n, k = shape
    dtype = FLOAT_DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    ft = make_finetune(base, kind, seed=1)
    path = Path(workdir) / f"{n}x{k}-{dtype_name}-{kind}.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path)
    delta = xorgemm.load_delta(path)
    weight_bytes = base.numel() * base.element_size()
    rot = rotation(weight_bytes, device)
    bases = [base.to(device) for _ in range(rot)]
    fts = [ft.to(device) for _ in range(rot)]
    layers = []
    for b in bases:
        layer = XorLinear(b)
        layer.add_finetune_from_file("ft", delta["w"])
        layer.active = "ft"
        layers.append(layer)
    if device == "cuda" and nvcomp_available():
        unfused_impl, unfused_how = [UnfusedNvcomp(delta["w"], b) for b in bases], "nvCOMP + XOR kernel + cuBLAS"
    else:
        def cpu_decode(b):
            def run(x):
                d = xorgemm.load_delta(path)  # the chunks decompressed on every call, on the CPU
                return F.linear(x, d["w"].apply(b, verify=False))
            return run
        unfused_impl, unfused_how = [cpu_decode(b) for b in bases], "zstandard + XOR + F.linear"
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(dtype)
        x_d = x.to(device)
        row = {"n": n, "k": k, "m": m, "dtype": dtype_name, "kind": kind, "weight_bytes": weight_bytes,
               "delta_bytes": layers[0].delta_bytes(), "file_bytes": path.stat().st_size, "rotation": rot,
               "unfused_how": unfused_how}
        gpu = device == "cuda"
        with torch.no_grad():
            row["dense_ms"] = timer(lambda i, x_d=x_d: F.linear(x_d, fts[i]), rot, graph=gpu)
            row["dense_timing"] = timer.last
            # Never captured: nvCOMP's decoder and the CPU fallback's host work are not graph-safe.
            row["unfused_ms"] = timer(lambda i, x_d=x_d: unfused_impl[i](x_d), rot)
            row["unfused_timing"] = timer.last
            y = layers[0](x_d)
            row["xorgemm_ms"] = timer(lambda i, x_d=x_d: layers[i](x_d), rot, graph=gpu)
            row["xorgemm_timing"] = timer.last
            if gpu:  # what a Python caller sees, launch overhead included
                row["xorgemm_eager_ms"] = timer(lambda i, x_d=x_d: layers[i](x_d), rot)
            ys = [y]
            if not gpu:  # both paths of the CPU op, forced: the crossover
                for which in ("fused", "blocks"):
                    with cpu_path(which):
                        ys.append(layers[0](x_d))
                        row[f"{which}_ms"] = timer(lambda i, x_d=x_d: layers[i](x_d), rot)
        want = F.linear(x.double(), ft.double())
        err = max(rel_err(out.cpu(), want) for out in ys)
        row["rel_err"], row["correct"] = err, err < TOL[dtype_name]
        if model is not None and dtype_name != "fp32":  # bench/perf_model.py: predicted beside measured
            frac = row["delta_bytes"] / weight_bytes
            xg, dense = perf_model.xor_linear(n, k, m, frac, model), perf_model.cublas(n, k, m, model)
            row["xorgemm_predicted_ms"], row["xorgemm_predicted_bound"] = xg.ms, xg.bound
            row["xorgemm_predicted_detail"] = xg.detail
            row["dense_predicted_ms"] = dense.ms
        if copy_gbs:
            moved = weight_bytes + row["delta_bytes"] + x_d.numel() * x_d.element_size() * (1 + n / k)
            row["xorgemm_gbs"] = moved / (row["xorgemm_ms"] * 1e-3) / 1e9
            row["copy_frac"] = row["xorgemm_gbs"] / copy_gbs
        rows.append(row)
    delta.close()
    return rows


def bench_multi_cpu(shape, dtype_name, kind, d, timer, workdir):
    """D fine-tunes of one layer, one row each, in one call, against D dense GEMVs on their own weights and
    against one dense GEMV (the issue's yardstick: 1.3 x (1 + D r) of it)."""
    n, k = shape
    dtype = FLOAT_DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    fts = [make_finetune(base, kind, seed=1 + i) for i in range(d)]
    rot = rotation(base.numel() * base.element_size() * (d + 1), "cpu")
    layers, weights = [], []
    for r in range(rot):
        b = base.clone()
        layer = XorLinear(b)
        for i, ft in enumerate(fts):
            path = Path(workdir) / f"multi-{n}x{k}-{dtype_name}-{kind}-{i}.xor.safetensors"
            if r == 0:
                xorgemm.pack({"w": base}, {"w": ft}, path)
            with xorgemm.load_delta(path) as delta:
                layer.add_finetune_from_file(f"ft{i}", delta["w"])
        layers.append(layer)
        weights.append([ft.clone() for ft in fts])
    ids = torch.arange(d)
    x = torch.randn(d, k, generator=g).to(dtype)
    weight_bytes = base.numel() * base.element_size()
    r_mean = sum(layers[0].resident_bytes(f"ft{i}") for i in range(d)) / d / weight_bytes
    with torch.no_grad():
        y = layers[0](x, finetune=ids)
        row = {"n": n, "k": k, "dtype": dtype_name, "kind": kind, "d": d, "r": r_mean, "rotation": rot,
               "xorgemm_ms": timer(lambda i: layers[i](x, finetune=ids), rot),
               "gemvs_ms": timer(lambda i: [F.linear(x[j:j + 1], weights[i][j]) for j in range(d)], rot),
               "gemv_ms": timer(lambda i: F.linear(x[:1], weights[i][0]), rot)}
    want = torch.stack([F.linear(x[j].double(), fts[j].double()) for j in range(d)])
    row["rel_err"] = rel_err(y, want)
    row["correct"] = row["rel_err"] < TOL[dtype_name]
    row["target_ms"] = 1.3 * (1 + d * r_mean) * row["gemv_ms"]
    return row


def bench_resident_forms(shape, dtype_name, timer, workdir):
    """A dense delta at M = 1 on the fused kernel in both CPU resident forms: conditioned tiles kept
    (compact) or re-encoded with the XOR codecs (fast, the default)."""
    n, k = shape
    dtype = FLOAT_DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    ft = make_finetune(base, "dense", seed=1)
    path = Path(workdir) / f"forms-{n}x{k}-{dtype_name}.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path)
    rot = rotation(base.numel() * base.element_size(), "cpu")
    x = torch.randn(1, k, generator=g).to(dtype)
    row = {"n": n, "k": k, "dtype": dtype_name, "kind": "dense", "m": 1,
           "weight_bytes": base.numel() * base.element_size()}
    old = os.environ.get("XORGEMM_CPU_RESIDENT")
    try:
        for form in ("compact", "fast"):
            os.environ["XORGEMM_CPU_RESIDENT"] = form
            layers = []
            for _ in range(rot):
                layer = XorLinear(base.clone())
                with xorgemm.load_delta(path) as delta:
                    layer.add_finetune_from_file("ft", delta["w"])
                layer.active = "ft"
                layers.append(layer)
            with torch.no_grad(), cpu_path("fused"):
                row[f"{form}_ms"] = timer(lambda i, layers=layers: layers[i](x), rot)
                row[f"{form}_err"] = rel_err(layers[0](x), F.linear(x.double(), ft.double()))
            row[f"{form}_bytes"] = layers[0].resident_bytes("ft")
    finally:
        if old is None:
            os.environ.pop("XORGEMM_CPU_RESIDENT", None)
        else:
            os.environ["XORGEMM_CPU_RESIDENT"] = old
    with torch.no_grad():
        fts = [ft.clone() for _ in range(rot)]
        row["dense_ms"] = timer(lambda i: F.linear(x, fts[i]), rot)
    row["correct"] = max(row["compact_err"], row["fast_err"]) < TOL[dtype_name]
    return row


def crossover(rows) -> list[dict]:
    """Per dtype, on the largest shape: the geometric mean over delta kinds of fused / blocks at each M, and
    the largest M up to which fused wins at every M (the op's threshold should be it)."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows if "fused_ms" in r}):
        pick = [r for r in rows if r["dtype"] == dtype and "fused_ms" in r]
        n, k = max(((r["n"], r["k"]) for r in pick), key=lambda s: s[0] * s[1])
        ratios = {}
        for m in sorted({r["m"] for r in pick}):
            at = [r["fused_ms"] / r["blocks_ms"] for r in pick if (r["n"], r["k"], r["m"]) == (n, k, m)]
            ratios[m] = math.exp(sum(math.log(v) for v in at) / len(at))
        best = 0
        for m, ratio in ratios.items():
            if ratio >= 1:
                break
            best = m
        out.append({"dtype": dtype, "n": n, "k": k, "fused_over_blocks": ratios, "measured_max_rows": best,
                    "op_max_rows": C.cpu_fused_max_rows(FLOAT_DTYPES[dtype])})
    return out


def markdown_cpu(rows, meta, cross, multi, forms) -> str:
    head = [f"Device: {meta['device']}; torch {meta['torch']}; fused kernel instruction set {meta['isa']}; "
            f"CPU resident form {meta['cpu_resident']}; {meta['date']}; `{meta['command']}`.", "",
            "Median milliseconds, each run reading weights the last cache level does not hold. `r` is the resident "
            "delta over the weight; `floor` is (1 + r): reading the base and the delta once, in units of dense "
            "F.linear on the fine-tuned weight. `fused` and `blocks` are the op's two paths forced "
            "(XORGEMM_CPU_PATH), `xorgemm` the path it picks; `x dense` is xorgemm over dense; `target` the "
            "issue's (M <= 16: 1.2 x floor; M = 256: 1.15 sparse, 1.3 dense). `vs unfused` is how many times "
            f"faster xorgemm is than the unfused baseline ({rows[0]['unfused_how'] if rows else ''}).", "",
            "| N x K | M | dtype | delta | r | floor | dense ms | unfused ms | fused ms | blocks ms | xorgemm ms | "
            "x dense | target | met | vs unfused | correct |",
            "|---" * 16 + "|"]
    for r in rows:
        ratio, target = r["xorgemm_ms"] / r["dense_ms"], cpu_target(r)
        frac = r["delta_bytes"] / r["weight_bytes"]
        met = "-" if target is None else ("yes" if ratio <= target else "no")
        head.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['dtype']} | {r['kind']} | {100 * frac:.1f}% | "
                    f"{1 + frac:.2f} | {r['dense_ms']:.3f} | {r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | "
                    f"{r['blocks_ms']:.3f} | {r['xorgemm_ms']:.3f} | {ratio:.2f} | "
                    f"{'-' if target is None else f'{target:.2f}'} | {met} | "
                    f"{r['unfused_ms'] / r['xorgemm_ms']:.1f}x | {'yes' if r['correct'] else 'NO'} |")
    if cross:
        ms = sorted({m for c in cross for m in c["fused_over_blocks"]})
        head += ["", "### Crossover", "",
                 "fused / blocks time (geometric mean over the delta kinds, largest shape): below 1 the fused kernel "
                 "wins. `measured` is the largest M up to which it wins at every M; `op` the threshold the op uses "
                 "(csrc/cpu/fused_linear.cpp), which should equal it.", "",
                 "| dtype | N x K | " + " | ".join(f"M = {m}" for m in ms) + " | measured | op |",
                 "|---" * (len(ms) + 4) + "|"]
        for c in cross:
            head.append(f"| {c['dtype']} | {c['n']}x{c['k']} | "
                        + " | ".join(f"{c['fused_over_blocks'].get(m, float('nan')):.2f}" for m in ms)
                        + f" | {c['measured_max_rows']} | {c['op_max_rows']} |")
    if multi:
        head += ["", "### Many fine-tunes in one call", "",
                 "D fine-tunes of one layer, one row each, in one call; `D GEMVs` is dense F.linear of each row on "
                 "its own fine-tuned weight; `target` is 1.3 x (1 + D r) x one dense GEMV.", "",
                 "| N x K | dtype | delta | D | r | one GEMV ms | D GEMVs ms | xorgemm ms | target ms | met | "
                 "correct |", "|---" * 11 + "|"]
        for r in multi:
            head.append(f"| {r['n']}x{r['k']} | {r['dtype']} | {r['kind']} | {r['d']} | {100 * r['r']:.1f}% | "
                        f"{r['gemv_ms']:.3f} | {r['gemvs_ms']:.3f} | {r['xorgemm_ms']:.3f} | {r['target_ms']:.3f} | "
                        f"{'yes' if r['xorgemm_ms'] <= r['target_ms'] else 'no'} | "
                        f"{'yes' if r['correct'] else 'NO'} |")
    if forms:
        head += ["", "### The CPU resident forms", "",
                 "A dense delta at M = 1 on the fused kernel, its conditioned tiles kept "
                 "(`XORGEMM_CPU_RESIDENT=compact`) or re-encoded with the XOR codecs (`fast`, the default); `r` is "
                 "each form's resident delta over the weight.", "",
                 "| N x K | dtype | dense ms | compact r | compact ms | fast r | fast ms | correct |",
                 "|---" * 8 + "|"]
        for r in forms:
            head.append(f"| {r['n']}x{r['k']} | {r['dtype']} | {r['dense_ms']:.3f} | "
                        f"{100 * r['compact_bytes'] / r['weight_bytes']:.1f}% | {r['compact_ms']:.3f} | "
                        f"{100 * r['fast_bytes'] / r['weight_bytes']:.1f}% | {r['fast_ms']:.3f} | "
                        f"{'yes' if r['correct'] else 'NO'} |")
    return "\n".join(head) + "\n"


def markdown(rows, meta) -> str:
    gpu = "copy_gbs" in meta
    head = [f"Device: {meta['device']}; torch {meta['torch']}"
            + (f"; CUDA {meta['cuda']}; driver {meta['driver']}; nvCOMP {meta.get('nvcomp', 'not installed')}; "
               f"device-to-device copy {meta['copy_gbs']:.0f} GB/s" if gpu else "")
            + f"; {meta['date']}; `{meta['command']}`.",
            "",
            "Median milliseconds; `x dense` is xorgemm's time over dense F.linear on the fine-tuned weight (lower "
            "is better, 1.00 = as fast); `vs unfused` is how many times faster xorgemm is than the unfused "
            f"baseline ({rows[0]['unfused_how'] if rows else ''})."
            + (" `GB/s` counts base + resident delta + activations read and output written, `% copy` is that over "
               "the copy bandwidth. GPU times are CUDA-graph replays (the GPU's time, no Python launch overhead) "
               "where the method can be captured, marked `(e)` where it was timed eagerly (always the unfused "
               "baseline: nvCOMP's decoder is not captured); `eager ms` is xorgemm called from Python. `predicted` "
               "is bench/perf_model.py's time for this row from its assumptions (this run's SM count and copy "
               "bandwidth), with what bounds xorgemm's; a miss names the assumption to revisit."
               if gpu else ""), ""]
    cols = "| N x K | M | dtype | delta | resident delta | dense ms | unfused ms | xorgemm ms | x dense | vs unfused |"
    cols += " GB/s | % copy | eager ms | predicted dense / xorgemm ms (bound) |" if gpu else ""
    out = head + [cols + " correct |", "|---" * (cols.count("|")) + "|"]
    for r in rows:
        xg = r["xorgemm_ms"]
        def ms(key, r=r):
            return f"{r[key + '_ms']:.3f}" + (" (e)" if gpu and r.get(key + "_timing") == "eager" else "")

        line = (f"| {r['n']}x{r['k']} | {r['m']} | {r['dtype']} | {r['kind']} | "
                f"{100 * r['delta_bytes'] / r['weight_bytes']:.1f}% | {ms('dense')} | {ms('unfused')} | "
                f"{ms('xorgemm')} | {xg / r['dense_ms']:.2f} | {r['unfused_ms'] / xg:.1f}x |")
        if gpu:
            line += f" {r['xorgemm_gbs']:.0f} | {100 * r['copy_frac']:.0f}% | {r['xorgemm_eager_ms']:.3f} |"
            line += (f" {r['dense_predicted_ms']:.3f} / {r['xorgemm_predicted_ms']:.3f} "
                     f"({r['xorgemm_predicted_bound']}) |" if "xorgemm_predicted_ms" in r else " - |")
        out.append(line + f" {'yes' if r['correct'] else 'NO'} |")
    return "\n".join(out) + "\n"


def summary(rows) -> str:
    """The README's short table: the largest shape, every kind, at M = 1, 16 and 256 (those measured), with
    the floor and the issue's target."""
    if not rows:
        return ""
    n, k = max(((r["n"], r["k"]) for r in rows), key=lambda s: s[0] * s[1])
    pick = [r for r in rows if (r["n"], r["k"]) == (n, k) and r["m"] in (1, 16, 256)]
    out = ["| N x K | M | dtype | delta | r | dense ms | xorgemm ms | x dense | target | met |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in pick:
        ratio, target = r["xorgemm_ms"] / r["dense_ms"], cpu_target(r)
        out.append(f"| {n}x{k} | {r['m']} | {r['dtype']} | {r['kind']} | "
                   f"{100 * r['delta_bytes'] / r['weight_bytes']:.1f}% | {r['dense_ms']:.2f} | "
                   f"{r['xorgemm_ms']:.2f} | {ratio:.2f} | {target:.2f} | {'yes' if ratio <= target else 'no'} |")
    return "\n".join(out) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']}x{r['k']} M={r['m']} {r['dtype']} {r['kind']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["xorgemm_ms"] / r["dense_ms"] for r in rows], color="tab:blue", label="xorgemm")
    ax.barh(range(len(rows)), [r["unfused_ms"] / r["dense_ms"] for r in rows], color="tab:gray", alpha=0.35,
            label="unfused")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("time / dense F.linear on the fine-tuned weight")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", nargs="+", help="N x K weight shapes, e.g. 4096x4096 (default: per device)")
    p.add_argument("--m", type=int, nargs="+", help="token counts (default: per device)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(FLOAT_DTYPES), help="default: per device")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 15 CPU, 50 GPU)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/gemm_<device>)")
    p.add_argument("--plot", action="store_true", help="also write a PNG (matplotlib)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's CPU summary table")
    p.add_argument("--multi", type=int, default=4, help="CPU: D fine-tunes one row each in one call (0: skip)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    d = DEFAULTS[a.device]
    shapes = parse_shapes(a.shapes or d["shapes"])
    timer = Timer(a.device, a.reps or (15 if a.device == "cpu" else 50), 2 if a.device == "cpu" else 10)
    meta = {"date": timestamp(), "torch": torch.__version__,
            "device": (torch.cuda.get_device_name() if a.device == "cuda"
                       else f"{cpu_name()}, {torch.get_num_threads()} threads"),
            "command": command_line("bench/gemm.py", argv, drop=("--update-readme",))}
    copy_gbs = model = None
    if a.device == "cuda":
        copy_gbs = copy_bandwidth(timer)
        meta["copy_gbs"] = copy_gbs
        model = perf_model.for_this_gpu(torch.cuda.get_device_name(),
                                        torch.cuda.get_device_properties(0).multi_processor_count, copy_gbs)
        meta["perf_model"] = model.__dict__
        meta["driver"] = driver_version()
        meta["cuda"] = torch.version.cuda
        meta["xorgemm_cuda_path"] = os.environ.get("XORGEMM_CUDA_PATH", "auto")
        if nvcomp_available():
            from nvidia import nvcomp

            meta["nvcomp"] = nvcomp.__version__
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s", file=sys.stderr)
    else:
        meta["isa"], meta["cpu_resident"] = C.cpu_isa(), cpu_resident_form()
    rows, multi, forms = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for shape in shapes:
            for dtype in a.dtypes or d["dtypes"]:
                for kind in a.kinds:
                    print(f"{shape[0]}x{shape[1]} {dtype} {kind} ...", file=sys.stderr, flush=True)
                    rows += bench_case(shape, a.m or d["m"], dtype, kind, a.device, timer, work, copy_gbs, model)
        if a.device == "cpu" and a.multi:
            for dtype in a.dtypes or d["dtypes"]:
                for kind in a.kinds:
                    print(f"{shapes[0][0]}x{shapes[0][1]} {dtype} {kind}: {a.multi} fine-tunes ...", file=sys.stderr,
                          flush=True)
                    multi.append(bench_multi_cpu(shapes[0], dtype, kind, a.multi, timer, work))
        if a.device == "cpu":
            for dtype in a.dtypes or d["dtypes"]:
                print(f"{shapes[0][0]}x{shapes[0][1]} {dtype}: resident forms ...", file=sys.stderr, flush=True)
                forms.append(bench_resident_forms(shapes[0], dtype, timer, work))
    cross = crossover(rows) if a.device == "cpu" else []
    table = markdown_cpu(rows, meta, cross, multi, forms) if a.device == "cpu" else markdown(rows, meta)
    print(table)
    out = write_results(a.out or RESULTS / f"gemm_{a.device}", f"xorgemm GEMM benchmark ({a.device})", table,
                        meta=meta, rows=rows, crossover=cross, multi=multi, resident_forms=forms)
    if a.plot:
        plot(rows, out.with_suffix(".png"))
    if a.update_readme:
        replace_region(ROOT / "README.md", "gemm-summary",
                       summary(rows) + f"\n{meta['device']}, {meta['date'][:10]}, `{meta['command']}`.\n")
    bad = [r for r in rows + multi + forms if r.get("correct") is False]
    if bad:
        raise SystemExit(f"{len(bad)} rows failed the correctness check")


if __name__ == "__main__":
    main()
