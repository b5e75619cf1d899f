"""The xorgemm demo: fine-tunes stored as lossless XOR deltas and served from one base, several per batch.

1. The seed notebook's scenario: its tiny transformer layer (33,472 parameters) and a fine-tune that
   changes 3% of its elements, through `xorgemm pack`, `inspect`, `verify` and `unpack`. The notebook
   pickled its XOR+zstd package in 7,009 bytes.
2. Many fine-tunes, one base, one batch: a small BERT-style transformer (built from a config) and three
   fine-tunes of its Linear layers (sparse, attention-only, dense), packed, loaded with `patch_model`, and
   served in one forward pass whose rows use different fine-tunes, checked against the dense models.
3. A real fine-tune: all-MiniLM-L6-v2 (22.7M parameters, bf16) trained with AdamW for DEMO_STEPS steps on
   the CPU (cached after the first run, see real_finetune.py): packed, verified, and served by
   `patch_model` against the dense fine-tuned model.

    python examples/demo.py [--workdir DIR] [--skip-real]

Files go to a temporary folder removed at the end, or to --workdir, which keeps them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from real_finetune import Recipe, base_model_dir, real_finetune

from xorgemm import cli
from xorgemm.packing import pack, save_state_dict
from xorgemm.serving import patch_model, use
from xorgemm.testing import perturb, seed_scenario, state_dict_of, whole_xor

SEED_PACKAGE_BYTES = 7009  # the notebook's pickle.dumps(pkg)
# Steps of the real fine-tune: every AdamW step moves every trained weight, so a short run already shows a
# full fine-tune's delta (bench/pack.py measures the 300-step recipes).
DEMO_STEPS = 60


def step(title):
    print(f"\n=== {title} ===", flush=True)


def xorgemm_cli(*args) -> int:
    print("$ xorgemm " + " ".join(str(a) for a in args), flush=True)
    rc = cli.main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"demo: `xorgemm {args[0]}` exited with {rc}")
    return rc


def whole_xor_zstd(base: Path, ft: Path, level: int) -> int:
    from safetensors.torch import load_file

    return len(zstandard.ZstdCompressor(level=level).compress(whole_xor(load_file(base), load_file(ft))))


def weight_bytes(path: Path) -> int:
    """Bytes of the tensors in a .safetensors file (not of the file): the denominator of every ratio xorgemm
    prints, `xorgemm pack` included."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(path).values())


def run_case(name: str, base: Path, ft: Path, work: Path, reference: list[tuple[str, int]]):
    delta = work / f"{name}.xor.safetensors"
    rebuilt = work / f"{name}.rebuilt.safetensors"
    xorgemm_cli("pack", "--base", base, "--finetuned", ft, "-o", delta)
    xorgemm_cli("inspect", delta, "--top", 8)
    xorgemm_cli("verify", "--base", base, "--delta", delta, "--finetuned", ft)
    xorgemm_cli("unpack", "--base", base, "--delta", delta, "-o", rebuilt)
    same = rebuilt.read_bytes() == ft.read_bytes()
    size, weights = delta.stat().st_size, weight_bytes(ft)
    print(f"\n{name}: fine-tuned weights {weights:,} bytes -> delta file {size:,} bytes ({100 * size / weights:.2f}%); "
          f"unpacked file identical to the fine-tune: {same}")
    for label, n in reference:
        print(f"  vs {label}: {n:,} bytes -> xorgemm is {100 * size / n:.0f}% of it")
    if not same:
        raise SystemExit("demo: the unpacked fine-tune differs")


def _timed(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def multi_tenant(work: Path):
    import copy

    import transformers

    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg).eval()
    recipes = {"legal": ("sparse", lambda n: True), "med": ("dense", lambda n: ".attention." in n),
               "code": ("dense", lambda n: True)}
    models, paths = {}, {}
    for i, (name, (kind, tuned)) in enumerate(recipes.items()):
        ft = copy.deepcopy(base)
        with torch.no_grad():  # fine-tune the Linear layers; embeddings and norms stay frozen
            for j, (pname, p) in enumerate(ft.named_parameters()):
                owner = ft.get_submodule(pname.rpartition(".")[0])
                if type(owner) is torch.nn.Linear and tuned(pname):
                    p.copy_(perturb(p, kind, frac=0.03, magnitude=1e-2 if kind == "dense" else 1e-3,
                                    seed=100 * i + j))
        models[name] = ft
        paths[name] = work / f"bert-{name}.xor.safetensors"
        rep = pack(state_dict_of(base), state_dict_of(ft), paths[name])
        print(f"{name:6s} ({kind} {'attention' if name == 'med' else 'all Linear'}): {rep.file_bytes:,} bytes "
              f"for {rep.finetuned_bytes:,} bytes of weights ({100 * rep.ratio:.2f}%)")
    served = patch_model(copy.deepcopy(base), paths)
    print(served.xorgemm.report)
    names = list(paths)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])  # row i of the batch uses names[ids[i]], -1 the base
    tokens = torch.randint(0, cfg.vocab_size, (len(ids), 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use(served, ids):
        got = served(input_ids=tokens).last_hidden_state
        t_served = _timed(lambda: served(input_ids=tokens))
    worst = 0.0
    with torch.no_grad():
        for r, i in enumerate(ids.tolist()):
            ref = (base if i < 0 else models[names[i]])(input_ids=tokens[r:r + 1]).last_hidden_state[0]
            worst = max(worst, ((got[r] - ref).norm() / ref.norm()).item())
        groups = {i: tokens[ids == i] for i in set(ids.tolist())}
        t_dense = _timed(lambda: [(base if i < 0 else models[names[i]])(input_ids=g) for i, g in groups.items()])
    print(f"one batch of {len(ids)} rows over {names} + base: worst relative error vs the dense fine-tuned "
          f"models {worst:.1e}")
    print(f"CPU time: {t_served:.1f} ms for the patched model's one forward, {t_dense:.1f} ms for the 4 dense "
          f"models run one after another (the fused GPU kernel is where one launch pays off)")
    if worst > 1e-4:
        raise SystemExit("demo: the served batch differs from the dense fine-tuned models")


def serve_real(base_path: Path, ft_path: Path, delta_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    def model_with(weights):
        m = AutoModel.from_pretrained(str(base_model_dir()), dtype=torch.bfloat16).eval()
        m.load_state_dict(load_file(weights))
        return m

    base, dense_ft = model_with(base_path), model_with(ft_path)
    served = patch_model(base, {"minilm": delta_path}, active="minilm")
    print(served.xorgemm.report)
    tokens = torch.randint(1000, 30000, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = served(input_ids=tokens).last_hidden_state.float()
        want = dense_ft(input_ids=tokens).last_hidden_state.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"patched MiniLM vs the dense fine-tuned MiniLM (bf16): relative error {err:.1e}")
    if err > 1e-2:
        raise SystemExit("demo: the patched MiniLM differs from the dense fine-tune")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where to write the files (default: a temporary folder)")
    p.add_argument("--skip-real", action="store_true", help="skip the MiniLM fine-tune")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"writing files to {work}" + ("" if a.workdir else " (removed at the end; --workdir DIR keeps them)"))

        step("1. The seed notebook's tiny transformer layer, 3% of elements fine-tuned (fp32)")
        base_layer, ft_layer = seed_scenario()
        save_state_dict(state_dict_of(base_layer), work / "seed-base.safetensors")
        save_state_dict(state_dict_of(ft_layer), work / "seed-ft.safetensors")
        run_case("seed", work / "seed-base.safetensors", work / "seed-ft.safetensors", work,
                 [("the notebook's pickled package", SEED_PACKAGE_BYTES),
                  ("zstd-10 of the whole XOR", whole_xor_zstd(work / "seed-base.safetensors",
                                                              work / "seed-ft.safetensors", 10))])

        step("2. Three fine-tunes of one base served in one batch (patch_model, per-row fine-tune ids)")
        multi_tenant(work)

        if not a.skip_real:
            step(f"3. A real full fine-tune: all-MiniLM-L6-v2, AdamW lr 1e-4, {DEMO_STEPS} steps (bf16)")
            base, ft = real_finetune("bf16", Recipe(steps=DEMO_STEPS))
            run_case("minilm", base, ft, work, [("zstd-19 of the whole XOR", whole_xor_zstd(base, ft, 19))])
            serve_real(base, ft, work / "minilm.xor.safetensors")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
