"""Kernel microbenchmarks: xorgemm's fused decode-XOR-matmul against the same run's baselines.

For each weight shape (N out x K in features), token count M, dtype and delta kind it times, median of
many runs after warm-up:
  dense    F.linear on the fine-tuned weight (cuBLAS on a GPU): the speed to match
  unfused  the seed's naive way: decompress the whole delta (zstd chunks), XOR it onto the base, F.linear
  xorgemm  XorLinear: tiles decoded and patched block by block inside the matmul, never the whole weight
and checks xorgemm against F.linear in float64 (normwise relative error: fp32 < 1e-5, bf16/fp16 < 1e-2).

    python bench/gemm.py                         # CPU defaults (smaller shapes)
    python bench/gemm.py --device cuda           # Llama-class shapes on a GPU
    python bench/gemm.py --shapes 4096x4096 --m 256 --dtypes fp32 --kinds sparse --plot
    python bench/gemm.py --device cuda --multi [--model]   # many fine-tunes per batch (bench/gemm_multi.py)
Writes bench/results/gemm_<device>.json and .md (and .png with --plot); --multi writes gemm_multi_cuda.*.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gemm_multi import KINDS_MULTI, bench_model, bench_multi, markdown_multi  # noqa: E402

import xorgemm  # noqa: E402
from xorgemm import XorLinear  # noqa: E402
from xorgemm.format.gpu_decompress import GpuZstdBatch, nvcomp_available  # noqa: E402
from xorgemm.testing import ROW_DISTRIBUTIONS, perturb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
DEFAULTS = {
    "cpu": {"shapes": ["4096x4096", "1024x4096"], "m": [1, 16, 256], "dtypes": ["fp32", "bf16"]},
    "cuda": {"shapes": ["4096x4096", "14336x4096", "4096x14336", "8192x28672"], "m": [1, 4, 16, 64, 256, 2048],
             "dtypes": ["bf16", "fp16"]},
}
KINDS = ["sparse", "structured", "partial", "dense"]


def make_finetune(base, kind, seed):
    """The delta kinds of the pack benchmark: 3% of elements / tiles changed by ~5% of the weights' scale,
    the first third of the rows tuned densely, or every element changed by 1% noise."""
    if kind == "partial":
        return perturb(base, "partial", frac=1 / 3, magnitude=1e-3, seed=seed)
    if kind == "dense":
        return perturb(base, "dense", magnitude=1e-2, seed=seed)
    return perturb(base, kind, frac=0.03, magnitude=1e-3, seed=seed)


class Timer:
    """Median milliseconds of a callable. On a GPU, `graph=True` captures the calls in a CUDA graph and times
    its replays: the GPU's time alone, without Python's launch overhead, as a serving engine that replays
    graphs sees it; a callable that cannot be captured (nvCOMP's decoder) falls back to eager timing and
    `self.last` says which was used."""

    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.last = "eager"

    def __call__(self, fn, rotate: int = 1, graph: bool = False) -> float:
        """Median milliseconds of fn(i), i cycling through range(rotate): callers keep `rotate` copies of
        their weights so that, on a GPU, L2 does not serve them from the previous run."""
        for i in range(self.warmup):
            fn(i % rotate)
        if self.device == "cuda" and graph:
            try:
                ms = self._graph(fn, rotate)
                self.last = "graph"
                return ms
            except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
                torch.cuda.synchronize()
        self.last = "eager"
        times = []
        if self.device == "cuda":
            for i in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i % rotate)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for i in range(self.reps):
                t = time.perf_counter()
                fn(i % rotate)
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def _graph(self, fn, rotate) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            for i in range(rotate):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(rotate):  # one replay runs every copy once: L2 rotation kept
                fn(i)
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / rotate)
        return statistics.median(times)


def rel_err(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def copy_bandwidth(timer, device="cuda") -> float:
    """Copy bandwidth in GB/s (device to device on a GPU), bytes read plus written, on a 1 GiB buffer."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timer(lambda i: b.copy_(a))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def rotation(weight_bytes: int) -> int:
    """Copies of the weights to cycle through so that each timed run reads them from HBM, not L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-3 * l2 // weight_bytes))


class UnfusedNvcomp:
    """The unfused GPU baseline: nvCOMP decompresses the whole delta (its zstd chunks resident on the GPU),
    the apply kernel XORs it onto the base into a full fine-tuned weight, cuBLAS multiplies."""

    def __init__(self, delta_tensor, base_d):
        from xorgemm._native import CUDA

        frames, sizes, self.start = delta_tensor.file.span_frames(*delta_tensor.span)
        self.batch = GpuZstdBatch(frames, sizes, base_d.device, delta_tensor.name)
        self.length = delta_tensor.span[1]
        self.offsets = delta_tensor.resident("cpu")[1].to(base_d.device)
        self.grid = delta_tensor.grid
        self.base = base_d
        self.out = torch.empty_like(base_d)
        self.CUDA = CUDA

    def __call__(self, x):
        raw = self.batch.decode(check=False)  # no waiting on the GPU inside the timed call
        section = raw[self.start:self.start + self.length]
        self.CUDA.apply_section(section, self.offsets, self.base.view(-1).view(torch.uint8),
                                self.out.view(-1).view(torch.uint8), *self.grid.args)
        return F.linear(x, self.out)


def bench_case(shape, ms, dtype_name, kind, device, timer, workdir, copy_gbs):
    """Rows for one weight shape, dtype and delta kind, at every token count in `ms`."""
    n, k = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    ft = make_finetune(base, kind, seed=1)
    path = Path(workdir) / f"{n}x{k}-{dtype_name}-{kind}.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path)
    delta = xorgemm.load_delta(path)
    weight_bytes = base.numel() * base.element_size()
    rot = rotation(weight_bytes) if device == "cuda" else 1
    bases = [base.to(device) for _ in range(rot)]
    fts = [ft.to(device) for _ in range(rot)]
    layers = []
    for b in bases:
        layer = XorLinear(b)
        layer.add_delta_from_file("ft", delta["w"])
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
        err = rel_err(y.cpu(), F.linear(x.double(), ft.double()))
        row["rel_err"], row["correct"] = err, err < TOL[dtype_name]
        if copy_gbs:
            moved = weight_bytes + row["delta_bytes"] + x_d.numel() * x_d.element_size() * (1 + n / k)
            row["xorgemm_gbs"] = moved / (row["xorgemm_ms"] * 1e-3) / 1e9
            row["copy_frac"] = row["xorgemm_gbs"] / copy_gbs
        rows.append(row)
    delta.close()
    return rows


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
               "baseline: nvCOMP's decoder is not captured); `eager ms` is xorgemm called from Python."
               if gpu else ""), ""]
    cols = "| N x K | M | dtype | delta | resident delta | dense ms | unfused ms | xorgemm ms | x dense | vs unfused |"
    cols += " GB/s | % copy | eager ms |" if gpu else ""
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
        out.append(line + f" {'yes' if r['correct'] else 'NO'} |")
    return "\n".join(out) + "\n"


def summary(rows) -> str:
    """The README's short table: the largest shape, every kind, at the smallest and largest M."""
    if not rows:
        return ""
    n, k = max(((r["n"], r["k"]) for r in rows), key=lambda s: s[0] * s[1])
    ms = sorted({r["m"] for r in rows})
    pick = [r for r in rows if (r["n"], r["k"]) == (n, k) and r["m"] in (ms[0], ms[-1])]
    out = ["| N x K | M | dtype | delta | dense ms | unfused ms | xorgemm ms | x dense |",
           "|---|---|---|---|---|---|---|---|"]
    for r in pick:
        out.append(f"| {n}x{k} | {r['m']} | {r['dtype']} | {r['kind']} | {r['dense_ms']:.2f} | "
                   f"{r['unfused_ms']:.2f} | {r['xorgemm_ms']:.2f} | {r['xorgemm_ms'] / r['dense_ms']:.2f} |")
    return "\n".join(out) + "\n"


def update_readme(text: str):
    readme = ROOT / "README.md"
    pattern = r"(<!-- gemm-summary:begin -->\n).*?(<!-- gemm-summary:end -->)"
    new, n = re.subn(pattern, lambda m: m.group(1) + text + m.group(2), readme.read_text(), flags=re.S)
    if n != 1:
        raise SystemExit(f"{readme}: no <!-- gemm-summary:begin/end --> markers to replace")
    readme.write_text(new)


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


def main_multi(a, argv):
    """--multi: the grouped kernel on a GPU. On the CPU (--device cpu) it only dry-runs the same code on the
    CPU op, for checking the script; its numbers say nothing about the GPU kernel."""
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    timer = Timer(a.device, a.reps or 30, 5)
    copy_gbs = copy_bandwidth(timer, a.device)
    gpu = a.device == "cuda"
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if gpu else "CPU (dry run)", "cuda": torch.version.cuda,
            "driver": driver_version() if gpu else "n/a", "copy_gbs": copy_gbs,
            "command": "python bench/gemm.py" + "".join(f" {v}" for v in argv)}
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (a.shapes or ["4096x4096", "14336x4096"])]
    dtype = (a.dtypes or ["bf16"])[0]
    ms_of = (lambda d: a.m) if a.m else (lambda d: sorted({d, 4 * d, 256}))
    rows = bench_multi(shapes, a.d, a.dists, a.multi_kinds, dtype, DTYPES, timer, rotation if gpu else (lambda b: 1),
                       copy_gbs, ms_of, a.device)
    model_rows = bench_model(16, 2, 2048 if gpu else 128, DTYPES[dtype], timer, 16, a.device) if a.model else []
    table = markdown_multi(rows, model_rows, meta)
    print(table)
    out = Path(a.out or ROOT / "bench" / "results" / f"gemm_multi_{a.device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "model_rows": model_rows},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# xorgemm multi-fine-tune benchmark ({a.device})\n\n{table}")
    bad = [r for r in rows if not r["correct"]]
    if bad:
        raise SystemExit(f"{len(bad)} rows failed the correctness check")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", nargs="+", help="N x K weight shapes, e.g. 4096x4096 (default: per device)")
    p.add_argument("--m", type=int, nargs="+", help="token counts (default: per device)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: per device")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 15 CPU, 50 GPU)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/gemm_<device>)")
    p.add_argument("--plot", action="store_true", help="also write a PNG (matplotlib)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's CPU summary table")
    p.add_argument("--multi", action="store_true", help="many fine-tunes per batch (GPU): see bench/gemm_multi.py")
    p.add_argument("--d", type=int, nargs="+", default=[1, 4, 16, 64], help="--multi: fine-tunes per batch")
    p.add_argument("--dists", nargs="+", choices=ROW_DISTRIBUTIONS, default=list(ROW_DISTRIBUTIONS),
                   help="--multi: how rows spread over fine-tunes")
    p.add_argument("--multi-kinds", nargs="+", choices=KINDS_MULTI, default=["small", "dense"],
                   help="--multi: delta kinds")
    p.add_argument("--model", action="store_true", help="--multi: also the model-level run over frozen shares")
    a = p.parse_args(argv)
    if a.multi:
        return main_multi(a, argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    d = DEFAULTS[a.device]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (a.shapes or d["shapes"])]
    timer = Timer(a.device, a.reps or (15 if a.device == "cpu" else 50), 2 if a.device == "cpu" else 10)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": (torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "CPU")
            + (f", {torch.get_num_threads()} threads" if a.device == "cpu" else ""),
            "command": "python bench/gemm.py" + "".join(f" {v}" for v in argv if v != "--update-readme")}
    if a.device == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    meta["device"] = line.split(":", 1)[1].strip() + f", {torch.get_num_threads()} threads"
                    break
        except OSError:
            pass
    copy_gbs = None
    if a.device == "cuda":
        copy_gbs = copy_bandwidth(timer)
        meta["copy_gbs"] = copy_gbs
        meta["driver"] = driver_version()
        meta["cuda"] = torch.version.cuda
        meta["xorgemm_cuda_path"] = os.environ.get("XORGEMM_CUDA_PATH", "auto")
        if nvcomp_available():
            from nvidia import nvcomp

            meta["nvcomp"] = nvcomp.__version__
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in shapes:
            for dtype in a.dtypes or d["dtypes"]:
                for kind in a.kinds:
                    print(f"{shape[0]}x{shape[1]} {dtype} {kind} ...", file=sys.stderr, flush=True)
                    rows += bench_case(shape, a.m or d["m"], dtype, kind, a.device, timer, work, copy_gbs)
    table = markdown(rows, meta)
    print(table)
    out = Path(a.out or ROOT / "bench" / "results" / f"gemm_{a.device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# xorgemm GEMM benchmark ({a.device})\n\n{table}")
    if a.plot:
        plot(rows, out.with_suffix(".png"))
    if a.update_readme:
        update_readme(summary(rows) + f"\n{meta['device']}, {meta['date'][:10]}, `{meta['command']}`.\n")
    bad = [r for r in rows if r.get("correct") is False]
    if bad:
        raise SystemExit(f"{len(bad)} rows failed the correctness check")


if __name__ == "__main__":
    main()
