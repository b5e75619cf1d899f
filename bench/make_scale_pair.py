"""Generates a synthetic Llama-3-8B-shaped base and its dense bf16 full fine-tune on local disk, no downloads:
two Hugging Face folders (sharded at 5 GB, with model.safetensors.index.json), 16 GB each at 32 layers.
Written a tensor at a time (xorgemm.testing.write_llama_pair). `python bench/pack.py --scale` makes one itself
when missing; this script makes one anywhere, at any depth.

    python bench/make_scale_pair.py /data/pair               # 32 layers: 2 x 16 GB
    python bench/make_scale_pair.py /tmp/pair --layers 4     # a 4-layer slice: 2 x 3.2 GB
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository on sys.path)

from xorgemm.testing import LLAMA3_8B, write_llama_pair


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write base/ and finetuned/ into")
    p.add_argument("--layers", type=int, default=LLAMA3_8B["layers"], help="decoder layers (default 32)")
    p.add_argument("--shard-size", type=float, default=5.0, help="shard size in GB (default 5)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    base, ft = write_llama_pair(a.out, **dict(LLAMA3_8B, layers=a.layers), shard_bytes=int(a.shard_size * 1e9),
                                seed=a.seed, progress=True)
    print(f"wrote {base} and {ft}")


if __name__ == "__main__":
    main()
