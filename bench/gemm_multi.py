"""Many fine-tunes in one batch (`python bench/gemm.py --multi`): the grouped XOR GEMM against the same run's
baselines, on a GPU.

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
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from xorgemm import XorLinear
from xorgemm.testing import row_finetunes

KINDS_MULTI = ("small", "seed", "dense")
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

    def __init__(self, n, k, d, kind, dtype, rot_of, device):
        g = torch.Generator(device=device).manual_seed(n + k + d)
        self.base = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
        distinct = [finetune(self.base, kind, seed=i) for i in range(min(d, DISTINCT_DELTAS))]
        self.fts = [distinct[i % len(distinct)] for i in range(d)]
        proto = XorLinear(self.base.cpu())
        for i, f in enumerate(distinct):
            proto.add_delta(f"f{i}", f.cpu())
        weight_bytes = self.base.numel() * self.base.element_size()
        delta_bytes = [proto.delta_bytes(f"f{i % len(distinct)}") for i in range(d)]
        self.rot = rot_of(weight_bytes + sum(delta_bytes))
        self.layers = []  # each serves the grouped call and, one fine-tune at a time, the single calls
        for _ in range(self.rot):
            layer = XorLinear(self.base.clone())
            for i in range(d):  # copies of the validated sections: no re-encoding per copy
                slot = proto.deltas[f"f{i % len(distinct)}"]
                layer._add_slot(f"g{i}", slot.section.clone(), slot.offsets.clone(), None)
            self.layers.append(layer.to(device))
        self.dense = [[f.clone() for f in self.fts] for _ in range(self.rot)]
        self.weight_bytes, self.delta_bytes = weight_bytes, delta_bytes


def bench_multi(shapes, ds, dists, kinds, dtype_name, dtypes, timer, rot_of, copy_gbs, ms_of, device="cuda"):
    rows = []
    for n, k in shapes:
        for d in ds:
            for kind in kinds:
                print(f"multi {n}x{k} D={d} {kind} ...", file=sys.stderr, flush=True)
                c = Case(n, k, d, kind, dtypes[dtype_name], rot_of, device)
                for dist in dists:
                    for m in ms_of(d):
                        rows.append(one_row(c, n, k, d, kind, dist, m, dtypes[dtype_name], dtype_name, timer,
                                            copy_gbs, device))
                del c
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def one_row(c, n, k, d, kind, dist, m, dtype, dtype_name, timer, copy_gbs, device):
    ids = row_finetunes(dist, m, d, seed=m)
    x = torch.randn(m, k, device=device).to(dtype)
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
    return {"n": n, "k": k, "d": d, "kind": kind, "dist": dist, "m": m, "dtype": dtype_name,
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


def bench_model(d, blocks, width, dtype, timer, m, device="cuda"):
    """A decoder-shaped stack (q, k, v, o: width x width; up: 4 width x width; down: width x 4 width per
    block) serving D fine-tunes, one row each, with a growing set of projections frozen in every fine-tune:
    one patched stack (grouped calls) against D dense stacks (one cuBLAS GEMM per projection per fine-tune)."""
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
                        layer.add_delta(f"f{f}", finetune(b[p], "small", seed=1000 * bi + 10 * f + len(p)))
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


def markdown_multi(rows, model_rows, meta) -> str:
    out = [f"Device: {meta['device']}; torch {meta['torch']}; CUDA {meta['cuda']}; driver {meta['driver']}; "
           f"copy bandwidth {meta['copy_gbs']:.0f} GB/s; {meta['date']}; `{meta['command']}`.", "",
           "Median milliseconds of CUDA-graph replays (the GPU's time, no Python launch overhead; `(e)` marks "
           "a method that could not be captured and was timed eagerly). "
           "`dense`: one cuBLAS GEMM per fine-tune with rows, on materialized weights; "
           "`single`: one single-fine-tune fused call per fine-tune; `grouped`: one call for the whole batch. "
           "`x dense` is dense over grouped (higher is better). `GB/s` counts the base, the active fine-tunes' "
           "resident deltas and the activations; `% copy` is that over the copy bandwidth.", "",
           "| N x K | D | delta | resident | rows | M | active | dense ms | single ms | grouped ms | x dense | "
           "x single | GB/s | % copy | correct |",
           "|---" * 15 + "|"]
    for r in rows:
        def ms(key, r=r):
            return f"{r[key + '_ms']:.3f}" + (" (e)" if r["timing"][key] == "eager" else "")

        out.append(f"| {r['n']}x{r['k']} | {r['d']} | {r['kind']} | {100 * r['resident_delta_frac']:.1f}% | "
                   f"{r['dist']} | {r['m']} | {r['active']} | {ms('dense')} | {ms('single')} | "
                   f"{ms('grouped')} | {r['dense_ms'] / r['grouped_ms']:.1f}x | "
                   f"{r['single_ms'] / r['grouped_ms']:.1f}x | {r['grouped_gbs']:.0f} | {100 * r['copy_frac']:.0f}% | "
                   f"{'yes' if r['correct'] else 'NO'} |")
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

