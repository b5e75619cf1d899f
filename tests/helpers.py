"""Helpers the test files share: error measures, packing a module pair, fine-tuned copies of a model, and
the devices a test runs on (the CPU always; CUDA where a GPU and the CUDA extension exist, else skipped)."""
import copy

import pytest
import torch
from torch import nn

import xorgemm
from xorgemm._native import CUDA
from xorgemm.testing import perturb, state_dict_of

HAS_CUDA = torch.cuda.is_available() and CUDA is not None
# Parametrize a test with `@pytest.mark.parametrize("device", DEVICES)`: the same assertions on every device.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])]


def payload_range(path) -> tuple[int, int]:
    """Where a delta container's payload (its zstd chunks) lies in the file: [start, end)."""
    import json
    import struct

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    a, b = json.loads(raw[8:8 + n])["payload"]["data_offsets"]
    return 8 + n + a, 8 + n + b


def rel_err(got, want) -> float:
    """Normwise relative error of `got` against a (float64) reference, on the CPU."""
    want = want.double().cpu()
    return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()


def close(a, b, tol=1e-5) -> bool:
    return rel_err(a, b) < tol


def pack_models(tmp_path, base: nn.Module, ft: nn.Module, name: str):
    """Packs ft against base into tmp_path/<name>.xor.safetensors; returns the path."""
    path = tmp_path / f"{name}.xor.safetensors"
    xorgemm.pack(state_dict_of(base), state_dict_of(ft), path)
    return path


def finetuned_copy(model: nn.Module, seed: int, *, names=None, only_linear=False, kind="dense",
                   magnitude=1e-2) -> nn.Module:
    """A copy of `model` whose parameters are perturbed (`kind`, see xorgemm.testing.perturb): those in
    `names` if given, else those of nn.Linear modules if `only_linear`, else all."""
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for i, (name, p) in enumerate(ft.named_parameters()):
            owner = ft.get_submodule(name.rpartition(".")[0]) if "." in name else ft
            if (names is not None and name not in names) or (only_linear and type(owner) is not nn.Linear):
                continue
            p.copy_(perturb(p, kind, seed=seed * 1000 + i, magnitude=magnitude))
    return ft
