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
Writes bench/results/gemm_<device>.json and .md (and .png with --plot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import xorgemm  # noqa: E402
from xorgemm import XorLinear  # noqa: E402
from xorgemm.testing import perturb  # noqa: E402

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
    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn) -> float:
        """Median milliseconds of fn()."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            for _ in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def rel_err(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def bench_row(shape, m, dtype_name, kind, device, timer, workdir):
    n, k = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    ft = make_finetune(base, kind, seed=1)
    x = torch.randn(m, k, generator=g).to(dtype)
    path = Path(workdir) / f"{n}x{k}-{dtype_name}-{kind}.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path)
    delta = xorgemm.load_delta(path)
    base_d, ft_d, x_d = base.to(device), ft.to(device), x.to(device)
    layer = XorLinear(base_d)
    layer.add_delta_from_file("ft", delta["w"])
    layer.active = "ft"
    row = {"n": n, "k": k, "m": m, "dtype": dtype_name, "kind": kind,
           "weight_bytes": base.numel() * base.element_size(), "delta_bytes": layer.delta_bytes(),
           "file_bytes": path.stat().st_size}
    with torch.no_grad():
        row["dense_ms"] = timer(lambda: F.linear(x_d, ft_d))

        def unfused():
            # The seed's way: decompress the chunks on every call, XOR the whole weight, then F.linear. The
            # content hashes are skipped (verify=False) so the baseline pays for no checking xorgemm skips.
            d = xorgemm.load_delta(path)
            return F.linear(x_d, d["w"].apply(base_d, verify=False))

        row["unfused_ms"] = timer(unfused)
        try:
            y = layer(x_d)
        except NotImplementedError as e:
            row["xorgemm_ms"], row["correct"], row["note"] = None, None, str(e).split(";")[0]
        else:
            row["xorgemm_ms"] = timer(lambda: layer(x_d))
            err = rel_err(y.cpu(), F.linear(x.double(), ft.double()))
            row["rel_err"], row["correct"] = err, err < TOL[dtype_name]
    delta.close()
    return row


def markdown(rows, meta) -> str:
    out = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; `{meta['command']}`. "
           "Median milliseconds; `x dense` is xorgemm's time over dense F.linear on the fine-tuned weight "
           "(lower is better, 1.00 = as fast); `vs unfused` is how many times faster xorgemm is than "
           "decompress + XOR + F.linear.", "",
           "| N x K | M | dtype | delta | resident delta | dense ms | unfused ms | xorgemm ms | x dense | "
           "vs unfused | correct |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xg = r.get("xorgemm_ms")
        out.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['dtype']} | {r['kind']} | "
            f"{100 * r['delta_bytes'] / r['weight_bytes']:.1f}% | {r['dense_ms']:.3f} | {r['unfused_ms']:.3f} | "
            + (f"{xg:.3f} | {xg / r['dense_ms']:.2f} | {r['unfused_ms'] / xg:.1f}x | "
               f"{'yes' if r['correct'] else 'NO'} |" if xg is not None else f"n/a | | | {r.get('note', '')} |"))
    return "\n".join(out) + "\n"


def summary(rows) -> str:
    """The README's short table: the largest shape, every kind, at the smallest and largest M."""
    if not rows:
        return ""
    n, k = max(((r["n"], r["k"]) for r in rows), key=lambda s: s[0] * s[1])
    ms = sorted({r["m"] for r in rows})
    pick = [r for r in rows if (r["n"], r["k"]) == (n, k) and r["m"] in (ms[0], ms[-1]) and r.get("xorgemm_ms")]
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

    rows = [r for r in rows if r.get("xorgemm_ms")]
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
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: per device")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 15 CPU, 50 GPU)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/gemm_<device>)")
    p.add_argument("--plot", action="store_true", help="also write a PNG (matplotlib)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's CPU summary table")
    a = p.parse_args(argv)
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
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in shapes:
            for dtype in a.dtypes or d["dtypes"]:
                for kind in a.kinds:
                    for m in a.m or d["m"]:
                        print(f"{shape[0]}x{shape[1]} {dtype} {kind} M={m} ...", file=sys.stderr, flush=True)
                        rows.append(bench_row(shape, m, dtype, kind, a.device, timer, work))
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
