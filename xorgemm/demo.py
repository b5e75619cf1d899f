"""The xorgemm demo: two fine-tunes stored as lossless XOR deltas, checked bit for bit.

1. The seed notebook's scenario: its tiny transformer layer (33,472 parameters) and a fine-tune that
   changes 3% of its elements. The notebook pickled its XOR+zstd package in 7,009 bytes.
2. A real fine-tune: all-MiniLM-L6-v2 (22.7M parameters, bf16) trained with AdamW for 300 steps on the
   CPU (about a minute and a half the first time, cached after).

Each goes through the command line a user would type: `xorgemm pack`, `inspect`, `verify`, `unpack`.

    python -m xorgemm.demo [--workdir DIR] [--skip-real]
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

from xorgemm import cli
from xorgemm.delta import save_state_dict
from xorgemm.format.layout import tensor_bytes

SEED_PACKAGE_BYTES = 7009  # the notebook's pickle.dumps(pkg)


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

    b, f = load_file(base), load_file(ft)
    xor = b"".join((tensor_bytes(b[k]) ^ tensor_bytes(f[k])).numpy().tobytes() for k in f)
    return len(zstandard.ZstdCompressor(level=level).compress(xor))


def run_case(name: str, base: Path, ft: Path, work: Path, reference: list[tuple[str, int]]):
    delta = work / f"{name}.xor.safetensors"
    rebuilt = work / f"{name}.rebuilt.safetensors"
    xorgemm_cli("pack", "--base", base, "--finetuned", ft, "-o", delta)
    xorgemm_cli("inspect", delta, "--top", 8)
    xorgemm_cli("verify", "--base", base, "--delta", delta, "--finetuned", ft)
    xorgemm_cli("unpack", "--base", base, "--delta", delta, "-o", rebuilt)
    same = rebuilt.read_bytes() == ft.read_bytes()
    size, weights = delta.stat().st_size, ft.stat().st_size
    print(f"\n{name}: fine-tuned file {weights:,} bytes -> delta {size:,} bytes ({100 * size / weights:.2f}%); "
          f"unpacked file identical to the fine-tune: {same}")
    for label, n in reference:
        print(f"  vs {label}: {n:,} bytes -> xorgemm is {100 * size / n:.0f}% of it")
    if not same:
        raise SystemExit("demo: the unpacked fine-tune differs")


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

        step("1. The seed notebook's tiny transformer layer, 3% of elements fine-tuned (fp32)")
        from xorgemm.testing import seed_scenario, state_dict_of

        base_layer, ft_layer = seed_scenario()
        save_state_dict(state_dict_of(base_layer), work / "seed-base.safetensors")
        save_state_dict(state_dict_of(ft_layer), work / "seed-ft.safetensors")
        run_case("seed", work / "seed-base.safetensors", work / "seed-ft.safetensors", work,
                 [("the notebook's pickled package", SEED_PACKAGE_BYTES),
                  ("zstd-10 of the whole XOR", whole_xor_zstd(work / "seed-base.safetensors",
                                                              work / "seed-ft.safetensors", 10))])

        if not a.skip_real:
            step("2. A real full fine-tune: all-MiniLM-L6-v2, AdamW lr 1e-4, 300 steps (bf16)")
            from xorgemm.real_finetune import real_finetune

            base, ft = real_finetune("bf16")
            run_case("minilm", base, ft, work, [("zstd-19 of the whole XOR", whole_xor_zstd(base, ft, 19))])
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
