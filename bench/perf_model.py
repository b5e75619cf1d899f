"""A performance model of the CUDA paths on an H100 / H200: what each benchmark row should take, and why.

No GPU has run these kernels yet. So that the first device run tests the design as well as the code, every
GPU benchmark row gets a prediction from first principles next to its measurement, with the term that
bounds it; a miss then names the assumption that failed. The assumptions (`Device`) are the review's
inputs: bandwidth measured on the lent machines, latency and throughput from public figures. Nothing here
is fitted to a measurement.

How a fused launch is modelled (docs/kernels.md has the kernel):
- the grid and its split of the reduction are `plan_launch`'s, mirrored by `plan` (tests/test_perf_model.py
  holds both to the same numbers);
- a CTA streams its tiles through a 3-stage cp.async pipeline, so it finishes a tile every
    max(latency / 2 tiles in flight, its decode + MMA time, its share of the chip's bandwidth);
- the CTAs run in waves of `slots` (3 per SM at 16 rows, 2 at 64), each wave as long as its CTAs' tiles;
- plus the launch, one load latency to fill the pipeline, and, with split-K, the partial sums' round trip;
- cuBLAS on the dense weight: its bytes at `cublas_bw_frac` of copy bandwidth at small M, its FLOPs at
  `cublas_flops_frac` of the tensor cores' peak at large M (less when its output tiles leave SMs idle),
  whichever is longer;
- one fine-tune at M > 64 takes the patched-block path: cuBLAS per block, the next block's apply beside it.
The grouped call (many fine-tunes) is modelled as built (docs/kernels.md): every fine-tune's entry for a tile
is fetched during the previous tile and its payload prefetched into L2, so per tile: the base product once,
then per batch of up to 8 sparse tiles one L2 round trip to stage their payloads in shared memory and the
corrections' arithmetic, and per dense tile one L2 round trip for its payload, its decode and a masked
MMA, one dense tile after another.

    python bench/perf_model.py                   # the device script's benchmark rows, predicted (no GPU needed)
    python bench/perf_model.py --device h100
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TILE = 64
STAGES = 3


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    copy_gbs: float  # device-to-device copy, GB/s (H200: measured on the lent machines)
    latency_us: float  # a loaded HBM round trip
    l2_latency_us: float  # an L2 hit
    clock_ghz: float
    mma_tflops: float  # dense bf16/fp16 tensor-core peak through mma.sync (no wgmma)
    launch_us: float  # one kernel boundary inside a CUDA graph
    cublas_bw_frac: float  # cuBLAS's share of copy bandwidth at M <= 64 (an assumption: unmeasured)
    cublas_flops_frac: float  # cuBLAS's share of the tensor-core peak at large M
    small_kernel_us: float  # one of the grouped call's host-issued prep kernels (sort, histogram, ...)


DEVICES = {
    "h200": Device("NVIDIA H200", 132, 4300.0, 0.9, 0.3, 1.98, 660.0, 2.0, 0.85, 0.70, 2.0),
    "h100": Device("NVIDIA H100 80GB HBM3", 132, 3000.0, 0.9, 0.3, 1.98, 660.0, 2.0, 0.85, 0.70, 2.0),
}

# CTAs per SM: 16-row CTAs 3 (shared memory: 58 KiB each), 32-row 3 (up to 166 registers), 64-row 2 (up to
# 203 registers, 78 KiB).
SLOTS_PER_SM = {1: 3, 2: 3, 4: 2}
# CTA cycles per tile beside the loads: issue, 3 barriers, the MMAs of one 16-row slice (8 per warp).
TILE_OVERHEAD_CYCLES = 350
MMA_CYCLES_PER_SLICE = 130
# The decode: a byteplane low pass as the review read it off the first kernel's SASS (~16 serialized
# LD -> LDS -> LOP3 -> STS chains a thread; the 16-byte decode since should need fewer, unmeasured); a sparse
# tile costs a pass over its exceptions, 128 threads wide.
BYTEPLANE_DECODE_CYCLES = 1250
SPARSE_CYCLES_PER_EXCEPTION_ROUND = 40
# Grouped: a sparse tile's exception pass and its corrections from shared memory (~8 exceptions a thread at
# 3% density, each a few shared loads and an FMA per row); a dense tile's copy, decode from shared memory,
# masked MMA and 4 barriers; the one prep kernel. Sparse payloads of a batch share 17 KiB of staging.
SPARSE_SEGMENT_CYCLES = 250
SPARSE_STAGE_BYTES = 64 * 72 * 2 + 64 * 64 * 2
DENSE_SEGMENT_CYCLES = 900 + BYTEPLANE_DECODE_CYCLES
SPARSE_BATCH = 8
GROUPED_PREP_KERNELS = 1
# xor_linear_cuda.cpp: one fine-tune takes the fused kernel up to this many rows, else patched blocks of
# this much weight, and never fewer rows than MIN_BLOCK_ROWS.
FUSED_MAX_ROWS = 64
SCRATCH_BYTES = 16 << 20
MIN_BLOCK_ROWS = 2048


@dataclass
class Plan:
    mt: int
    chunks: int
    out_blocks: int
    red_tiles: int
    tiles_per_split: int
    splits: int
    grid_splits: int  # splits in CTAs of their own (1: each CTA runs its block's splits itself)

    @property
    def ctas(self) -> int:
        return self.chunks * self.out_blocks * self.grid_splits

    @property
    def tiles_per_cta(self) -> int:
        return self.tiles_per_split if self.grid_splits > 1 else self.red_tiles


def plan(m: int, out_cols: int, red: int, sms: int) -> Plan:
    """`plan_launch` of csrc/cuda/fused_gemm_kernel.cuh, line for line."""
    mt = 1 if m <= 16 else (2 if m <= 32 else 4)
    chunks = (m + 16 * mt - 1) // (16 * mt)
    out_blocks = (out_cols + TILE - 1) // TILE
    red_tiles = (red + TILE - 1) // TILE
    slots = 3 * max(1, sms)
    best, splits, per_best = -1, 1, max(1, red_tiles)
    for s in range(1, max(1, red_tiles // 4) + 1):
        per = max(1, (red_tiles + s - 1) // s)
        if s > 1 and (red_tiles + per - 1) // per != s:
            continue
        cost = -(-(out_blocks * s) // slots) * (per + (1 if s > 1 else 0))
        if best < 0 or cost < best:
            best, splits, per_best = cost, s, per
    grid_splits = 1 if chunks * out_blocks >= slots else splits
    return Plan(mt, chunks, out_blocks, red_tiles, per_best, splits, grid_splits)


@dataclass
class Prediction:
    ms: float
    bound: str  # what set the time: "HBM", "latency", "decode", "launch", "FLOPs", "apply", "segments"
    detail: str  # the numbers behind it, for the report

    def as_dict(self):
        return asdict(self)


def _decode_cycles(delta_frac: float) -> float:
    """CTA cycles to decode one 64x64 bf16 tile of a delta whose resident size is `delta_frac` of the weight."""
    if delta_frac <= 0:
        return 0.0
    if delta_frac >= 0.3:  # dense deltas are byteplane tiles
        return BYTEPLANE_DECODE_CYCLES
    exceptions = delta_frac * TILE * TILE * 2 / 4  # ~4 bytes an exception (position + high byte + table share)
    return 100 + SPARSE_CYCLES_PER_EXCEPTION_ROUND * math.ceil(exceptions / 128)


def fused(n: int, k: int, m: int, delta_frac: float, dev: Device, transposed: bool = False) -> Prediction:
    """One fine-tune, the staged fused kernel (bf16/fp16): y = x (W xor D)^T."""
    out_cols, red = (k, n) if transposed else (n, k)
    p = plan(m, out_cols, red, dev.sms)
    slots = SLOTS_PER_SM[p.mt] * dev.sms
    tile_bytes = TILE * TILE * 2 * (1 + delta_frac)  # base + payload from HBM (activation rows: L2 hits)
    cycles = TILE_OVERHEAD_CYCLES + p.mt * MMA_CYCLES_PER_SLICE + _decode_cycles(delta_frac)
    t_latency = dev.latency_us / (STAGES - 1)
    t_decode = cycles / (dev.clock_ghz * 1e3)
    total_us, bounds, left = 0.0, {}, p.ctas
    while left > 0:  # waves
        resident = min(left, slots)
        t_bw = tile_bytes * resident / (dev.copy_gbs * 1e3)  # this CTA's share of the chip's bandwidth
        terms = {"latency": t_latency, "decode": t_decode, "HBM": t_bw}
        bound = max(terms, key=terms.get)
        wave_us = p.tiles_per_cta * terms[bound]
        bounds[bound] = bounds.get(bound, 0.0) + wave_us
        total_us += wave_us
        left -= resident
    epilogue_us = 0.0
    if p.grid_splits > 1:  # partial sums written, counted, read back by the last CTA
        epilogue_us = dev.latency_us * 2 + 2 * p.grid_splits * m * out_cols * 4 / (dev.copy_gbs * 1e3)
    total_us += dev.launch_us + dev.latency_us + epilogue_us
    bound = max(bounds, key=bounds.get) if bounds else "launch"
    if dev.launch_us + dev.latency_us > total_us / 2:
        bound = "launch"
    waves = p.ctas / slots
    detail = (f"{p.ctas} CTAs ({p.out_blocks} blocks x {p.grid_splits} splits x {p.chunks} chunks) = {waves:.2f} "
              f"waves of {slots}; {p.tiles_per_cta} tiles/CTA; per tile latency {t_latency * 1e3:.0f} ns, "
              f"decode+MMA {t_decode * 1e3:.0f} ns")
    return Prediction(total_us / 1e3, bound, detail)


def cublas(n: int, k: int, m: int, dev: Device, elem_bytes: int = 2) -> Prediction:
    """cuBLAS on a dense weight: y = x W^T. Its output tiles run in waves over the SMs, so a GEMM of few tiles
    leaves SMs idle; it is assumed to pick, of 128x128, 128x64 and 64x64 tiles (at 100%, 90% and 75% of an
    SM's peak), the one that does best."""
    bytes_ = (n * k + m * k + m * n) * elem_bytes
    t_bw = bytes_ / (dev.copy_gbs * dev.cublas_bw_frac * 1e3)
    wave_fill = 0.0
    for tm, tn, eff in ((128, 128, 1.0), (128, 64, 0.9), (64, 64, 0.75)):
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        wave_fill = max(wave_fill, eff * tiles / (math.ceil(tiles / dev.sms) * dev.sms))
    t_flops = 2 * m * n * k / (dev.mma_tflops * dev.cublas_flops_frac * wave_fill * 1e6)
    bound = "HBM" if t_bw >= t_flops else "FLOPs"
    t = max(t_bw, t_flops) + dev.launch_us
    return Prediction(t / 1e3, bound, f"{bytes_ / 1e6:.1f} MB, {2 * m * n * k / 1e9:.1f} GFLOP")


def patched_blocks(n: int, k: int, m: int, delta_frac: float, dev: Device) -> Prediction:
    """The patched-block path (one fine-tune at M > 64): per block of ~16 MiB of weight rows (at least 2048
    rows), the apply kernel writes the patched rows into scratch (reading base + delta), then cuBLAS
    multiplies the block, while a side stream patches the next block. Assumed: an apply beside a GEMM runs
    as fast as alone (a compute-bound GEMM leaves it the bandwidth), so only the first block's apply shows,
    and each later step takes the longer of its GEMM and the next block's apply."""
    rows = max(1, SCRATCH_BYTES // (TILE * k * 2), -(-MIN_BLOCK_ROWS // TILE)) * TILE
    blocks = math.ceil(n / rows)
    applies = [min(rows, n - b * rows) * k * 2 * (2 + delta_frac) / (dev.copy_gbs * 1e3) + dev.launch_us
               for b in range(blocks)]
    gemms = [cublas(min(rows, n - b * rows), k, m, dev).ms * 1e3 for b in range(blocks)]
    t_us = applies[0] + sum(max(gemms[b], applies[b + 1] if b + 1 < blocks else 0.0) for b in range(blocks))
    bound = "apply" if sum(applies[1:]) > sum(gemms[:-1]) else cublas(rows, k, m, dev).bound
    return Prediction(t_us / 1e3, bound, f"{blocks} blocks of {rows} rows; apply {sum(applies):.1f} us "
                      f"(first block's {applies[0]:.1f} us exposed), GEMMs {sum(gemms):.1f} us")


def xor_linear(n: int, k: int, m: int, delta_frac: float, dev: Device) -> Prediction:
    """XorLinear with one fine-tune, the path the op picks in auto mode (xor_linear_cuda.cpp)."""
    return fused(n, k, m, delta_frac, dev) if m <= FUSED_MAX_ROWS else patched_blocks(n, k, m, delta_frac, dev)


def grouped(n: int, k: int, m: int, active: int, delta_frac: float, dev: Device) -> Prediction:
    """Per-row fine-tunes in one launch, as built: `active` fine-tunes with rows, spread over the batch, every
    tile of theirs non-zero (element-sparse changes touch every tile), sparse below 30% resident."""
    p = plan(m, n, k, dev.sms)
    slots = SLOTS_PER_SM[p.mt] * dev.sms
    segments = min(active, 16 * p.mt)  # fine-tunes with rows in one CTA: at most one a row
    cycle_us = 1 / (dev.clock_ghz * 1e3)
    base_us = max(dev.latency_us / (STAGES - 1), (TILE_OVERHEAD_CYCLES + p.mt * MMA_CYCLES_PER_SLICE) * cycle_us)
    if delta_frac < 0.3:
        payload = max(16, delta_frac * TILE * TILE * 2)
        batch = max(1, min(SPARSE_BATCH, int(SPARSE_STAGE_BYTES // payload)))
        batches = math.ceil(segments / batch)
        extra_us = batches * dev.l2_latency_us + segments * SPARSE_SEGMENT_CYCLES * cycle_us
        how = f"{segments} sparse tiles a CTA tile in {batches} batches"
    else:
        extra_us = segments * (dev.l2_latency_us + DENSE_SEGMENT_CYCLES * cycle_us)
        how = f"{segments} dense tiles a CTA tile, one by one"
    tile_us = base_us + extra_us
    waves = math.ceil(p.ctas / slots)
    prep_us = GROUPED_PREP_KERNELS * dev.small_kernel_us
    t = waves * p.tiles_per_cta * tile_us + dev.launch_us + dev.latency_us + prep_us
    floor_us = n * k * 2 * (1 + active * delta_frac) / (dev.copy_gbs * 1e3)
    detail = (f"{p.ctas} CTAs, {waves} waves, {p.tiles_per_cta} tiles/CTA at {tile_us:.2f} us; {how}; "
              f"byte floor {floor_us:.1f} us")
    bound = "segments" if extra_us > base_us else "base"
    return Prediction(t / 1e3, bound, detail)


def dense_many(n: int, k: int, rows_per_finetune: list[int], dev: Device) -> Prediction:
    """The grouped call's baseline: one cuBLAS GEMM per active fine-tune."""
    ps = [cublas(n, k, r, dev) for r in rows_per_finetune]
    return Prediction(sum(p.ms for p in ps), ps[0].bound, f"{len(ps)} GEMMs")


def for_this_gpu(name: str, sms: int, copy_gbs: float) -> Device:
    """The model's device for a run on `name`: its assumptions, with the SM count and the copy bandwidth that
    run measured (inputs, not fits)."""
    key = "h200" if "H200" in name else "h100"
    return replace(DEVICES[key], name=name, sms=sms, copy_gbs=copy_gbs)


# The device script's benchmark rows (bench/device_check.sh), for the dry run.
DEVICE_SCRIPT_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
DEVICE_SCRIPT_MS = (1, 16, 256, 2048)


def resident_fractions() -> dict:
    """Resident delta size over the weight, per bf16 delta kind, from the committed CPU benchmark (the same
    encoder writes the same tiles on any device)."""
    path = Path(__file__).resolve().parent / "results" / "gemm_cpu.json"
    rows = json.loads(path.read_text())["rows"]
    fracs = {}
    for r in rows:
        if r["dtype"] == "bf16":
            fracs.setdefault(r["kind"], r["delta_bytes"] / r["weight_bytes"])
    return fracs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES), default="h200")
    a = ap.parse_args(argv)
    dev = DEVICES[a.device]
    fracs = resident_fractions()
    print(f"# Predicted on {dev.name} ({json.dumps(asdict(dev))})\n")
    print("| N x K | M | delta | resident | cuBLAS ms | xorgemm ms | x cuBLAS | bound | plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in DEVICE_SCRIPT_SHAPES:
        for m in DEVICE_SCRIPT_MS:
            for kind in ("sparse", "dense"):
                f = fracs.get(kind, 0.0)
                c, x = cublas(n, k, m, dev), xor_linear(n, k, m, f, dev)
                print(f"| {n}x{k} | {m} | {kind} | {100 * f:.1f}% | {c.ms:.4f} | {x.ms:.4f} | {x.ms / c.ms:.2f} | "
                      f"{x.bound} | {x.detail} |")
    print("\n| N x K | D | rows | delta | D cuBLAS ms | grouped ms | speed-up | detail |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in DEVICE_SCRIPT_SHAPES[:2]:
        for kind in ("sparse", "dense"):
            f = fracs.get(kind, 0.0)
            g, d = grouped(n, k, 16, 16, f, dev), dense_many(n, k, [1] * 16, dev)
            print(f"| {n}x{k} | 16 | 1 each | {kind} | {d.ms:.4f} | {g.ms:.4f} | {d.ms / g.ms:.2f}x | {g.detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
