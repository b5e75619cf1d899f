"""Synthetic fine-tunes for tests, benchmarks and the demo.

`perturb(t, kind)` makes a fine-tuned copy of a weight with a known delta structure:
  sparse      a fraction of random elements changed (the seed notebook's "3% of elements")
  structured  a fraction of whole tiles changed (block-sparse updates, e.g. some heads or channels)
  partial     the first rows changed densely, the rest untouched (a partially frozen tensor)
  dense       every element changed a little (a full fine-tune)
`seed_scenario()` is the seed notebook's tiny transformer layer and its 3% fine-tune, exactly.
`whole_xor(base, ft)` is the baseline the benchmarks compress: the XOR of every tensor, whole.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from xorgemm.format.layout import tensor_bytes

DELTA_KINDS = ("sparse", "structured", "partial", "dense")
ROW_DISTRIBUTIONS = ("distinct", "uniform", "zipf", "skewed", "identical")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def row_finetunes(dist: str, m: int, d: int, *, seed: int = 0) -> torch.Tensor:
    """Fine-tune ids (int64, 0..d-1) for a batch of m rows over d fine-tunes, spread as the multi-tenant
    benchmark spreads them: distinct (row i on fine-tune i % d: one row each when m == d), uniform,
    zipf (P(f) ~ 1/(f+1)^1.5, Punica's skew), skewed (90% of rows on fine-tune 0) or identical (every row
    on the last fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "distinct":
        return torch.arange(m) % d
    if dist == "uniform":
        return torch.randint(0, d, (m,), generator=g)
    if dist == "zipf":
        p = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p / p.sum(), m, replacement=True, generator=g)
    if dist == "skewed":
        other = torch.randint(0, d, (m,), generator=g)
        return torch.where(torch.rand(m, generator=g) < 0.9, torch.zeros_like(other), other)
    if dist == "identical":
        return torch.full((m,), d - 1, dtype=torch.long)
    raise ValueError(f"unknown row distribution {dist!r}; one of {ROW_DISTRIBUTIONS}")


def perturb(t: torch.Tensor, kind: str = "sparse", *, frac: float = 0.03, magnitude: float = 1e-2,
            tile=(64, 64), seed: int = 0) -> torch.Tensor:
    """A fine-tuned copy of `t`; the change is relative to the weights' scale for `dense`."""
    g = torch.Generator().manual_seed(seed)
    out = t.detach().clone()
    flat = out.view(-1)
    n = flat.numel()
    if n == 0:
        return out
    if kind == "sparse":
        k = max(1, int(n * frac))
        idx = torch.randperm(n, generator=g)[:k]
        flat[idx] += (magnitude * torch.randn(k, generator=g)).to(out.dtype)
    elif kind == "structured":
        rows, cols = (out.shape[0], n // out.shape[0]) if out.dim() >= 2 else (1, n)
        view = out.view(rows, cols)
        tr, tc = (tile if out.dim() >= 2 else (1, tile[0] * tile[1]))
        gr, gc = -(-rows // tr), -(-cols // tc)
        k = max(1, int(gr * gc * frac))
        for t_id in torch.randperm(gr * gc, generator=g)[:k].tolist():
            r0, c0 = t_id // gc * tr, t_id % gc * tc
            blk = view[r0:r0 + tr, c0:c0 + tc]
            blk += (magnitude * torch.randn(blk.shape, generator=g)).to(out.dtype)
    elif kind == "partial":
        k = max(1, int(round(n * frac)))
        flat[:k] += (magnitude * torch.randn(k, generator=g)).to(out.dtype)
    elif kind == "dense":
        scale = out.float().abs().mean().clamp_min(1e-3)
        flat += (magnitude * scale * torch.randn(n, generator=g)).to(out.dtype)
    else:
        raise ValueError(f"unknown delta kind {kind!r}; expected one of {DELTA_KINDS}")
    return out


class TinyTransformerLayer(nn.Module):
    """The seed notebook's layer: MHA + FFN, 33,472 parameters at the defaults."""

    def __init__(self, d_model=64, nhead=4, dim_feedforward=128, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model))

    def forward(self, x, attn_mask=None):
        h = self.ln1(x)
        a, _ = self.self_attn(h, h, h, attn_mask=attn_mask)
        x = x + a
        return x + self.ff(self.ln2(x))


def perturb_subset_(module: nn.Module, frac: float = 0.03, magnitude: float = 1e-2, seed: int = 0):
    """The seed notebook's fine-tune: `frac` of every float parameter's elements get noise, in place."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if not p.dtype.is_floating_point:
                continue
            k = max(1, int(p.numel() * frac))
            idx = torch.randperm(p.numel(), generator=g, device=p.device)[:k]
            flat = p.view(-1)
            flat[idx] += magnitude * torch.randn(k, generator=g, device=p.device, dtype=flat.dtype)


def seed_scenario():
    """(base_layer, finetuned_layer) exactly as the seed notebook makes them (torch.manual_seed(42),
    3% of elements perturbed by 1e-2 noise with seed 123)."""
    torch.manual_seed(42)
    base = TinyTransformerLayer().eval()
    ft = copy.deepcopy(base)
    perturb_subset_(ft, frac=0.03, magnitude=1e-2, seed=123)
    return base, ft


def state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def whole_xor(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> bytes:
    """The XOR of base and fine-tuned bytes of every tensor both have with the same shape, in ft's order,
    concatenated: what a whole-file compressor (zstd of the XOR) is given as the baseline."""
    return b"".join((tensor_bytes(base[k]) ^ tensor_bytes(ft[k])).numpy().tobytes()
                    for k in ft if k in base and base[k].shape == ft[k].shape)


# A Llama-3-8B's shapes (hidden 4096, MLP 14336, GQA with 8 of 32 heads, vocabulary 128256): 8.03B
# parameters, 16 GB in bf16.
LLAMA3_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "kv": 1024, "vocab": 128256}


def llama_shapes(layers: int, hidden: int, intermediate: int, kv: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of a Llama-architecture checkpoint, in the order Hugging Face stores them."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        shapes.update({a + "q_proj.weight": (hidden, hidden), a + "k_proj.weight": (kv, hidden),
                       a + "v_proj.weight": (kv, hidden), a + "o_proj.weight": (hidden, hidden),
                       m + "gate_proj.weight": (intermediate, hidden), m + "up_proj.weight": (intermediate, hidden),
                       m + "down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_llama_pair(out_dir, *, layers: int, hidden: int, intermediate: int, kv: int, vocab: int,
                     shard_bytes: int = 5 * 10**9, magnitude: float = 1e-2, seed: int = 0, progress: bool = False):
    """Writes a synthetic base and its dense bf16 full fine-tune (every weight moved by `magnitude` of its
    scale: `perturb(..., "dense")`) as Hugging Face folders OUT/base and OUT/finetuned, sharded as
    transformers shards (model-0000i-of-0000n.safetensors of at most shard_bytes, an index, metadata
    format=pt). A tensor at a time: memory holds one tensor, whatever the model's size. Returns the two
    folders."""
    import json
    import os
    from pathlib import Path

    from tqdm.auto import tqdm

    from xorgemm.format.safetensors_io import Writer
    from xorgemm.packing.unpack import shard_groups

    shapes = llama_shapes(layers, hidden, intermediate, kv, vocab)
    groups = shard_groups({n: 2 * int(torch.Size(s).numel()) for n, s in shapes.items()}, shard_bytes)
    files = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    folders = []
    for which in ("base", "finetuned"):
        folder = Path(out_dir) / which
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, g in files.items() for n in g}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synthetic pair", disable=None if progress else True)
    k = 0
    for fname, names in files.items():
        writers = [Writer(f / fname, {n: ("BF16", shapes[n]) for n in names}, {"format": "pt"}) for f in folders]
        for name in names:
            k += 1
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            shape = shapes[name]
            if len(shape) == 1:
                base = (1 + 0.05 * torch.randn(shape, generator=g)).bfloat16()
            else:
                base = (0.02 * torch.randn(shape, generator=g)).bfloat16()
            writers[0].write(name, base)
            writers[1].write(name, perturb(base, "dense", magnitude=magnitude, seed=seed * 1_000_003 - k))
            bar.update(base.numel() * 2)
            del base
        for w in writers:
            w.close()
            os.chmod(w.path, 0o644)
    bar.close()
    return tuple(folders)


# Runs the xorgemm command in this interpreter, then writes its process's peak resident set (VmHWM, which a
# fork of a large parent does not inflate: it is the high-water mark of the new program's own memory, mapped
# file pages included) and its CPU seconds (all threads) to the file named first.
_MEASURED = """import resource, sys
from xorgemm.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
use = resource.getrusage(resource.RUSAGE_SELF)
open(sys.argv[1], "w").write(f"{kib * 1024} {use.ru_utime + use.ru_stime}")
sys.exit(code)
"""


@dataclass
class Measured:
    code: int  # exit code
    seconds: float  # wall time
    peak_rss: int  # bytes: VmHWM (0 where there is no /proc)
    cpu_seconds: float  # user + system, every thread


def run_measured(*args, cwd=None, env=None) -> Measured:
    """Runs `xorgemm ARGS` in a process of its own, measured. Output goes where ours goes."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    fd, path = tempfile.mkstemp(suffix=".peak")
    os.close(fd)
    try:
        t = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", _MEASURED, path, *map(str, args)], cwd=cwd, env=env).returncode
        seconds = time.perf_counter() - t
        with open(path) as f:
            text = f.read().split()
        return Measured(code, seconds, int(text[0]) if text else 0, float(text[1]) if text else 0.0)
    finally:
        os.unlink(path)
