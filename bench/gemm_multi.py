"""Many fine-tunes in one batch: the grouped XOR GEMM against the same run's baselines, on a GPU.

For D fine-tunes of one base weight (N x K), M rows spread over them (distinct / uniform / zipf / skewed /
identical, see xorgemm.testing.row_finetunes), it times, median of many runs after warm-up, with every weight
kept in enough copies to cycle through three L2s' worth:
  dense    D cuBLAS GEMMs, one per fine-tune with rows, on D materialized fine-tuned weights
  single   D calls of the single-fine-tune fused kernel (XorLinear with that fine-tune), one per fine-tune
  grouped  one XorLinear call with per-row fine-tune ids: one launch, each base tile read once
and reports grouped's effective bandwidth over base + the active fine-tunes' resident deltas + activations
against the same run's device-to-device copy bandwidth, and checks grouped against float64.

Delta kinds: small (3% of elements changed by ~1e-4: resident ~3%), seed (the seed notebook's 3% change,
resident ~6%), dense (every element, 1% noise). D > 16 reuses 16 distinct deltas as separate resident
copies (the same bytes moved, less setup). `--model` adds a model-level run: a decoder-shaped stack whose
fine-tunes leave nothing / attention / the MLP / everything frozen, served by one patched stack against D
dense stacks.

    python bench/gemm_multi.py --device cuda                     # D = 1, 4, 16, 64; small and dense deltas
    python bench/gemm_multi.py --device cuda --shapes 4096x4096 --d 16 --dists zipf --kinds small seed --model
    python bench/gemm_multi.py --device cpu --shapes 512x512 --d 4 --m 8   # dry run of the script on the CPU op
Writes bench/results/gemm_multi_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import perf_model
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    Timer,
    command_line,
    copy_bandwidth,
    driver_version,
    parse_shapes,
    rotation,
    timestamp,
    write_results,
)

from xorgemm import XorLinear
from xorgemm.testing import FLOAT_DTYPES, ROW_DISTRIBUTIONS, row_finetunes

KINDS = ("small", "seed", "dense")
DISTINCT_DELTAS = 16


def finetune(base: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """A fine-tuned copy of `base` (on its device; fast enough for Llama-sized weights)."""
    g = torch.Generator(device=base.device).manual_seed(seed)
    w = base.float()
    if kind == "dense":
        return (w + torch.randn(w.shape, generator=g, device=w.device) * 1e-2 * w.abs().mean()).to(base.dtype)
    mask = torch.rand(w.shape, generator=g, device=w.device) < 0.03
    # Absolute changes on weights of scale 0.02: "small" is ~1e-4 (about one bf16 step, half round away),
    # "seed" 1e-3 as bench/gemm.py's sparse kind (xorgemm.testing.perturb) makes them.
    step = torch.randn(w.shape, generator=g, device=w.device) * (1e-4 if kind == "small" else 1e-3)
    return torch.where(mask, w + step, w).to(base.dtype)


class Case:
    """D fine-tunes of one base weight, resident `rot` times over."""

    def __init__(self, n, k, d, kind, dtype_name, device):
        self.n, self.k, self.d, self.kind, self.dtype_name, self.device = n, k, d, kind, dtype_name, device
        self.dtype = FLOAT_DTYPES[dtype_name]
        g = torch.Generator(device=device).manual_seed(n + k + d)
        self.base = (torch.randn(n, k, generator=g, device=device) * 0.02).to(self.dtype)
        distinct = [finetune(self.base, kind, seed=i) for i in range(min(d, DISTINCT_DELTAS))]
        self.fts = [distinct[i % len(distinct)] for i in range(d)]
        proto = XorLinear(self.base.cpu())
        for i, f in enumerate(distinct):
            proto.add_finetune(f"f{i}", f.cpu())
        weight_bytes = self.base.numel() * self.base.element_size()
        delta_bytes = [proto.delta_bytes(f"f{i % len(distinct)}") for i in range(d)]
        self.rot = rotation(weight_bytes + sum(delta_bytes), device)
        self.layers = []  # each serves the grouped call and, one fine-tune at a time, the single calls
        for _ in range(self.rot):
            layer = XorLinear(self.base.clone())
            for i in range(d):  # copies of the encoded sections: no re-encoding per copy
                layer.add_finetune_section(f"g{i}", proto.deltas[f"f{i % len(distinct)}"].section.clone())
            self.layers.append(layer.to(device))
        self.dense = [[f.clone() for f in self.fts] for _ in range(self.rot)]
        self.weight_bytes, self.delta_bytes = weight_bytes, delta_bytes


def bench_multi(shapes, ds, dists, kinds, dtype_name, ms, timer, copy_gbs, model=None):
    """Rows for every shape, D, delta kind, row distribution and token count M (`ms`, or D, 4 D and 256 for
    each D when None), on the timer's device."""
    rows = []
    for n, k in shapes:
        for d in ds:
            for kind in kinds:
                print(f"multi {n}x{k} D={d} {kind} ...", file=sys.stderr, flush=True)
                c = Case(n, k, d, kind, dtype_name, timer.device)
                for dist in dists:
                    for m in ms or sorted({d, 4 * d, 256}):
                        rows.append(one_row(c, dist, m, timer, copy_gbs, model))
                del c
                if timer.device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def one_row(c, dist, m, timer, copy_gbs, model=None):
    n, k, d, device = c.n, c.k, c.d, c.device
    ids = row_finetunes(dist, m, d, seed=m)
    x = torch.randn(m, k, device=device).to(c.dtype)
    ids_d = ids.to(device)
    active = sorted(set(ids.tolist()))
    rows_of = {f: (ids == f).nonzero().reshape(-1).to(device) for f in active}
    xs = {f: x.index_select(0, r) for f, r in rows_of.items()}  # gathered outside the timing: favors baselines
    names = [f"g{i}" for i in range(d)]
    gpu = device == "cuda"
    timing = {}
    with torch.no_grad():
        dense_ms = timer(lambda i: [F.linear(xs[f], c.dense[i][f]) for f in active], c.rot, graph=gpu)
        timing["dense"] = timer.last
        single_ms = timer(lambda i: [c.layers[i](xs[f], finetune=names[f]) for f in active], c.rot, graph=gpu)
        timing["single"] = timer.last
        grouped_ms = timer(lambda i: c.layers[i](x, finetune=ids_d), c.rot, graph=gpu)
        timing["grouped"] = timer.last
        y = c.layers[0](x, finetune=ids_d)
    err = max(((y[rows_of[f]].double() - xs[f].double() @ c.fts[f].double().T).norm()
               / (xs[f].double() @ c.fts[f].double().T).norm()).item() for f in active)
    moved = c.weight_bytes + sum(c.delta_bytes[f] for f in active) + x.numel() * x.element_size() * (1 + n / k)
    gbs = moved / (grouped_ms * 1e-3) / 1e9
    predicted = {}
    if model is not None:  # bench/perf_model.py: predicted beside measured
        frac = statistics.mean(c.delta_bytes) / c.weight_bytes
        g = perf_model.grouped(n, k, m, len(active), frac, model)
        dense = perf_model.dense_many(n, k, [int((ids == f).sum()) for f in active], model)
        predicted = {"grouped_predicted_ms": g.ms, "grouped_predicted_detail": g.detail,
                     "dense_predicted_ms": dense.ms}
    return {**predicted,"n": n, "k": k, "d": d, "kind": c.kind, "dist": dist, "m": m, "dtype": c.dtype_name,
            "active": len(active), "weight_bytes": c.weight_bytes,
            "resident_delta_frac": statistics.mean(c.delta_bytes) / c.weight_bytes,
            "dense_ms": dense_ms, "single_ms": single_ms, "grouped_ms": grouped_ms,
            "grouped_gbs": gbs, "copy_frac": gbs / copy_gbs, "rel_err": err, "correct": err < 1e-2,
            "timing": timing}


PROJECTIONS = ("q", "k", "v", "o", "up", "down")
# Which projections every fine-tune leaves frozen, from none to all: the model-level run's x axis.
FROZEN_SETS = (("nothing", ()), ("attention", ("q", "k", "v", "o")), ("MLP", ("up", "down")),
               ("everything", PROJECTIONS))


def block_forward(layers, h, ids):
    """One decoder block's projections for single-token rows (attention over one token is its value)."""
    q, k, v, o, up, down = (layers[p] for p in PROJECTIONS)
    q(h, ids), k(h, ids)  # computed for their cost: with one token and no cache they do not change y
    h = h + o(v(h, ids), ids)
    return h + down(torch.relu(up(h, ids)), ids)


def bench_model(d, blocks, width, dtype, timer, m):
    """A decoder-shaped stack (q, k, v, o: width x width; up: 4 width x width; down: width x 4 width per
    block) serving D fine-tunes, one row each, with a growing set of projections frozen in every fine-tune:
    one patched stack (grouped calls) against D dense stacks (one cuBLAS GEMM per projection per fine-tune),
    on the timer's device."""
    device = timer.device
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shape = {"q": (width, width), "k": (width, width), "v": (width, width), "o": (width, width),
             "up": (4 * width, width), "down": (width, 4 * width)}
    bases = [{p: (torch.randn(*shape[p], generator=g, device=device) * 0.02).to(dtype) for p in PROJECTIONS}
             for _ in range(blocks)]
    ids = row_finetunes("distinct", m, d).to(device)
    x = torch.randn(m, width, device=device).to(dtype)
    rows_of = [(ids == f).nonzero().reshape(-1) for f in range(d)]
    xs = [x.index_select(0, r) for r in rows_of]
    for label, frozen in FROZEN_SETS:
        patched, dense = [], [[] for _ in range(d)]
        for bi, b in enumerate(bases):
            layers = {}
            for p in PROJECTIONS:
                layer = XorLinear(b[p])
                for f in range(d):
                    if p in frozen:
                        layer.add_unchanged(f"f{f}")
                    else:
                        layer.add_finetune(f"f{f}", finetune(b[p], "small", seed=1000 * bi + 10 * f + len(p)))
                layers[p] = layer
            patched.append({p: (lambda h, i, layer=layers[p]: layer(h, finetune=i)) for p in PROJECTIONS})
            for f in range(d):  # D separate dense models: frozen projections are copies of the base, not shared
                w = {p: b[p].clone() if p in frozen else layers[p].materialize(f"f{f}").to(device)
                     for p in PROJECTIONS}
                dense[f].append({p: (lambda h, i, w=w[p]: F.linear(h, w)) for p in PROJECTIONS})
        frozen_bytes = sum(shape[p][0] * shape[p][1] for p in frozen) / sum(a * b for a, b in shape.values())
        gpu = device == "cuda"
        with torch.no_grad():
            t_dense = timer(lambda i, dense=dense: [run_stack(s, h, None) for s, h in zip(dense, xs)], graph=gpu)
            t_patched = timer(lambda i, patched=patched: run_stack(patched, x, ids), graph=gpu)
        rows.append({"d": d, "blocks": blocks, "width": width, "frozen": label, "frozen_share": frozen_bytes,
                     "m": m, "dense_ms": t_dense, "xorgemm_ms": t_patched, "speedup": t_dense / t_patched})
    return rows


def run_stack(blocks, h, ids):
    for layers in blocks:
        h = block_forward(layers, h, ids)
    return h


def markdown(rows, model_rows, meta) -> str:
    out = [f"Device: {meta['device']}; torch {meta['torch']}; CUDA {meta['cuda']}; driver {meta['driver']}; "
           f"copy bandwidth {meta['copy_gbs']:.0f} GB/s; {meta['date']}; `{meta['command']}`.", "",
           "Median milliseconds of CUDA-graph replays (the GPU's time, no Python launch overhead; `(e)` marks "
           "a method that could not be captured and was timed eagerly). "
           "`dense`: one cuBLAS GEMM per fine-tune with rows, on materialized weights; "
           "`single`: one single-fine-tune fused call per fine-tune; `grouped`: one call for the whole batch. "
           "`x dense` is dense over grouped (higher is better). `GB/s` counts the base, the active fine-tunes' "
           "resident deltas and the activations; `% copy` is that over the copy bandwidth. `predicted` is "
           "bench/perf_model.py's dense and grouped time for the row (this run's SM count and copy bandwidth).", "",
           "| N x K | D | delta | resident | rows | M | active | dense ms | single ms | grouped ms | x dense | "
           "x single | GB/s | % copy | predicted dense / grouped ms | correct |",
           "|---" * 16 + "|"]
    for r in rows:
        def ms(key, r=r):
            return f"{r[key + '_ms']:.3f}" + (" (e)" if r["timing"][key] == "eager" else "")

        out.append(f"| {r['n']}x{r['k']} | {r['d']} | {r['kind']} | {100 * r['resident_delta_frac']:.1f}% | "
                   f"{r['dist']} | {r['m']} | {r['active']} | {ms('dense')} | {ms('single')} | "
                   f"{ms('grouped')} | {r['dense_ms'] / r['grouped_ms']:.1f}x | "
                   f"{r['single_ms'] / r['grouped_ms']:.1f}x | {r['grouped_gbs']:.0f} | {100 * r['copy_frac']:.0f}% | "
                   + (f"{r['dense_predicted_ms']:.3f} / {r['grouped_predicted_ms']:.3f} | "
                      if "grouped_predicted_ms" in r else "- | ")
                   + f"{'yes' if r['correct'] else 'NO'} |")
    if model_rows:
        out += ["", "Model level: a decoder-shaped stack (q, k, v, o, up, down per block), D fine-tunes one row "
                "each, some projections frozen in every fine-tune (those cost the base alone).", "",
                "| D | blocks x width | frozen in every fine-tune | frozen share of weights | dense ms (D stacks) | "
                "xorgemm ms (one stack) | speedup |",
                "|---|---|---|---|---|---|---|"]
        for r in model_rows:
            out.append(f"| {r['d']} | {r['blocks']} x {r['width']} | {r['frozen']} | {100 * r['frozen_share']:.0f}% | "
                       f"{r['dense_ms']:.3f} | {r['xorgemm_ms']:.3f} | {r['speedup']:.1f}x |")
    return "\n".join(out) + "\n"



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu only dry-runs the same code on the CPU op, for checking the script: its numbers say "
                        "nothing about the GPU kernel")
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"], help="N x K weight shapes")
    p.add_argument("--d", type=int, nargs="+", default=[1, 4, 16, 64], help="fine-tunes per batch")
    p.add_argument("--m", type=int, nargs="+", help="token counts (default: D, 4 D and 256 for each D)")
    p.add_argument("--dists", nargs="+", choices=ROW_DISTRIBUTIONS, default=list(ROW_DISTRIBUTIONS),
                   help="how rows spread over fine-tunes")
    p.add_argument("--kinds", dest="kinds", nargs="+", choices=KINDS, default=["small", "dense"],
                   help="delta kinds")
    p.add_argument("--dtype", "--dtypes", dest="dtype", choices=sorted(FLOAT_DTYPES), default="bf16")
    p.add_argument("--model", action="store_true", help="also the model-level run over frozen shares")
    p.add_argument("--reps", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--out", default=None,
                   help="results path without suffix (default bench/results/gemm_multi_<device>)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    timer = Timer(a.device, a.reps, 5)
    copy_gbs = copy_bandwidth(timer, a.device)
    gpu = a.device == "cuda"
    meta = {"date": timestamp(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if gpu else "CPU (dry run)", "cuda": torch.version.cuda,
            "driver": driver_version() if gpu else "n/a", "copy_gbs": copy_gbs,
            "command": command_line("bench/gemm_multi.py", argv)}
    model = None
    if gpu:
        model = perf_model.for_this_gpu(torch.cuda.get_device_name(),
                                        torch.cuda.get_device_properties(0).multi_processor_count, copy_gbs)
        meta["perf_model"] = model.__dict__
    rows = bench_multi(parse_shapes(a.shapes), a.d, a.dists, a.kinds, a.dtype, a.m, timer, copy_gbs, model)
    model_rows = bench_model(16, 2, 2048 if gpu else 128, FLOAT_DTYPES[a.dtype], timer, 16) if a.model else []
    table = markdown(rows, model_rows, meta)
    print(table)
    write_results(a.out or RESULTS / f"gemm_multi_{a.device}", f"xorgemm multi-fine-tune benchmark ({a.device})",
                  table, meta=meta, rows=rows, model_rows=model_rows)
    bad = [r for r in rows if not r["correct"]]
    if bad:
        raise SystemExit(f"{len(bad)} rows failed the correctness check")


if __name__ == "__main__":
    main()
