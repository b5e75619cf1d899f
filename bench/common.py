"""What the benchmarks share (as Punica's benchmark_utils.py): timing, L2 rotation, machine metadata and result
writing. Not run on its own; bench/gemm.py, bench/gemm_multi.py and bench/pack.py import it.

Importing it puts the repository root (for an in-place built `xorgemm`) and examples/ (for `real_finetune`) on
sys.path, so a benchmark imports `common` before anything from the repository.
"""
from __future__ import annotations

import datetime
import functools
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


# ------------------------------------------------------------------------------------------ timing


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
        their weights so that, on a GPU, L2 does not serve them from the previous run (see `rotation`)."""
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


def rotation(weight_bytes: int, device: str = "cuda") -> int:
    """Copies of the weights to cycle through so that each timed run reads them from memory, not from the
    last cache level (a GPU's L2, a CPU's L3): enough to fill three times that cache."""
    cache = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else cpu_last_cache_bytes()
    return max(1, -(-3 * cache // weight_bytes))


def cpu_last_cache_bytes() -> int:
    """The size of the CPU's last cache level (sysfs), or 0 when it cannot be read."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        try:
            best = max(best, int(text[:-1] if shift else text) << shift)
        except ValueError:
            continue
    return best


def copy_bandwidth(timer: Timer, device: str = "cuda") -> float:
    """Copy bandwidth in GB/s (device to device on a GPU), bytes read plus written, on a 1 GiB buffer."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timer(lambda i: b.copy_(a))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error of `got` against a float64 reference `want`."""
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def parse_shapes(specs) -> list[tuple[int, int]]:
    """Weight shapes from "NxK" strings: "4096x14336" -> (4096, 14336)."""
    return [tuple(int(v) for v in s.lower().split("x")) for s in specs]


# ------------------------------------------------------------------------------------------ metadata


@functools.cache
def _cpuinfo_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name(fallback: str = "CPU") -> str:
    """The CPU's model name (/proc/cpuinfo, read once), else platform.processor(), else `fallback`."""
    model = _cpuinfo_model()
    return model if model is not None else platform.processor() or fallback


def driver_version() -> str:
    """The NVIDIA driver's version, as nvidia-smi reports it ("unknown" without one)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def timestamp() -> str:
    """Now, to the second, ISO 8601 (the results' `date`)."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def command_line(script: str, argv, drop=()) -> str:
    """The command that reproduces this run, as the results quote it: `python <script> <argv>`, less the
    arguments in `drop` (those that only rewrite docs)."""
    return f"python {script}" + "".join(f" {v}" for v in argv if v not in drop)


# ------------------------------------------------------------------------------------------ results


def write_results(out, title: str, table: str, **payload) -> Path:
    """`out`.json (the payload: meta, rows, ...) and `out`.md (`# title` and the Markdown table); `out` is a
    path without suffix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# {title}\n\n{table}")
    return out


def replace_region(target: str | Path, marker: str, text: str) -> str:
    """Replace what lies between the lines `<!-- marker:begin -->` and `<!-- marker:end -->` by `text`.
    `target` is a file (a Path: rewritten in place) or the document itself (a str); returns the new text.
    Exits unless the markers are there exactly once."""
    old = target.read_text() if isinstance(target, Path) else target
    pattern = rf"(<!-- {re.escape(marker)}:begin -->\n).*?(<!-- {re.escape(marker)}:end -->)"
    new, n = re.subn(pattern, lambda m: m.group(1) + text + m.group(2), old, flags=re.S)
    if n != 1:
        where = target if isinstance(target, Path) else "text"
        raise SystemExit(f"{where}: no <!-- {marker}:begin/end --> markers to replace")
    if isinstance(target, Path):
        target.write_text(new)
    return new
