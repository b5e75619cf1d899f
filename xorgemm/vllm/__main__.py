"""`python -m xorgemm.vllm args --max-finetunes K [--eager]`: the `vllm serve` flags that turn the plugin on.

    vllm serve BASE $(python -m xorgemm.vllm args --max-finetunes 4) --lora-modules legal=legal.xor.safetensors
"""
import argparse
import sys

from xorgemm.vllm import cli_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xorgemm.vllm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("args", help="print the vllm serve flags")
    a.add_argument("--max-finetunes", type=int, default=4, help="fine-tunes per batch (vLLM's --max-loras)")
    a.add_argument("--eager", action="store_true", default=None,
                   help="no CUDA graphs (vLLM's --enforce-eager; the default except on a CUDA GPU)")
    ns = p.parse_args(argv)
    try:
        print(" ".join(cli_args(ns.max_finetunes, eager=ns.eager)))  # unquoted: meant for $(...) (see cli_args)
    except (RuntimeError, ValueError) as e:
        print(f"xorgemm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
