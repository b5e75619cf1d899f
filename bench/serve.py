"""Serving throughput and per-token latency through vLLM, xorgemm's plugin beside vLLM's dense engines, in
one run on one machine.

A Llama-architecture model with random weights is generated on local disk (no downloads), with D full
fine-tunes that change every tensor, packed as .xor.safetensors deltas. The same batch of requests (each
P prompt tokens, T generated greedily) is served:

  dense base        vLLM serving the base checkpoint (the floor: what serving costs without fine-tunes)
  xorgemm base      the plugin's engine, requests without a fine-tune
  dense ft          vLLM serving fine-tune 1's dense checkpoint
  xorgemm ft        the plugin's engine, every request naming fine-tune 1
  dense D engines   D dense engines, one per fine-tune, each serving its share of the batch one after the other
                    (what serving D fine-tunes costs without xorgemm on one machine: D times the weights)
  xorgemm mixed     the plugin's engine, one batch whose requests name the D fine-tunes in turn

Columns: output tokens/s over the whole generate() (prefill included) and ms per decode step of the whole
batch, measured as (time of T tokens - time of 1 token) / (T - 1): in one engine every request gains one
token per step, so that is the per-token latency its requests see; for D engines run one after the other
it is the sum of theirs (each engine's own requests see only its share). Medians of --repeats runs after a
warm-up run; engine start-up is not timed. The plugin's greedy tokens are checked against the dense
engines' (same model, same requests), and the bytes the plugin keeps resident per fine-tune are reported
beside the base's. Runs in vLLM's own virtual environment (`make test-vllm` makes one):

    .venv-vllm/bin/python bench/serve.py                 # CPU defaults, ~10 min on 2 cores
    .venv-vllm/bin/python bench/serve.py --device cuda --hidden 4096 --layers 8 --requests 64
Writes bench/results/serve_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default asks for most of RAM
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: timings without IPC

from common import RESULTS, ROOT, command_line, cpu_name, timestamp, write_results  # noqa: E402

# The checkout's in-place build is for the main environment's torch; vLLM's environment has its own install
# of xorgemm, built against the torch vLLM pins.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import torch  # noqa: E402
import transformers  # noqa: E402
import vllm  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

import xorgemm  # noqa: E402
import xorgemm.vllm  # noqa: E402
from xorgemm.testing import perturb  # noqa: E402


def make_models(root: Path, args) -> dict[str, Path]:
    """The base and D full fine-tunes as Hugging Face folders, and each fine-tune's delta."""
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=2048,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for j in range(1, args.finetunes + 1):
        ft = copy.deepcopy(base)
        with torch.no_grad():
            for i, p in enumerate(ft.parameters()):  # every tensor changed, as a real full fine-tune does
                p.copy_(perturb(p, "dense", seed=1000 * j + i, magnitude=2e-2))
        ft.save_pretrained(root / f"ft{j}")
        del ft
        report = xorgemm.pack(root / "base", root / f"ft{j}", root / f"ft{j}.xor.safetensors")
        paths[f"ft{j}"] = root / f"ft{j}"
        print(f"ft{j}: delta {report.ratio:.1%} of the fine-tuned bytes", flush=True)
    return paths


class Bench:
    def __init__(self, args):
        self.args = args
        g = torch.Generator().manual_seed(1)
        self.prompts = [{"prompt_token_ids": torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist()}
                        for _ in range(args.requests)]

    def engine(self, model_dir, **kwargs):
        # Dense engines as vLLM runs them by default (torch.compile and CUDA graphs on a GPU); the plugin's
        # engine_args ask for full CUDA graphs of decode steps without torch.compile (docs/vllm.md). On the
        # CPU both run eagerly.
        kwargs.setdefault("enforce_eager", self.args.device == "cpu")
        return vllm.LLM(model=str(model_dir), dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                        max_model_len=self.args.prompt_len + self.args.tokens + 8, max_num_seqs=self.args.requests,
                        **kwargs)

    def _seconds(self, llm, prompts, lora, tokens):
        sp = vllm.SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return elapsed, [list(o.outputs[0].token_ids) for o in outs]

    def measure(self, llm, prompts, lora=None):
        """(seconds for T tokens, seconds for 1 token, requests), medians over the repeats after a warm-up,
        and the greedy tokens."""
        _, tokens = self._seconds(llm, prompts, lora, self.args.tokens)
        full = [self._seconds(llm, prompts, lora, self.args.tokens)[0] for _ in range(self.args.repeats)]
        first = [self._seconds(llm, prompts, lora, 1)[0] for _ in range(self.args.repeats)]
        return (statistics.median(full), statistics.median(first), len(prompts)), tokens

    def row(self, name, parts, engines, note=""):
        """A result row from (seconds for T, seconds for 1, requests) per engine run one after the other."""
        full, first = sum(p[0] for p in parts), sum(p[1] for p in parts)
        tokens = self.args.tokens * sum(p[2] for p in parts)
        steps = self.args.tokens - 1
        r = {"case": name, "engines": engines, "seconds": full, "tokens_per_s": tokens / full,
             "ms_per_step": 1e3 * (full - first) / steps if steps else None, "note": note}
        print(f"{name:18s} {r['tokens_per_s']:9.1f} tok/s  {r['ms_per_step'] or 0:8.1f} ms/step", flush=True)
        return r


def dense_runs(bench, paths, args):
    """Timings and greedy tokens of vLLM's dense engines: the base and fine-tune 1 on every request, and each
    fine-tune j on its share of the requests (k % D == j - 1)."""
    out, tokens = {}, {}
    d = args.finetunes
    for name in ["base"] + [f"ft{j}" for j in range(1, d + 1)]:
        llm = bench.engine(paths[name])
        if name in ("base", "ft1"):
            out[name], tokens[name] = bench.measure(llm, bench.prompts)
        if name != "base":
            out[f"share-{name}"], tokens[f"share-{name}"] = bench.measure(llm, bench.prompts[int(name[2:]) - 1::d])
        del llm
        gc.collect()
    mixed = [None] * len(bench.prompts)
    for j in range(1, d + 1):
        mixed[j - 1::d] = tokens[f"share-ft{j}"]
    tokens["mixed"] = mixed
    return out, tokens


def xorgemm_runs(bench, root, paths, args):
    """The plugin's timings and greedy tokens (base, fine-tune 1, the mix), its resident bytes per fine-tune
    with all D loaded, and its slots' bytes (the engine runs in this process: its bank is this module's)."""
    from xorgemm.vllm import method

    d = args.finetunes
    llm = bench.engine(paths["base"], **xorgemm.vllm.engine_args(max_finetunes=d))
    loras = [LoRARequest(f"ft{j}", j, str(root / f"ft{j}.xor.safetensors")) for j in range(1, d + 1)]
    n = len(bench.prompts)
    out, tokens = {}, {}
    out["base"], tokens["base"] = bench.measure(llm, bench.prompts)
    out["ft1"], tokens["ft1"] = bench.measure(llm, bench.prompts, [loras[0]] * n)
    out["mixed"], tokens["mixed"] = bench.measure(llm, bench.prompts, [loras[k % d] for k in range(n)])
    bank = method.BANK  # the bank of the engine made last here: this one
    resident = {**bank.resident_bytes(), "slots": bank.slot_bytes()}
    del llm
    gc.collect()
    return out, tokens, resident


def resident_mib(m) -> str:
    per = ", ".join(f"{b / 2**20:.1f} MiB" for name, b in m["resident_bytes"].items() if name != "slots")
    return f"{per}, and its slots {m['resident_bytes'].get('slots', 0) / 2**20:.1f} MiB"


def copies(m) -> float:
    """The plugin's resident bytes (base, every fine-tune's deltas and dense copies, the slots' copies of norms
    and embeddings) in copies of the base."""
    return (m["base_bytes"] + sum(m["resident_bytes"].values())) / m["base_bytes"]


def table(rows, meta) -> str:
    head = ("| case | engines | output tokens/s | ms per decode step | vs dense |\n"
            "|---|---|---|---|---|\n")
    ref = {"xorgemm base": "dense base", "xorgemm ft": "dense ft",
           "xorgemm mixed": f"dense {meta['finetunes']} engines"}
    by = {r["case"]: r for r in rows}
    lines = []
    for r in rows:
        vs = ""
        if r["case"] in ref:
            vs = f"{r['tokens_per_s'] / by[ref[r['case']]]['tokens_per_s']:.2f}x tokens/s"
        step = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] is not None else "-"
        lines.append(f"| {r['case']} | {r['engines']} | {r['tokens_per_s']:.1f} | {step} | {vs} |")
    m = meta
    return (head + "\n".join(lines) + "\n\n"
            f"{m['device_name']}, {m['date']}; vLLM {m['vllm']}, torch {m['torch']}, xorgemm {m['xorgemm']}. "
            f"Model: Llama, hidden {m['hidden']}, {m['layers']} layers, intermediate {m['inter']}, vocabulary "
            f"{m['vocab']} ({m['params'] / 1e6:.0f}M parameters, bf16), {m['finetunes']} full fine-tunes that "
            f"change every tensor (delta {m['delta_ratio']:.0%} of the fine-tuned bytes). {m['requests']} requests "
            f"of {m['prompt_len']} prompt tokens, {m['tokens']} generated greedily; medians of {m['repeats']} "
            f"runs. The dense {m['finetunes']} engines run one after the other, each on its share of the "
            "requests (their ms per step is the sum of theirs), and hold one copy of the weights each.\n\n"
            f"Memory: the plugin keeps the base ({m['base_bytes'] / 2**20:.0f} MiB) and per fine-tune "
            f"{resident_mib(m)} resident: {copies(m):.2f} copies of the weights for {m['finetunes']} fine-tunes "
            f"and the base, against {m['finetunes'] + 1} for dense engines. Greedy tokens equal to the dense "
            f"engines': {', '.join(f'{k} {v}' for k, v in m['tokens_match'].items())} ("
            + ", ".join(f"{k}: {a['requests_equal']} of {a['requests']} requests, {a['mean_common_prefix']:.1f} "
                        "tokens before the first difference on average" for k, a in m["tokens_agree"].items())
            + "). The CPU kernel sums in another order than oneDNN (fp32 sums, one rounding: the same error "
            "against float64), so a near tie between two logits of this random-weight model can go the "
            "other way, and the rest of that request follows it.\n\n"
            f"`{m['command']}`\n")


def agreement(got: list, want: list) -> dict:
    """How far the plugin's greedy tokens follow the dense engines', request by request."""
    prefix = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
              for g, w in zip(got, want)]
    return {"requests": len(want), "requests_equal": sum(g == w for g, w in zip(got, want)),
            "mean_common_prefix": sum(prefix) / max(1, len(prefix))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--finetunes", type=int, default=4, help="D fine-tunes in the mixed batch")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="results path without suffix "
                    "(default bench/results/serve_<device>)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("serve.py: --device cuda, but torch sees no GPU")
    if args.requests % args.finetunes:
        raise SystemExit("serve.py: --requests must be a multiple of --finetunes (each engine an equal share)")
    out = args.out or RESULTS / f"serve_{args.device}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_models(root, args)
        delta = sum((root / f"ft{j}.xor.safetensors").stat().st_size for j in range(1, args.finetunes + 1))
        dense_bytes = sum(f.stat().st_size for f in (root / "ft1").glob("*.safetensors")) * args.finetunes
        bench = Bench(args)
        dense, dense_tokens = dense_runs(bench, paths, args)
        xg, xg_tokens, resident = xorgemm_runs(bench, root, paths, args)
    d = args.finetunes
    rows = [bench.row("dense base", [dense["base"]], 1),
            bench.row("xorgemm base", [xg["base"]], 1),
            bench.row("dense ft", [dense["ft1"]], 1),
            bench.row("xorgemm ft", [xg["ft1"]], 1),
            bench.row(f"dense {d} engines", [dense[f"share-ft{j}"] for j in range(1, d + 1)], d),
            bench.row("xorgemm mixed", [xg["mixed"]], 1)]
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
    meta = {"device": args.device, "date": timestamp(), "vllm": vllm.__version__, "torch": torch.__version__,
            "xorgemm": xorgemm.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else
            f"{cpu_name()} ({os.cpu_count()} cores)",
            "hidden": args.hidden, "inter": args.inter, "layers": args.layers, "vocab": args.vocab,
            "params": params, "finetunes": d, "requests": args.requests, "prompt_len": args.prompt_len,
            "tokens": args.tokens, "repeats": args.repeats, "delta_ratio": delta / dense_bytes,
            "base_bytes": 2 * params, "resident_bytes": resident,
            "tokens_match": {case: xg_tokens[case] == dense_tokens[case] for case in ("base", "ft1", "mixed")},
            "tokens_agree": {case: agreement(xg_tokens[case], dense_tokens[case]) for case in ("base", "ft1", "mixed")},
            "command": command_line("bench/serve.py", sys.argv[1:] if argv is None else argv)}
    path = write_results(out, f"Serving through vLLM ({args.device})", table(rows, meta), meta=meta, rows=rows)
    print(f"wrote {path}.json and .md")


if __name__ == "__main__":
    main()
